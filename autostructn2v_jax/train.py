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
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from autostructn2v_jax import compile_options, files, masking, models, parallel, policy, sampling
from autostructn2v_jax.checkpoint import Checkpointer, restore_best_variables
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
    pool: str = "max"  # "max" or "blur" (N2V2)
    top_skip: bool = True  # False: no top-level skip connection (N2V2)
    cluster: bool = False  # loss at every pixel of K in copies of K (+) K (masking.use_cluster)

    @property
    def kernel_array(self) -> np.ndarray:
        return np.array(self.kernel, dtype=bool)

    @classmethod
    def from_config(cls, name: str, stage_cfg, kernel: np.ndarray) -> "StageSpec":
        strategy = masking.STRATEGIES[masking.strategy_id(stage_cfg.replacement_strategy)]
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
            # canonical (cropped) kernel: the same mask with another False border, same step
            kernel=tuple(tuple(bool(v) for v in row) for row in masking.crop_kernel(kernel)),
            pool=str(stage_cfg.get("pool", "max")),
            top_skip=bool(stage_cfg.get("top_skip", True)),
            cluster=bool(stage_cfg.get("mask_cluster", False)) and masking.use_cluster(
                kernel, (int(stage_cfg.patch_size),) * 2, float(stage_cfg.mask_percentage)),
        )


@dataclasses.dataclass
class TrainResult:
    variables: dict  # best {'params', 'batch_stats'}
    history: list  # one dict per epoch
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    out_of_time: bool = False  # the stage's time budget ran out
    seconds: float = 0.0  # training wall time of this call


# --------------------------------------------------------------------------- pure pieces


def _optimizer() -> optax.GradientTransformation:
    # Adam's direction; the learning rate lives in the state so plateaus can lower it.
    return optax.scale_by_adam()


def make_batch(key: jax.Array, bank: sampling.ImageBank, spec: StageSpec, *, augment: bool,
               sharding: NamedSharding | None = None):
    """(inputs, targets, prediction_masks), each (B, P, P): sampled, masked, replaced, augmented."""
    k_sample, k_mask, k_aug = jax.random.split(key, 3)
    patches = sampling.sample_patches(k_sample, bank, spec.patch_size, spec.batch_size)
    if sharding is not None:  # split the batch over the devices; the rest follows
        patches = jax.lax.with_sharding_constraint(patches, sharding)
    inputs, pred_masks, _ = masking.make_blind_spot_batch(
        k_mask, patches, spec.kernel_array, spec.mask_percentage, spec.strategy, spec.cluster
    )
    if augment:
        # Masks are drawn in the patch's own orientation, then everything turns together: the
        # structural kernel is transformed exactly like the noise correlation it must cover.
        inputs, patches, pred_masks = sampling.augment_batch(k_aug, inputs, patches, pred_masks)
    return inputs, patches, pred_masks


def _step_key(spec: StageSpec) -> StageSpec:
    """The spec as far as the compiled step sees it: the stage's name is only a label."""
    return dataclasses.replace(spec, name="")


def make_train_fn(spec: StageSpec, apply_fn: Callable, sharding: NamedSharding | None = None,
                  *, scan: bool | None = None) -> Callable:
    """jit(state, bank, root_key) -> (state, losses[steps_per_dispatch]).

    ``scan``: run the ``steps_per_dispatch`` steps inside one ``lax.scan`` (True) or as that many
    dispatches of a one-step function (False); ``None`` asks :func:`use_scan` (per backend). Both
    draw the same keys (``fold_in(root, step)``) and give the same losses.

    Cached per (spec, network, sharding, mode): a second stage or run with the same step in the
    same process (two stages of one shape, a notebook's second run, the tests) reuses the traced
    and compiled function instead of tracing it again (about a second of Python per trace, plus a
    compile or a persistent-cache load).
    """
    scan = use_scan() if scan is None else bool(scan)
    return _cached_train_fn(_step_key(spec), apply_fn, sharding, scan)


@functools.lru_cache(maxsize=32)
def _cached_train_fn(spec: StageSpec, apply_fn: Callable, sharding: NamedSharding | None,
                     scan: bool) -> Callable:
    tx = _optimizer()

    def one_step(state: TrainState, bank: sampling.ImageBank, root: jax.Array):
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
    if not scan:
        # On CPU each step is its own dispatch: XLA:CPU runs a step inside a while loop
        # (lax.scan) slower than in straight-line code (docs/benchmarks.md). Dispatch is
        # asynchronous, so there is still no host round trip per step.
        step = compile_options.network_jit(one_step, features=spec.features, donate_argnums=0)

        def run_steps(state, bank, root):
            losses = []
            for _ in range(k):
                state, loss = step(state, bank, root)
                losses.append(loss)
            return state, jnp.stack(losses)

        return run_steps

    def run(state: TrainState, bank: sampling.ImageBank, root: jax.Array):
        return jax.lax.scan(lambda s, _: one_step(s, bank, root), state, None, length=k)

    return compile_options.network_jit(run, features=spec.features, donate_argnums=0)


def use_scan() -> bool:
    """Several steps per compiled call on accelerators; one step per call on CPU (see above)."""
    return jax.default_backend() != "cpu"


def make_val_set(key: jax.Array, bank: sampling.ImageBank, spec: StageSpec, count: int,
                 sharding: NamedSharding | None = None):
    """A fixed validation set: `count` patches with their masks (drawn once, never augmented)."""
    n_batches = max(1, math.ceil(count / spec.batch_size))
    return _val_draw_fn(_step_key(spec), n_batches, sharding)(key, bank)  # each (n_batches, B, P, P)


@functools.lru_cache(maxsize=32)
def _val_draw_fn(spec: StageSpec, n_batches: int, sharding: NamedSharding | None) -> Callable:
    """The jitted validation draw, cached like :func:`make_train_fn`'s step."""

    @jax.jit
    def draw(key, bank):  # the bank is an argument, not a compile-time constant
        keys = jax.random.split(key, n_batches)
        return jax.lax.map(lambda k: make_batch(k, bank, spec, augment=False, sharding=sharding), keys)

    return draw


@functools.lru_cache(maxsize=32)
def make_eval_fn(apply_fn: Callable) -> Callable:
    """fn(variables, val_set) -> masked MSE over the whole fixed validation set (a device scalar).
    Cached per network, like :func:`make_train_fn`."""

    def add_batch(variables, val_set, i, sums):
        inputs, targets, masks = (a[i] for a in val_set)  # a traced index: no per-batch slicing op
        out = apply_fn(variables, inputs[..., None], train=False)[..., 0]
        return sums + jnp.stack([jnp.sum(masks * (out - targets) ** 2), jnp.sum(masks)])

    add_batch = compile_options.network_jit(add_batch, features=getattr(apply_fn, "features", None))

    @jax.jit
    def ratio(sums):
        return sums[0] / jnp.maximum(sums[1], 1.0)

    def run(variables, val_set):
        # A host loop over the few validation batches (not lax.scan: slow on CPU, see above), one
        # compiled call each; the sums stay on the device.
        sums = jnp.zeros((2,), jnp.float32)
        for i in range(val_set[0].shape[0]):
            sums = add_batch(variables, val_set, i, sums)
        return ratio(sums)

    return run


def init_state(spec: StageSpec, seed: int, learning_rate: float, init_variables: dict | None = None) -> TrainState:
    """A fresh train state: new variables from ``seed``, or a copy of ``init_variables`` (a warm
    start from another stage with the same architecture), with a fresh optimizer state either way."""
    if init_variables is None:
        variables = models.init_variables(spec.features, spec.num_layers, spec.patch_size, seed,
                                          top_skip=spec.top_skip)
    else:
        variables = _checked_init(spec, init_variables)
    opt_state = _optimizer_init(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=opt_state,
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
    )


@jax.jit
def _optimizer_init(params):
    return _optimizer().init(params)


# --------------------------------------------------------------------------- host loop


def _variables_template(features: int, num_layers: int, patch_size: int, top_skip: bool) -> dict:
    """Shapes and dtypes of a network's ``{'params', 'batch_stats'}`` (nothing is computed)."""
    template = jax.eval_shape(lambda: models.init_variables(features, num_layers, patch_size, 0,
                                                            top_skip=top_skip))
    return {"params": template["params"], "batch_stats": template["batch_stats"]}


def _checked_init(spec: StageSpec, init_variables: dict) -> dict:
    """``init_variables`` as a float32 copy, checked against the shapes ``spec``'s network needs."""
    template = _variables_template(spec.features, spec.num_layers, spec.patch_size, spec.top_skip)
    given = {"params": init_variables["params"], "batch_stats": init_variables["batch_stats"]}
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)
    if (jax.tree_util.tree_structure(template) != jax.tree_util.tree_structure(given)
            or shapes(template) != shapes(given)):
        raise ValueError(f"{spec.name}: the warm-start variables do not fit this stage's network")
    return jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), given)


def _write_metrics(path: pathlib.Path, history: list[dict]) -> None:
    """`metrics.jsonl` from the committed history (main process only; see `parallel`)."""
    if parallel.is_main_process():
        files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def _variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


@jax.jit
def _copy(tree):
    """A device copy (the train state's buffers are donated to the next step), in one compiled call
    rather than one dispatch per leaf."""
    return jax.tree.map(jnp.copy, tree)


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
    budget_seconds: float | None = None,
    init_variables: dict | None = None,
) -> TrainResult:
    """Train one stage on normalised float32 planes; resume from `workdir/checkpoints` if present.

    With ``budget_seconds`` training stops when that much wall time has passed (checked after every
    dispatch, with at most one dispatch in flight): the cut epoch is validated and committed like
    any other, and the best model so far is returned. The cosine schedule (``lr_schedule``) runs
    over ``max(elapsed / budget, step / total steps)``.

    ``init_variables`` (the same network, see ``config.network_differences``) replaces the random
    initialisation; a resumed run takes its variables from the checkpoint as usual.

    Each epoch ends with one all-or-nothing commit (`checkpoint.Checkpointer.save`: train state,
    best variables, loop state and history), then `metrics.jsonl` is rewritten from that history;
    a kill at any point resumes from the last commit and redoes the same draws.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = StageSpec.from_config(name, stage_cfg, kernel)
    policy_cfg = policy.Policy.from_config(general_cfg)
    mesh = parallel.data_mesh(spec.batch_size)
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh)

    def to_device(planes, use_roi):
        bank = sampling.make_bank(planes, spec.patch_size, use_roi, stage_cfg.roi_threshold,
                                  stage_cfg.scale_factor, stage_cfg.select_background)
        return jax.device_put(bank, replicated)

    train_bank = to_device(train_planes, bool(stage_cfg.use_roi))
    val_bank = to_device(val_planes, False)

    root = jax.random.key(int(general_cfg.random_seed))
    stage_root = jax.random.fold_in(root, 1 if name == "stage1" else 2)
    train_root = jax.random.fold_in(stage_root, _TRAIN_KEY)

    apply_fn = models.make_apply_fn(spec.features, spec.num_layers, "auto", spec.pool, spec.top_skip)
    train_fn = make_train_fn(spec, apply_fn, batch_sharding)
    eval_fn = make_eval_fn(apply_fn)
    val_set = make_val_set(jax.random.fold_in(stage_root, _VAL_KEY), val_bank, spec,
                           int(stage_cfg.num_val_patches), batch_sharding)
    state = jax.device_put(init_state(spec, int(general_cfg.random_seed) + (0 if name == "stage1" else 1),
                                      float(stage_cfg.learning_rate), init_variables), replicated)
    best = _copy(_variables(state))

    steps_per_epoch = max(1, len(train_planes) * int(stage_cfg.patches_per_image) // spec.batch_size)
    dispatches = max(1, math.ceil(steps_per_epoch / spec.steps_per_dispatch))
    metrics_path = workdir / "metrics.jsonl"
    ckpt = Checkpointer(workdir / "checkpoints")
    loop = policy.LoopState()
    history: list[dict] = []
    restored = ckpt.restore(state, best)
    if restored is not None:
        state, best = jax.device_put(restored[:2], replicated)
        loop = policy.LoopState(**restored[2]["loop"])
        history = list(restored[2]["history"])
        log.info("%s: resuming after epoch %d (best val %.5g)", name, loop.epoch, loop.best_val_loss)
    _write_metrics(metrics_path, history)  # drops lines of an epoch whose commit did not happen

    num_epochs = int(general_cfg.num_epochs)
    stopped_early = policy.should_stop(loop, policy_cfg)
    cosine = policy.uses_cosine(str(general_cfg.lr_schedule), budget_seconds is not None)
    base_lr = float(stage_cfg.learning_rate)
    total_steps = num_epochs * dispatches * spec.steps_per_dispatch
    step_host = int(jax.device_get(state.step))
    t_start = time.perf_counter()
    out_of_time = False

    def time_left() -> float | None:
        return None if budget_seconds is None else budget_seconds - (time.perf_counter() - t_start)

    def progress_fraction() -> float:
        by_steps = step_host / max(total_steps, 1)
        if budget_seconds is None:
            return by_steps
        return max(by_steps, (time.perf_counter() - t_start) / max(budget_seconds, 1e-9))

    try:
        while loop.epoch < num_epochs and not stopped_early and not out_of_time:
            t0 = time.perf_counter()
            losses = []
            for _ in range(dispatches):
                if cosine:  # a host-side scalar per dispatch: no device round trip
                    lr_now = base_lr * policy.warmup_cosine(progress_fraction(),
                                                            float(general_cfg.warmup_fraction))
                    state = state._replace(learning_rate=jax.device_put(np.float32(lr_now), replicated))
                if losses and budget_seconds is not None:
                    losses[-1].block_until_ready()  # one dispatch in flight: the clock is honest
                    if time_left() <= 0:
                        out_of_time = True
                        break
                state, step_losses = train_fn(state, train_bank, train_root)
                step_host += spec.steps_per_dispatch
                losses.append(step_losses)
            if budget_seconds is not None and not out_of_time:
                jax.block_until_ready(losses)
                out_of_time = time_left() <= 0
            val_loss = eval_fn(_variables(state), val_set)
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
            lr = float(jax.device_get(state.learning_rate))
            decision = policy.after_epoch(loop, val_loss, policy_cfg)
            loop, stopped_early = decision.loop, decision.stop
            if decision.improved:
                best = _copy(_variables(state))
            if decision.lr_factor != 1.0 and not cosine:
                state = state._replace(learning_rate=state.learning_rate * decision.lr_factor)
                log.info("%s: validation loss plateaued, learning rate -> %.3g", name,
                         lr * decision.lr_factor)
            record = dict(
                epoch=loop.epoch, step=step_now, train_loss=float(np.mean(losses)), val_loss=val_loss,
                learning_rate=lr, seconds=elapsed,
                patches_per_second=len(losses) * spec.batch_size / max(elapsed, 1e-9),
                best=decision.improved,
            )
            if budget_seconds is not None:
                record["time_left_seconds"] = max(time_left(), 0.0)
            history.append(record)
            ckpt.save(step_now, state, best, {"loop": dataclasses.asdict(loop), "history": history})
            _write_metrics(metrics_path, history)
            if progress is not None:
                progress(record)
            if out_of_time:
                log.info("%s: time budget of %.1f min used after epoch %d; keeping the best model "
                         "(epoch %d)", name, budget_seconds / 60, loop.epoch, loop.best_epoch)
            if stopped_early:
                log.info("%s: early stopping after epoch %d (best epoch %d)", name, loop.epoch, loop.best_epoch)
    finally:
        ckpt.close()
    return TrainResult(variables=jax.device_get(best), history=history, best_val_loss=loop.best_val_loss,
                       epochs_run=loop.epoch, stopped_early=stopped_early, out_of_time=out_of_time,
                       seconds=time.perf_counter() - t_start)


def load_stage_variables(workdir: str | pathlib.Path, features: int, num_layers: int, patch_size: int,
                         top_skip: bool = True) -> dict:
    """Best variables of a trained stage, for prediction (None without a checkpoint)."""
    found = restore_best_variables(pathlib.Path(workdir) / "checkpoints",
                                   _variables_template(features, num_layers, patch_size, top_skip))
    return None if found is None else jax.device_get(found)
