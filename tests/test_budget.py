"""Time budget: the split over stages, the warm-up + cosine schedule, and a stage cut by its budget."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from autostructn2v_jax import config as config_lib
from autostructn2v_jax import masking, policy, preprocess, train
from autostructn2v_jax.errors import ConfigError
from helpers import TRAIN_PLANE


def test_stage_budgets_split_and_override():
    cfg = config_lib.base_config()
    assert policy.stage_budget_seconds(cfg, "stage1") is None
    cfg.time_budget_minutes = 10.0
    assert policy.stage_budget_seconds(cfg, "stage1") == pytest.approx(300.0)
    # stage 2 gets what is left, including what stage 1 did not use
    assert policy.stage_budget_seconds(cfg, "stage2", used_seconds=120.0) == pytest.approx(480.0)
    assert policy.stage_budget_seconds(cfg, "stage2", used_seconds=900.0) == 0.0
    cfg.run_stage2 = False
    assert policy.stage_budget_seconds(cfg, "stage1") == pytest.approx(600.0)
    cfg.stage1.time_budget_minutes = 2.0  # a stage's own budget wins
    assert policy.stage_budget_seconds(cfg, "stage1") == pytest.approx(120.0)


def test_stage1_share_shrinks_only_for_a_structured_mask_known_first():
    cfg = config_lib.base_config()
    cfg.time_budget_minutes = 10.0
    line = np.zeros((3, 9), bool)
    line[1] = True
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    assert policy.stage1_share(None) == policy.STAGE1_BUDGET_SHARE  # mask from stage 1's output
    assert policy.stage1_share(centre) == policy.STAGE1_BUDGET_SHARE  # stage 2 continues stage 1
    share = policy.stage1_share(line)
    assert share == policy.STAGE1_SHARE_STRUCTURED < policy.STAGE1_BUDGET_SHARE
    assert policy.stage_budget_seconds(cfg, "stage1", stage1_share=share) == pytest.approx(600.0 * share)
    cfg.stage1.time_budget_minutes = 2.0  # a stage's own budget still wins
    assert policy.stage_budget_seconds(cfg, "stage1", stage1_share=share) == pytest.approx(120.0)


def test_warmup_cosine_shape():
    f = [policy.warmup_cosine(p, 0.1) for p in np.linspace(0, 1, 101)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after the warm-up
    assert f[-1] == pytest.approx(0.0, abs=1e-12)
    assert policy.warmup_cosine(0.55, 0.1) == pytest.approx(0.5)  # half way through the cosine
    assert policy.warmup_cosine(0.0, 0.0) == 1.0 and policy.warmup_cosine(2.0, 0.1) == 0.0
    assert policy.uses_cosine("auto", True) and not policy.uses_cosine("auto", False)
    assert policy.uses_cosine("cosine", False) and not policy.uses_cosine("plateau", True)


@pytest.mark.parametrize("key, value", [("time_budget_minutes", -1.0), ("lr_schedule", "linear"),
                                        ("warmup_fraction", 1.0), ("stage2.time_budget_minutes", -2.0)])
def test_budget_keys_validated(key, value):
    cfg = config_lib.base_config()
    config_lib.set_value(cfg, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate_config(cfg, need_io=False)


def _cfg(**top):
    cfg = config_lib.base_config()
    s = cfg.stage1
    s.patch_size, s.batch_size, s.features, s.patches_per_image = 32, 4, 8, 8  # 4 steps per epoch
    s.num_val_patches, s.steps_per_dispatch, s.learning_rate = 8, 1, 1e-3
    cfg.update(top)
    return cfg


def _planes(seed, n=2):
    rng = np.random.default_rng(seed)
    return [preprocess.normalize(rng.random(TRAIN_PLANE).astype(np.float32))[0] for _ in range(n)]


@pytest.mark.slow
def test_budget_cuts_training_and_keeps_best(tmp_path):
    cfg = _cfg(num_epochs=1000, early_stopping=False)
    # warm the compile cache so the budget measures steps, not compilation
    train.train_stage(_planes(0, 2), _planes(1), cfg.stage1, _cfg(num_epochs=1), masking.stage1_kernel(1),
                      tmp_path / "warm", name="stage1")
    # one compiled epoch (steps, validation, checkpoint) timed on this machine under its current
    # load: the budget holds about three of them, so the cut comes after several epochs anywhere
    t0 = time.perf_counter()
    train.train_stage(_planes(0, 2), _planes(1), cfg.stage1, _cfg(num_epochs=1), masking.stage1_kernel(1),
                      tmp_path / "calibrate", name="stage1")
    budget = max(4.0, 3.0 * (time.perf_counter() - t0))
    result = train.train_stage(_planes(0, 2), _planes(1), cfg.stage1, cfg, masking.stage1_kernel(1),
                               tmp_path / "run", name="stage1", budget_seconds=budget)
    assert result.out_of_time and not result.stopped_early
    assert 2 <= result.epochs_run < 1000  # short epochs: several fit even on a loaded machine
    assert budget <= result.seconds < 2 * budget + 10.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == result.epochs_run
    left = [r["time_left_seconds"] for r in records]
    assert all(a >= b for a, b in zip(left, left[1:])) and left[-1] == 0.0
    # the cosine schedule ("auto" with a budget) ran: warm-up, then decay towards 0
    lrs = [r["learning_rate"] for r in records]
    assert max(lrs) <= 1e-3 + 1e-9 and lrs[-1] < 0.5 * max(lrs)
    assert result.best_val_loss == min(r["val_loss"] for r in records)
    assert math.isfinite(result.best_val_loss)
