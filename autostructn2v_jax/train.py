"""Training one stage: a jitted, scanned blind-spot step on device-resident images.

Per step, inside one compiled function: sample patches from the image bank, draw a fresh mask for
every patch (copies of the stage's kernel), replace the hidden pixels, augment patch + masks
together, forward, masked MSE at the kernel centres, Adam update. `steps_per_dispatch` steps run in
one `lax.scan`; the host only fetches losses once per epoch. Keys come from `fold_in(root, step)`,
so a resumed run draws exactly what an uninterrupted one would.

Validation is the same blind-spot loss on a fixed set of validation patches and masks, drawn once
from a seeded key: epochs are comparable and copying the input is not rewarded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from autostructn2v_jax import data, masking, models, parallel
from autostructn2v_jax.checkpoint import Checkpointer
from autostructn2v_jax.errors import TrainingDivergedError

log = logging.getLogger(__name__)

_VAL_KEY = 0x5A1  # fold-in constants: independent streams from one root key
_TRAIN_KEY = 0x7EA
_INIT_KEY = 0x1A1


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    learning_rate: jax.Array


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Static settings of one stage's step (decide shapes; hashable)."""

    name: str
    patch_size: int
    batch_size: int
    features: int
    num_layers: int
    mask_percentage: float
    strategy: str
    use_augmentation: bool
    steps_per_dispatch: int
    kernel: tuple  # the blind-spot kernel as nested tuples of bools

    @property
    def kernel_array(self) -> np.ndarray:
        return np.array(self.kernel, dtype=bool)

    @classmethod
    def from_config(cls, name: str, stage_cfg, kernel: np.ndarray) -> "StageSpec":
        strategy = stage_cfg.replacement_strategy
        if isinstance(strategy, int):
            strategy = ("local_mean", "zero", "random")[strategy]
        return cls(
            name=name,
            patch_size=int(stage_cfg.patch_size),
            batch_size=int(stage_cfg.batch_size),
            features=int(stage_cfg.features),
            num_layers=int(stage_cfg.num_layers),
            mask_percentage=float(stage_cfg.mask_percentage),
            strategy=strategy,
            use_augmentation=bool(stage_cfg.use_augmentation),
            steps_per_dispatch=int(stage_cfg.steps_per_dispatch),
            kernel=tuple(tuple(bool(v) for v in row) for row in np.asarray(kernel, bool)),
        )


@dataclasses.dataclass
class TrainResult:
    variables: dict  # best {'params', 'batch_stats'}
    history: list  # one dict per epoch
    best_val_loss: float
    epochs_run: int
    stopped_early: bool


# --------------------------------------------------------------------------- pure pieces


def _optimizer() -> optax.GradientTransformation:
    # Adam's direction; the learning rate lives in the state so plateaus can lower it.
    return optax.scale_by_adam()


def make_batch(key: jax.Array, bank: data.ImageBank, spec: StageSpec, *, augment: bool,
               sharding: NamedSharding | None = None):
    """(inputs, targets, prediction_masks), each (B, P, P): sampled, masked, replaced, augmented."""
    k_sample, k_mask, k_aug = jax.random.split(key, 3)
    patches = data.sample_patches(k_sample, bank, spec.patch_size, spec.batch_size)
    if sharding is not None:  # split the batch over the devices; the rest follows
        patches = jax.lax.with_sharding_constraint(patches, sharding)
    inputs, pred_masks, _ = masking.make_blind_spot_batch(
        k_mask, patches, spec.kernel_array, spec.mask_percentage, spec.strategy
    )
    if augment:
        # Masks are drawn in the patch's own orientation, then everything turns together: the
        # structural kernel is transformed exactly like the noise correlation it must cover.
        inputs, patches, pred_masks = data.augment_batch(k_aug, inputs, patches, pred_masks)
    return inputs, patches, pred_masks


def make_train_fn(spec: StageSpec, apply_fn: Callable, sharding: NamedSharding | None = None,
                  *, scan: bool | None = None) -> Callable:
    """jit(state, bank, root_key) -> (state, losses[steps_per_dispatch]).

    ``scan``: run the ``steps_per_dispatch`` steps inside one ``lax.scan`` (True) or as that many
    dispatches of a one-step function (False); ``None`` asks :func:`use_scan` (per backend). Both
    draw the same keys (``fold_in(root, step)``) and give the same losses.
    """
    tx = _optimizer()

    def one_step(state: TrainState, bank: data.ImageBank, root: jax.Array):
        key = jax.random.fold_in(root, state.step)
        inputs, targets, pred_masks = make_batch(key, bank, spec, augment=spec.use_augmentation,
                                                 sharding=sharding)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, new_stats = apply_fn(variables, inputs[..., None], train=True)
            return masking.masked_mse(out[..., 0], targets, pred_masks), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - state.learning_rate * u, state.params, updates)
        new_state = state._replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, loss

    k = spec.steps_per_dispatch
    if not (use_scan() if scan is None else scan):
        # On CPU each step is its own dispatch: XLA:CPU runs a step inside a while loop
        # (lax.scan) slower than in straight-line code (docs/benchmarks.md). Dispatch is
        # asynchronous, so there is still no host round trip per step.
        step = jax.jit(one_step, donate_argnums=0)

        def run_steps(state, bank, root):
            losses = []
            for _ in range(k):
                state, loss = step(state, bank, root)
                losses.append(loss)
            return state, jnp.stack(losses)

        return run_steps

    def run(state: TrainState, bank: data.ImageBank, root: jax.Array):
        return jax.lax.scan(lambda s, _: one_step(s, bank, root), state, None, length=k)

    return jax.jit(run, donate_argnums=0)


def use_scan() -> bool:
    """Several steps per compiled call on accelerators; one step per call on CPU (see above)."""
    return jax.default_backend() != "cpu"


def make_val_set(key: jax.Array, bank: data.ImageBank, spec: StageSpec, count: int,
                 sharding: NamedSharding | None = None):
    """A fixed validation set: `count` patches with their masks (drawn once, never augmented)."""
    n_batches = max(1, math.ceil(count / spec.batch_size))

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, n_batches)
        return jax.lax.map(lambda k: make_batch(k, bank, spec, augment=False, sharding=sharding), keys)

    return draw(key)  # each (n_batches, B, P, P)


def make_eval_fn(apply_fn: Callable) -> Callable:
    """fn(variables, val_set) -> masked MSE over the whole fixed validation set (a device scalar)."""

    @jax.jit
    def batch_sums(variables, inputs, targets, masks):
        out = apply_fn(variables, inputs[..., None], train=False)[..., 0]
        return jnp.stack([jnp.sum(masks * (out - targets) ** 2), jnp.sum(masks)])

    def run(variables, val_set):
        inputs, targets, masks = val_set
        # A host loop over the few validation batches (not lax.scan: slow on CPU, see above);
        # the sums stay on the device.
        total = sum(batch_sums(variables, inputs[i], targets[i], masks[i]) for i in range(inputs.shape[0]))
        return total[0] / jnp.maximum(total[1], 1.0)

    return run


def init_state(spec: StageSpec, seed: int, learning_rate: float) -> TrainState:
    variables = models.init_variables(spec.features, spec.num_layers, spec.patch_size, seed)
    opt_state = jax.jit(_optimizer().init)(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=opt_state,
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
    )


# --------------------------------------------------------------------------- host loop


@dataclasses.dataclass
class LoopState:
    """Host-side loop bookkeeping (saved as JSON with every checkpoint)."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    plateau_count: int = 0
    plateau_best: float = math.inf


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: pathlib.Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint we resume from (written before a kill)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train_stage(
    train_planes: list[np.ndarray],
    val_planes: list[np.ndarray],
    stage_cfg,
    general_cfg,
    kernel: np.ndarray,
    workdir: str | pathlib.Path,
    *,
    name: str,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one stage on normalised float32 planes; resume from `workdir/checkpoints` if present."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = StageSpec.from_config(name, stage_cfg, kernel)
    mesh = parallel.data_mesh(spec.batch_size)
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh)

    def to_device(planes, use_roi):
        bank = data.make_bank(planes, spec.patch_size, use_roi, stage_cfg.roi_threshold,
                              stage_cfg.scale_factor, stage_cfg.select_background)
        return jax.device_put(bank, replicated)

    train_bank = to_device(train_planes, bool(stage_cfg.use_roi))
    val_bank = to_device(val_planes, False)

    root = jax.random.key(int(general_cfg.random_seed))
    stage_root = jax.random.fold_in(root, 1 if name == "stage1" else 2)
    train_root = jax.random.fold_in(stage_root, _TRAIN_KEY)

    apply_fn = models.make_apply_fn(spec.features, spec.num_layers)
    train_fn = make_train_fn(spec, apply_fn, batch_sharding)
    eval_fn = make_eval_fn(apply_fn)
    val_set = make_val_set(jax.random.fold_in(stage_root, _VAL_KEY), val_bank, spec,
                           int(stage_cfg.num_val_patches), batch_sharding)
    state = jax.device_put(init_state(spec, int(general_cfg.random_seed) + (0 if name == "stage1" else 1),
                                      float(stage_cfg.learning_rate)), replicated)

    steps_per_epoch = max(1, len(train_planes) * int(stage_cfg.patches_per_image) // spec.batch_size)
    dispatches = max(1, math.ceil(steps_per_epoch / spec.steps_per_dispatch))
    metrics_path = workdir / "metrics.jsonl"
    ckpt = Checkpointer(workdir / "checkpoints")
    loop = LoopState()
    history: list[dict] = []
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = jax.device_put(restored[0], replicated)
        loop = LoopState(**restored[1]["loop"])
        _truncate_metrics(metrics_path, loop.epoch)
        log.info("%s: resuming after epoch %d (best val %.5g)", name, loop.epoch, loop.best_val_loss)
    elif metrics_path.exists():
        metrics_path.unlink()
    if metrics_path.exists():
        history = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]

    num_epochs = int(general_cfg.num_epochs)
    stopped_early = loop.epochs_without_improvement >= int(general_cfg.early_stopping_patience) \
        and bool(general_cfg.early_stopping)
    try:
        while loop.epoch < num_epochs and not stopped_early:
            t0 = time.perf_counter()
            losses = []
            for _ in range(dispatches):
                state, step_losses = train_fn(state, train_bank, train_root)
                losses.append(step_losses)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            val_loss = eval_fn(variables, val_set)
            losses = np.concatenate(jax.device_get(losses))
            val_loss = float(jax.device_get(val_loss))
            elapsed = time.perf_counter() - t0
            step_now = int(jax.device_get(state.step))
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size or not math.isfinite(val_loss):
                where = step_now - len(losses) + (int(bad[0]) if bad.size else len(losses) - 1)
                raise TrainingDivergedError(
                    f"{name}: loss became NaN/Inf at step {where} (epoch {loop.epoch + 1}); "
                    f"kept the last good checkpoint in {workdir / 'checkpoints'}; "
                    f"try a lower {name}.learning_rate"
                )
            loop.epoch += 1
            lr = float(jax.device_get(state.learning_rate))
            improved = val_loss < loop.best_val_loss * (1 - float(general_cfg.early_stopping_min_delta))
            if improved:
                loop.best_val_loss, loop.best_epoch = val_loss, loop.epoch
                loop.epochs_without_improvement = 0
            else:
                loop.epochs_without_improvement += 1
            # ReduceLROnPlateau on the masked validation loss.
            if val_loss < loop.plateau_best * (1 - 1e-4):
                loop.plateau_best, loop.plateau_count = val_loss, 0
            else:
                loop.plateau_count += 1
                if loop.plateau_count >= int(general_cfg.lr_plateau_patience):
                    state = state._replace(learning_rate=state.learning_rate * float(general_cfg.lr_plateau_factor))
                    loop.plateau_count = 0
                    log.info("%s: validation loss plateaued, learning rate -> %.3g", name,
                             lr * float(general_cfg.lr_plateau_factor))
            record = dict(
                epoch=loop.epoch, step=step_now, train_loss=float(np.mean(losses)), val_loss=val_loss,
                learning_rate=lr, seconds=elapsed,
                patches_per_second=len(losses) * spec.batch_size / max(elapsed, 1e-9),
                best=improved,
            )
            history.append(record)
            ckpt.save(step_now, state, {"loop": dataclasses.asdict(loop), "record": record}, is_best=improved)
            _append_jsonl(metrics_path, record)
            if progress is not None:
                progress(record)
            if bool(general_cfg.early_stopping) and \
                    loop.epochs_without_improvement >= int(general_cfg.early_stopping_patience):
                stopped_early = True
                log.info("%s: early stopping after epoch %d (best epoch %d)", name, loop.epoch, loop.best_epoch)
        best = ckpt.restore_best(state)
    finally:
        ckpt.close()
    best_state = best[0] if best is not None else state
    variables = jax.device_get({"params": best_state.params, "batch_stats": best_state.batch_stats})
    return TrainResult(variables=variables, history=history, best_val_loss=loop.best_val_loss,
                       epochs_run=loop.epoch, stopped_early=stopped_early)


def load_stage_variables(workdir: str | pathlib.Path, features: int, num_layers: int, patch_size: int) -> dict:
    """Best variables of a trained stage, for prediction."""
    from autostructn2v_jax.checkpoint import restore_best_params

    template = init_state(
        StageSpec(name="x", patch_size=patch_size, batch_size=1, features=features,
                  num_layers=num_layers, mask_percentage=1.0, strategy="zero",
                  use_augmentation=False, steps_per_dispatch=1, kernel=((True,),)),
        0, 1e-4,
    )
    abstract = jax.eval_shape(lambda: template)
    found = restore_best_params(pathlib.Path(workdir) / "checkpoints", abstract)
    if found is None:
        return None
    state = found[0]
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
