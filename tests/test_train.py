"""Training loop: fixed validation set, resume equals uninterrupted, divergence, no recompiles."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autostructn2v_jax import config as config_lib
from autostructn2v_jax import masking, models, parallel, preprocess, sampling, train
from autostructn2v_jax.errors import TrainingDivergedError
from helpers import TRAIN_PLANE


def _cfg(num_epochs=2, **stage):
    cfg = config_lib.base_config()
    cfg.num_epochs = num_epochs
    s = cfg.stage1
    s.patch_size, s.batch_size, s.features, s.patches_per_image = 32, 4, 8, 8
    s.num_val_patches, s.steps_per_dispatch, s.learning_rate = 8, 2, 1e-3
    s.update(stage)
    return cfg


def _planes(seed=0, n=2, shape=TRAIN_PLANE):
    rng = np.random.default_rng(seed)
    return [preprocess.normalize(rng.random(shape).astype(np.float32))[0] for _ in range(n)]


def test_validation_set_is_fixed_and_masked():
    cfg = _cfg()
    spec = train.StageSpec.from_config("stage1", cfg.stage1, masking.stage1_kernel(1))
    bank = jax.device_put(sampling.make_bank(_planes(), 32))
    a = train.make_val_set(jax.random.key(3), bank, spec, 8)
    b = train.make_val_set(jax.random.key(3), bank, spec, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    inputs, targets, masks = (np.asarray(v) for v in a)
    assert masks.any() and masks.mean() == pytest.approx(0.15, abs=0.01)
    # The loss is taken where the input was hidden: an identity "network" is not rewarded.
    identity_loss = float(np.sum(masks * (inputs - targets) ** 2) / masks.sum())
    assert identity_loss > 0.1


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    planes, val = _planes(0), _planes(1)
    kernel = masking.stage1_kernel(1)
    full = train.train_stage(planes, val, _cfg(2).stage1, _cfg(2), kernel, tmp_path / "a", name="stage1")
    # "Interrupted" run: one epoch, then the same stage again with two epochs resumes from epoch 1.
    train.train_stage(planes, val, _cfg(1).stage1, _cfg(1), kernel, tmp_path / "b", name="stage1")
    resumed = train.train_stage(planes, val, _cfg(2).stage1, _cfg(2), kernel, tmp_path / "b", name="stage1")
    assert full.epochs_run == resumed.epochs_run == 2
    for x, y in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    a = [json.loads(line)["val_loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["val_loss"] for line in lines]
    assert a == b  # bitwise-identical losses on CPU with the same seed


class _Kill(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two epochs without interruption: (variables, metrics lines)."""
    work = tmp_path_factory.mktemp("ref")
    result = train.train_stage(_planes(0), _planes(1), _cfg(2).stage1, _cfg(2), masking.stage1_kernel(1),
                               work, name="stage1")
    return result.variables, (work / "metrics.jsonl").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before_checkpoint", "after_checkpoint", "after_metrics"])
def test_interrupted_epoch_commit_resumes_consistently(where, uninterrupted, tmp_path, monkeypatch):
    """An exception between any two writes of epoch 2's commit, then the same call again: the run
    ends exactly like an uninterrupted one (metrics lines, best variables)."""
    from autostructn2v_jax import checkpoint

    real_save, real_metrics = checkpoint.Checkpointer.save, train._write_metrics

    def save(self, step, state, best, meta):
        epoch = meta["loop"]["epoch"]
        if where == "before_checkpoint" and epoch == 2:
            raise _Kill
        real_save(self, step, state, best, meta)
        if where == "after_checkpoint" and epoch == 2:
            raise _Kill

    def write_metrics(path, history):
        real_metrics(path, history)
        if where == "after_metrics" and len(history) == 2:
            raise _Kill

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    monkeypatch.setattr(train, "_write_metrics", write_metrics)
    args = (_planes(0), _planes(1), _cfg(2).stage1, _cfg(2), masking.stage1_kernel(1), tmp_path)
    with pytest.raises(_Kill):
        train.train_stage(*args, name="stage1")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    committed = 2 if where != "before_checkpoint" else 1
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    assert len(lines) <= committed  # never a metrics line without its checkpoint

    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    monkeypatch.setattr(train, "_write_metrics", real_metrics)
    resumed = train.train_stage(*args, name="stage1")
    ref_variables, ref_lines = uninterrupted
    assert resumed.epochs_run == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items()  # noqa: E731
                          if k not in ("seconds", "patches_per_second")}
    assert [strip(line) for line in lines] == [strip(line) for line in ref_lines]
    for x, y in zip(jax.tree.leaves(ref_variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # prediction loads the same best variables from the committed checkpoint
    loaded = train.load_stage_variables(tmp_path, 8, 2, 32)
    for x, y in zip(jax.tree.leaves(ref_variables), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_nan_loss_stops_with_stage_and_step(tmp_path):
    planes = _planes(0)
    planes[0][5:60, 5:60] = np.inf  # every patch sees it
    with pytest.raises(TrainingDivergedError, match=r"stage1: loss became NaN/Inf at step \d+"):
        train.train_stage(planes, _planes(1), _cfg(1).stage1, _cfg(1), masking.stage1_kernel(1),
                          tmp_path, name="stage1")
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_no_recompilation_after_first_epoch(tmp_path):
    compiles = []
    epochs_seen = []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":  # a jit cache miss
            compiles.append(len(epochs_seen))

    jax.clear_caches()  # steps traced by an earlier test in this process are traced again here
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.train_stage(_planes(0), _planes(1), _cfg(3).stage1, _cfg(3), masking.stage1_kernel(1),
                          tmp_path, name="stage1", progress=epochs_seen.append)
    finally:
        jax.monitoring.clear_event_listeners()
    assert len(epochs_seen) == 3
    # Everything is traced during the first epoch (and the final restore); nothing during epochs 2-3.
    assert compiles and not [c for c in compiles if c in (1, 2)], compiles


@pytest.mark.slow
def test_early_stopping_and_plateau(tmp_path):
    cfg = _cfg(12, learning_rate=1e-6)
    cfg.early_stopping_patience, cfg.lr_plateau_patience = 2, 1
    cfg.early_stopping_min_delta = 0.5  # nothing counts as an improvement after epoch 1
    result = train.train_stage(_planes(0), _planes(1), cfg.stage1, cfg, masking.stage1_kernel(1),
                               tmp_path, name="stage1")
    assert result.stopped_early and result.epochs_run == 3
    lrs = [h["learning_rate"] for h in result.history]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] < lrs[0]
    assert result.history[0]["best"] and not any(h["best"] for h in result.history[1:])


@pytest.mark.slow
def test_train_step_learns_and_uses_fresh_masks():
    cfg = _cfg()
    spec = train.StageSpec.from_config("stage1", cfg.stage1, masking.stage1_kernel(1))
    # the bank, sharding and placement of train.train_stage: the step is the shared compiled one
    mesh = parallel.data_mesh(spec.batch_size)
    bank = jax.device_put(sampling.make_bank(_planes(), 32, use_roi=True), parallel.replicated(mesh))
    k1, k2 = jax.random.key(0), jax.random.key(1)
    batch = jax.jit(lambda k, b: train.make_batch(k, b, spec, augment=True))  # one compile
    _, _, m1 = batch(k1, bank)
    _, _, m2 = batch(k2, bank)
    m1 = np.asarray(m1)
    assert not np.array_equal(m1, np.asarray(m2))
    assert not all(np.array_equal(m1[0], m1[i]) for i in range(1, m1.shape[0]))  # per patch
    state = jax.device_put(train.init_state(spec, 0, 1e-3), parallel.replicated(mesh))
    fn = train.make_train_fn(spec, models.make_apply_fn(8, 2), parallel.batch_sharding(mesh))
    losses = []
    for _ in range(6):
        state, loss = fn(state, bank, jax.random.key(0))
        losses.append(np.asarray(loss))
    losses = np.concatenate(losses)
    assert np.all(np.isfinite(losses)) and int(state.step) == 12
    assert losses[-4:].mean() < losses[:2].mean()
    assert jnp.asarray(state.learning_rate).dtype == jnp.float32


def test_warm_start_copies_variables_and_checks_the_network():
    """`init_variables` replaces the random initialisation (fresh optimizer state); variables of a
    different network are refused, and `network_differences` says when a warm start is possible."""
    cfg = _cfg()
    kernel = masking.stage1_kernel(1)
    spec = train.StageSpec.from_config("stage2", cfg.stage1, kernel)
    donor = models.init_variables(spec.features, spec.num_layers, spec.patch_size, 7, top_skip=spec.top_skip)
    state = train.init_state(spec, 0, 1e-3, donor)
    for x, y in zip(jax.tree.leaves(donor["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = train.init_state(spec, 0, 1e-3)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(state.params)))
    assert int(state.step) == 0
    wider = train.StageSpec.from_config("stage2", _cfg(features=16).stage1, kernel)
    both = config_lib.base_config()
    assert config_lib.network_differences(both) == ["num_layers"]  # stage 2 is one level deeper
    both.stage2.num_layers = both.stage1.num_layers
    assert config_lib.network_differences(both) == []
    both.stage2.features, both.stage2.pool = 32, "blur"
    assert config_lib.network_differences(both) == ["features", "pool"]
    with pytest.raises(ValueError, match="stage2: the warm-start variables"):
        train.init_state(wider, 0, 1e-3, donor)


def _smooth_planes(seed, n=2, shape=TRAIN_PLANE):
    """Smooth content + white noise: a network can learn it within a few epochs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]] / max(shape)
    return [preprocess.normalize((np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
                                  + 0.3 * rng.standard_normal(shape)).astype(np.float32))[0]
            for _ in range(n)]


@pytest.mark.slow
def test_warm_started_stage_begins_where_the_donor_ended(tmp_path):
    """A stage started from trained variables validates near the donor's loss; the same stage from
    a random network is far behind (at a learning rate too small to catch up: the variables were
    really used)."""
    kernel = masking.stage1_kernel(1)
    planes, val = _smooth_planes(0), _smooth_planes(1)
    donor = train.train_stage(planes, val, _cfg(6).stage1, _cfg(6), kernel, tmp_path / "donor", name="stage1")
    still = _cfg(1, learning_rate=1e-7)
    runs = {warm: train.train_stage(planes, val, still.stage1, still, kernel, tmp_path / str(warm), name="stage2",
                                    init_variables=donor.variables if warm else None).best_val_loss
            for warm in (True, False)}
    print(f"\ndonor {donor.best_val_loss:.4f}, warm {runs[True]:.4f}, fresh {runs[False]:.4f}")
    assert runs[True] < 0.8 * runs[False]
    assert runs[True] < 1.2 * donor.best_val_loss


def test_warm_start_rule():
    """`auto` warm-starts stage 2 only for stage 1's task (the same blind spot); stage 2 then
    continues stage 1's network, whatever network its own settings name. A structured mask keeps
    stage 2's own (deeper by default) network, trained from scratch."""
    from autostructn2v_jax import pipeline

    cfg = config_lib.base_config()
    donor = {"params": {}, "batch_stats": {}}
    centre = masking.stage1_kernel(1)
    alone = np.ones((1, 1), bool)  # the centre alone, in another shape
    line = np.ones((1, 9), bool)
    cfg.stage2.features = 32
    s2 = pipeline.stage2_settings(cfg, centre, alone)
    assert [s2[k] for k in config_lib.NETWORK_KEYS] == [cfg.stage1[k] for k in config_lib.NETWORK_KEYS]
    assert (cfg.stage2.num_layers, cfg.stage2.features) == (3, 32)  # the config itself is unchanged
    assert s2.patch_size == cfg.stage2.patch_size and s2.mask_percentage == cfg.stage2.mask_percentage
    assert pipeline.warm_start_variables(cfg, donor, centre, alone, s2) is donor
    assert pipeline.stage2_settings(cfg, centre, line) is cfg.stage2
    deeper = config_lib.base_config()  # stage 2's patch does not suit stage 1's network: its own
    deeper.stage1.num_layers, deeper.stage2.patch_size = 4, 40
    assert pipeline.stage2_settings(deeper, centre, alone) is deeper.stage2
    assert pipeline.warm_start_variables(deeper, donor, centre, alone, deeper.stage2) is None
    assert pipeline.warm_start_variables(cfg, donor, centre, line, cfg.stage2) is None
    assert pipeline.stage2_settings(cfg, None, alone) is cfg.stage2  # stage 1 did not train
    assert pipeline.warm_start_variables(cfg, None, None, alone) is None
    cfg.stage2.warm_start = "on"
    cfg.stage2.features, cfg.stage2.num_layers = cfg.stage1.features, cfg.stage1.num_layers
    assert pipeline.warm_start_variables(cfg, donor, centre, line) is donor
    cfg.stage2.warm_start = "off"
    assert pipeline.stage2_settings(cfg, centre, alone) is cfg.stage2
    assert pipeline.warm_start_variables(cfg, donor, centre, alone) is None
    cfg.stage2.features = cfg.stage1.features
    cfg.stage2.warm_start = "off"
    assert pipeline.warm_start_variables(cfg, donor, centre, alone) is None


def test_structural_masks_turn_with_the_augmented_patch():
    """FIELD-ANCHORS: a structured mask must follow the patch's rotation. Every plane value encodes
    its position (``1 + 64 y + x``), so each augmented patch shows where its original x axis went
    (neighbours along it differ by 1). With the "zero" replacement, the hidden pixels around every
    loss pixel must be the horizontal kernel turned onto that axis, in every patch of the batch.

    (Replaces a PSNR comparison of augmented and plain stage-2 runs that could not tell this bug
    from the spread of 200-step runs: docs/benchmarks.md, "Augmentation check".)"""
    side, p = 64, 32
    plane = (1.0 + np.arange(side * side, dtype=np.float32)).reshape(side, side)
    kernel = np.zeros((5, 5), bool)
    kernel[2] = True  # a horizontal line of 5
    cfg = _cfg(replacement_strategy="zero", batch_size=16, mask_percentage=5.0, use_augmentation=True)
    spec = train.StageSpec.from_config("stage2", cfg.stage1, kernel)
    assert spec.use_augmentation and not spec.cluster
    bank = jax.device_put(sampling.make_bank([plane], p))
    inputs, targets, pred = (np.asarray(a) for a in jax.jit(
        lambda k, b: train.make_batch(k, b, spec, augment=True))(jax.random.key(0), bank))
    orientations = set()
    for i, t, m in zip(inputs, targets, pred):
        x_along_columns = bool(np.all(np.abs(np.diff(t, axis=1)) == 1))
        assert x_along_columns != bool(np.all(np.abs(np.diff(t, axis=0)) == 1))
        orientations.add(x_along_columns)
        hidden = np.pad((i == 0) & (t != 0), 2)
        centres = np.argwhere(m)
        assert len(centres) > 0
        for r, c in centres:
            window = hidden[r:r + 5, c:c + 5]
            along, across = (window[2], window[:, 2]) if x_along_columns else (window[:, 2], window[2])
            assert along.all(), window  # the whole line lies along the image's x axis
            # and not across it (another copy may lie 2 pixels away, never adjacent)
            np.testing.assert_array_equal(across[1:4], [False, True, False])
    assert orientations == {True, False}  # the batch holds both orientations of the line
