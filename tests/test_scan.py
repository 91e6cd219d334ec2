"""The accelerator path (several steps in one lax.scan) runs on CPU and equals the per-step path."""

from __future__ import annotations

import jax
import numpy as np
from autostructn2v_jax import masking, models, preprocess, sampling, train


def _spec(steps: int) -> train.StageSpec:
    kernel = masking.stage1_kernel(1)
    return train.StageSpec(
        name="stage1", patch_size=16, batch_size=2, features=4, num_layers=1,
        mask_percentage=15.0, strategy="local_mean", use_augmentation=True,
        steps_per_dispatch=steps, kernel=tuple(tuple(bool(v) for v in row) for row in kernel),
    )


def _run(scan: bool, spec: train.StageSpec, bank, dispatches: int):
    fn = train.make_train_fn(spec, models.make_apply_fn(spec.features, spec.num_layers), scan=scan)
    state = train.init_state(spec, 0, 1e-2)
    losses = []
    for _ in range(dispatches):
        state, loss = fn(state, bank, jax.random.key(5))
        losses.append(np.asarray(loss))
    return state, np.concatenate(losses)


def test_scan_branch_gives_the_per_step_losses():
    rng = np.random.default_rng(0)
    planes = [preprocess.normalize(rng.random((40, 40)).astype(np.float32))[0] for _ in range(2)]
    bank = jax.device_put(sampling.make_bank(planes, 16))
    spec = _spec(steps=3)
    scanned, loss_scan = _run(True, spec, bank, dispatches=2)
    stepped, loss_step = _run(False, spec, bank, dispatches=2)
    assert loss_scan.shape == loss_step.shape == (6,)
    assert int(scanned.step) == int(stepped.step) == 6
    assert np.all(np.isfinite(loss_scan))
    # Same keys, same data, same math: equal up to float reassociation inside the loop body.
    np.testing.assert_allclose(loss_scan, loss_step, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(loss_step, 6))) > 1  # the steps really differ (fresh batches)
    # The trained networks agree on a fixed input (parameters in directions the output cannot
    # see, e.g. a bias in front of BatchNorm, get Adam-amplified rounding noise: not compared).
    apply = jax.jit(lambda s, x: models.make_apply_fn(spec.features, spec.num_layers)(
        {"params": s.params, "batch_stats": s.batch_stats}, x, True)[0])
    x = np.random.default_rng(9).standard_normal((2, 16, 16, 1)).astype(np.float32)
    ya, yb = np.asarray(apply(scanned, x)), np.asarray(apply(stepped, x))
    np.testing.assert_allclose(ya, yb, rtol=0, atol=1e-3 * float(np.abs(yb).max()))


def test_use_scan_default_is_per_backend():
    assert train.use_scan() == (jax.default_backend() != "cpu")
