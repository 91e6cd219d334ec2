"""The end-of-epoch policy: best model, early stopping and learning-rate plateaus.

A pure function of the host-side loop state and the epoch's masked validation loss
(:func:`after_epoch`), so the rules can be tested without training and a resumed run takes exactly
the decisions an uninterrupted one would (the loop state is saved with every checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

#: Relative decrease of the validation loss that resets the plateau counter (ReduceLROnPlateau's
#: default threshold).
PLATEAU_THRESHOLD = 1e-4


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Host-side loop bookkeeping (saved as JSON with every checkpoint)."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    plateau_count: int = 0
    plateau_best: float = math.inf


@dataclasses.dataclass(frozen=True)
class Policy:
    """The settings of :func:`after_epoch` (from the top-level config keys of the same names)."""

    early_stopping: bool = True
    early_stopping_patience: int = 10
    early_stopping_min_delta: float = 1e-4  # relative
    lr_plateau_patience: int = 5
    lr_plateau_factor: float = 0.5

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        return cls(early_stopping=bool(cfg.early_stopping),
                   early_stopping_patience=int(cfg.early_stopping_patience),
                   early_stopping_min_delta=float(cfg.early_stopping_min_delta),
                   lr_plateau_patience=int(cfg.lr_plateau_patience),
                   lr_plateau_factor=float(cfg.lr_plateau_factor))


class Decision(NamedTuple):
    """What the loop does after an epoch."""

    loop: LoopState  # the new loop state (epoch counted)
    improved: bool  # a new best model: keep these variables
    lr_factor: float  # multiply the learning rate by this (1.0: unchanged)
    stop: bool  # early stopping: no further epoch


def should_stop(loop: LoopState, policy: Policy) -> bool:
    """Early stopping has fired for this loop state (also used when resuming)."""
    return policy.early_stopping and loop.epochs_without_improvement >= policy.early_stopping_patience


def after_epoch(loop: LoopState, val_loss: float, policy: Policy) -> Decision:
    """Count the epoch and apply the rules to its validation loss.

    * improvement: ``val_loss < best * (1 - early_stopping_min_delta)``; it resets the early-stopping
      counter, otherwise the counter grows;
    * plateau: ``val_loss < plateau_best * (1 - PLATEAU_THRESHOLD)`` resets the plateau counter;
      otherwise it grows, and when it reaches ``lr_plateau_patience`` the learning rate is
      multiplied by ``lr_plateau_factor`` and the counter restarts;
    * stop when early stopping is on and the counter reached ``early_stopping_patience``.
    """
    epoch = loop.epoch + 1
    improved = val_loss < loop.best_val_loss * (1 - policy.early_stopping_min_delta)
    if improved:
        best, best_epoch, without = val_loss, epoch, 0
    else:
        best, best_epoch, without = loop.best_val_loss, loop.best_epoch, loop.epochs_without_improvement + 1
    lr_factor = 1.0
    if val_loss < loop.plateau_best * (1 - PLATEAU_THRESHOLD):
        plateau_best, plateau_count = val_loss, 0
    else:
        plateau_best, plateau_count = loop.plateau_best, loop.plateau_count + 1
        if plateau_count >= policy.lr_plateau_patience:
            lr_factor, plateau_count = policy.lr_plateau_factor, 0
    new = LoopState(epoch=epoch, best_val_loss=best, best_epoch=best_epoch,
                    epochs_without_improvement=without, plateau_count=plateau_count,
                    plateau_best=plateau_best)
    return Decision(new, improved, lr_factor, should_stop(new, policy))


# --------------------------------------------------------------------------- time budget

#: Share of a run's time budget that stage 1 gets when both stages train (stage 2 gets the rest,
#: including whatever stage 1 did not use).
STAGE1_BUDGET_SHARE = 0.5
#: Stage 1's share when the stage-2 mask is known before stage 1 trains (found on the raw images or
#: given as a file) and is structured. Stage 1 cannot remove correlated noise, so the final output
#: is stage 2's alone and stage 1's model only shows what is left (docs/benchmarks.md, "Budget
#: split").
STAGE1_SHARE_STRUCTURED = 0.2
LR_SCHEDULES = ("auto", "plateau", "cosine")


def stage_budget_seconds(cfg, name: str, used_seconds: float = 0.0,
                         stage1_share: float = STAGE1_BUDGET_SHARE) -> float | None:
    """Training-time limit of stage ``name`` in seconds, or None for no limit.

    A stage's own ``time_budget_minutes`` wins; otherwise the run's ``time_budget_minutes`` is
    split: stage 1 gets ``stage1_share`` of it when stage 2 also trains, stage 2 gets what
    the run has left after ``used_seconds`` of earlier training (never less than zero).
    """
    own = float(cfg[name].time_budget_minutes)
    if own > 0:
        return 60.0 * own
    total = float(cfg.time_budget_minutes)
    if total <= 0:
        return None
    if name == "stage1":
        return 60.0 * total * (stage1_share if cfg.run_stage2 else 1.0)
    return max(60.0 * total - used_seconds, 0.0)


def stage1_share(mask_before_stage1) -> float:
    """Stage 1's share of the run's budget: ``STAGE1_SHARE_STRUCTURED`` when the stage-2 mask is
    already known and hides more than its centre, ``STAGE1_BUDGET_SHARE`` otherwise (the mask
    comes from stage 1's output, or it is the centre alone and stage 2 continues stage 1's
    training, so the split does not change the final model's steps)."""
    if mask_before_stage1 is not None and int(mask_before_stage1.sum()) > 1:
        return STAGE1_SHARE_STRUCTURED
    return STAGE1_BUDGET_SHARE


def uses_cosine(schedule: str, has_budget: bool) -> bool:
    """``auto`` means cosine when the stage has a time budget, plateaus otherwise."""
    return schedule == "cosine" or (schedule == "auto" and has_budget)


def warmup_cosine(progress: float, warmup: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1] of the run: a linear warm-up over the first
    ``warmup`` fraction, then a half cosine from 1 down to 0 at ``progress = 1``."""
    progress = min(max(float(progress), 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * rest))
