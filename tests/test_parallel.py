"""Data parallelism on 4 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4).

JAX fixes the device count at start-up, so these run in a child process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SHARDED_STEP = textwrap.dedent(
    """
    import json, jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from autostructn2v_jax import config, masking, models, parallel, preprocess, sampling, train
    assert jax.device_count() == 4, jax.devices()
    cfg = config.base_config().stage1
    # the smallest network: the test is about the sharding, and compile time grows with depth
    cfg.patch_size, cfg.batch_size, cfg.features, cfg.num_layers, cfg.steps_per_dispatch = 32, 8, 4, 1, 1
    spec = train.StageSpec.from_config("stage1", cfg, masking.stage1_kernel(1))
    rng = np.random.default_rng(0)
    planes = [preprocess.normalize(rng.random((64, 64)).astype(np.float32))[0] for _ in range(2)]
    apply_fn = models.make_apply_fn(4, 1)
    out = {{}}
    for name, mesh in (("single", jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                                                 axis_types=(jax.sharding.AxisType.Auto,))),
                       ("sharded", parallel.data_mesh(8))):
        rep = parallel.replicated(mesh)
        bank = jax.device_put(sampling.make_bank(planes, 32), rep)
        state = jax.device_put(train.init_state(spec, 0, 1e-3), rep)
        fn = train.make_train_fn(spec, apply_fn, parallel.batch_sharding(mesh))
        state, first = fn(state, bank, jax.random.key(0))
        out[name] = dict(devices=len(mesh.devices.flat),
                         params=[np.asarray(x).ravel()[:50].tolist() for x in jax.tree.leaves(state.params)],
                         stats=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.batch_stats)])
        state, second = fn(state, bank, jax.random.key(1))
        out[name]["losses"] = np.concatenate([np.asarray(first), np.asarray(second)]).tolist()
    print("RESULT" + json.dumps(out))
    """
)


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("AUTOSTRUCTN2V_CACHE_DIR", str(ROOT / ".jax_cache"))
    return env


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    code = SHARDED_STEP.format(cache=str(ROOT / ".jax_cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    assert res["single"]["devices"] == 1 and res["sharded"]["devices"] == 4
    import numpy as np

    # The first step's loss agrees to float precision; the second one's a little less (below).
    np.testing.assert_allclose(res["sharded"]["losses"][0], res["single"]["losses"][0], rtol=1e-5)
    np.testing.assert_allclose(res["sharded"]["losses"], res["single"]["losses"], rtol=1e-3)
    diffs = np.concatenate([np.abs(np.subtract(a, b)) for a, b in
                            zip(res["sharded"]["params"], res["single"]["params"])])
    # Adam's first step moves every parameter by about lr whatever the gradient's size, so a
    # gradient that is ~0 up to float rounding (reduced in a different order over 4 devices) can
    # move either way: the bound is 2 x lr. Nearly all parameters agree to float precision. (Those
    # few flipped signs change the second step's gradients by more than rounding, and Adam's
    # second step, a ratio of them, by up to lr: measured on an Intel AVX-512 CPU, half the
    # parameters then differ by more than 1e-5. So parameters are compared after one step.)
    assert diffs.max() <= 2 * 1e-3 + 1e-6
    assert np.mean(diffs < 1e-5) > 0.9, np.mean(diffs < 1e-5)
    # BatchNorm statistics are reduced over the global batch, not per device.
    for a, b in zip(res["sharded"]["stats"], res["single"]["stats"]):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=2e-4)


@pytest.mark.slow
def test_sharded_training_through_cli(tmp_path):
    """A CLI run with `cpu_devices=4` trains data parallel on 4 devices and writes what a one-device
    run writes (its outputs, one metrics line per epoch)."""
    from autostructn2v_jax import synth

    synth.write_demo_data(tmp_path / "data", count=2, size=64, case="white", seed=1)
    # The CPU split by the config key: the command line applies it before JAX starts. (That
    # XLA_FLAGS' own device count wins over the key is checked in a cheap subprocess below; that a
    # sharded step equals the one-device step, above.)
    run = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "autostructn2v_jax.cli", "train", "--config", str(ROOT / "configs/stage1_only.py"),
           f"--config.input_dir={tmp_path / 'data' / 'noisy'}", f"--config.output_dir={run}",
           # the smallest network (compile time grows with depth): the test is about the devices
           "--config.num_epochs=1", "--config.stage1.features=4", "--config.stage1.num_layers=1",
           "--config.stage1.batch_size=8",
           "--config.stage1.patches_per_image=16", "--config.stage1.num_val_patches=8",
           "--config.stage1.predict_tile_size=64", "--config.stage1.patch_size=32", "--config.tta=off",
           "--config.cpu_devices=4"]
    env = {k: v for k, v in _env().items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel over 4 cpu devices" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "stage1" / "denoised").iterdir()) == ["image_00.tif", "image_01.tif"]
    lines = (run / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one line per epoch, whatever the device count


def test_cpu_device_count_rule():
    from autostructn2v_jax import parallel

    big, small = (16, 64, 32), (4, 32, 8)  # measured 1.5x faster split / a little slower split
    assert parallel.stage_layer_flops(*big) >= parallel.CPU_SPLIT_MIN_FLOPS > parallel.stage_layer_flops(*small)
    assert parallel.cpu_device_count(0, [big], 2) == 2
    assert parallel.cpu_device_count(0, [small, big], 2) == 2  # the big stage dominates the run
    assert parallel.cpu_device_count(0, [small], 2) == 1
    assert parallel.cpu_device_count(0, [(15, 64, 32)], 2) == 1  # the batch would not split evenly
    assert parallel.cpu_device_count(0, [big], 1) == 1
    assert parallel.cpu_device_count(3, [small], 2) == 3  # an explicit count is kept
    # XLA's own convolutions use both cores from one program: their stages do not ask for a split
    assert parallel.cpu_device_count(0, [big], 2, ["eigen"]) == 1
    assert parallel.cpu_device_count(0, [big, big], 2, ["eigen", "ynnpack"]) == 2
    assert parallel.cpu_device_count(2, [big], 2, ["eigen"]) == 2


def test_split_cpu_leaves_a_started_jax_alone():
    import jax

    from autostructn2v_jax import parallel

    before = jax.device_count()  # starts the backends
    assert parallel.split_cpu(2) is False and parallel.split_cpu(1) is False
    assert jax.device_count() == before


def test_split_cpu_before_jax_starts_gives_that_many_devices():
    code = ("import jax; from autostructn2v_jax import parallel; "
            "assert parallel.split_cpu(3); print('DEVICES', jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEVICES 3" in proc.stdout
    # XLA_FLAGS' own device count wins: the split is refused and the count kept
    code = ("import jax; from autostructn2v_jax import parallel; "
            "assert not parallel.split_cpu(4); print('DEVICES', jax.device_count())")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEVICES 1" in proc.stdout
