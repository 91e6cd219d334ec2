"""The end-of-epoch policy (best model, early stopping, learning-rate plateaus) without training."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autostructn2v_jax import config as config_lib
from autostructn2v_jax.policy import LoopState, Policy, after_epoch, should_stop


def _run(losses, policy):
    """Decisions for a sequence of validation losses, as the training loop takes them."""
    loop, out = LoopState(), []
    for loss in losses:
        d = after_epoch(loop, loss, policy)
        loop = d.loop
        out.append(d)
        if d.stop:
            break
    return out


def test_first_epoch_is_best_and_counts():
    d = after_epoch(LoopState(), 1.0, Policy())
    assert d.improved and not d.stop and d.lr_factor == 1.0
    assert d.loop == LoopState(epoch=1, best_val_loss=1.0, best_epoch=1, epochs_without_improvement=0,
                               plateau_count=0, plateau_best=1.0)


def test_improvement_is_relative_to_min_delta():
    policy = Policy(early_stopping_min_delta=0.1)
    loop = after_epoch(LoopState(), 1.0, policy).loop
    small = after_epoch(loop, 0.95, policy)  # 5 % better: not enough
    assert not small.improved and small.loop.best_val_loss == 1.0 and small.loop.best_epoch == 1
    assert small.loop.epochs_without_improvement == 1
    big = after_epoch(small.loop, 0.85, policy)  # 15 % better
    assert big.improved and big.loop.best_epoch == 3 and big.loop.epochs_without_improvement == 0


def test_early_stopping_after_patience_epochs_without_improvement():
    decisions = _run([1.0, 0.5, 0.6, 0.7, 0.8, 0.9], Policy(early_stopping_patience=3))
    assert [d.stop for d in decisions] == [False, False, False, False, True]
    assert decisions[-1].loop.best_epoch == 2 and decisions[-1].loop.epoch == 5
    no_stop = _run([1.0, 0.5, 0.6, 0.7, 0.8, 0.9],
                   Policy(early_stopping=False, early_stopping_patience=3))
    assert len(no_stop) == 6 and not any(d.stop for d in no_stop)


def test_plateau_lowers_the_learning_rate_every_patience_epochs():
    policy = Policy(lr_plateau_patience=2, lr_plateau_factor=0.5, early_stopping=False)
    decisions = _run([1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5], policy)
    assert [d.lr_factor for d in decisions] == [1.0, 1.0, 0.5, 1.0, 0.5, 1.0, 1.0]
    assert decisions[5].loop.plateau_count == 0 and decisions[5].loop.plateau_best == 0.5


def test_plateau_threshold_is_relative():
    policy = Policy(lr_plateau_patience=1, early_stopping=False)
    loop = after_epoch(LoopState(), 1.0, policy).loop
    assert after_epoch(loop, 1.0 - 1e-6, policy).lr_factor == 0.5  # below the 1e-4 threshold
    assert after_epoch(loop, 0.99, policy).lr_factor == 1.0


def test_resumed_loop_state_gives_the_same_decisions():
    losses = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.76, 0.77]
    policy = Policy(early_stopping_patience=3, lr_plateau_patience=2)
    straight = _run(losses, policy)
    loop = LoopState()
    for loss in losses[:3]:
        loop = after_epoch(loop, loss, policy).loop
    saved = LoopState(**dataclasses.asdict(loop))  # the JSON round trip of a checkpoint
    resumed = []
    for loss in losses[3:]:
        d = after_epoch(saved, loss, policy)
        saved = d.loop
        resumed.append(d)
        if d.stop:
            break
    assert resumed == straight[3:]
    assert should_stop(straight[-1].loop, policy) == straight[-1].stop


def test_policy_from_config_and_initial_state():
    cfg = config_lib.base_config()
    policy = Policy.from_config(cfg)
    assert policy == Policy(True, cfg.early_stopping_patience, cfg.early_stopping_min_delta,
                            cfg.lr_plateau_patience, cfg.lr_plateau_factor)
    assert math.isinf(LoopState().best_val_loss) and not should_stop(LoopState(), policy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoopState().epoch = 3  # type: ignore[misc]
