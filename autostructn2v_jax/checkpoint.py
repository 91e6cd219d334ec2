"""Checkpoints: the only module that imports orbax.

Two `CheckpointManager`s per stage: `checkpoints/latest` (resume) and `checkpoints/best` (lowest
masked validation loss, used for prediction). Each step saves the train state as a pure pytree of
arrays plus a JSON record of the host-side loop state (epoch, best loss, patience counters).
Orbax writes into a temporary folder and renames it, so a kill leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(path: pathlib.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(path.resolve(), options=options)


class Checkpointer:
    """Best + latest checkpoints of one stage."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.latest = _manager(self.directory / "latest")
        self.best = _manager(self.directory / "best")

    def save(self, step: int, state: Any, meta: dict, *, is_best: bool) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with jax.transfer_guard("allow"):
            self.latest.save(step, args=args, force=True)
            if is_best:
                self.best.save(step, args=args, force=True)

    def _restore(self, manager: ocp.CheckpointManager, abstract_state: Any):
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        with jax.transfer_guard("allow"):
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state: Any):
        """(state, meta) of the latest checkpoint, or None."""
        return self._restore(self.latest, abstract_state)

    def restore_best(self, abstract_state: Any):
        """(state, meta) of the best checkpoint, or None."""
        return self._restore(self.best, abstract_state)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_best_params(directory: str | pathlib.Path, abstract_state: Any):
    """The best checkpoint of a finished stage (for prediction)."""
    ckpt = Checkpointer(directory)
    try:
        found = ckpt.restore_best(abstract_state)
        if found is None:
            found = ckpt.restore_latest(abstract_state)
    finally:
        ckpt.close()
    return found
