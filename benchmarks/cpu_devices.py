#!/usr/bin/env python
"""Train step on 1 CPU device against the CPU split into one device per core (run by hand).

    .venv/bin/python benchmarks/cpu_devices.py [--configs 8x32x8,16x64x16,32x64x16,64x32x4,64x96x4]
                                               [--torch PYTHON] [--rounds 2]

Each ``FxPxB`` (features, patch, batch) is timed through the real ``train.make_train_fn`` (data
path included, depth 2, stage-1 masking), in a fresh process per device count, because JAX fixes
the device count when it starts (``jax_num_cpu_devices``, what ``cpu_devices`` sets). Rounds
alternate the device counts. With ``--torch`` (a Python with torch, e.g. benchmarks/.peers-venv)
the same U-Net in PyTorch (``../shared/bench/torch_unet_step.py``, model only, fixed batch, 2
threads) is timed in the same rounds. Prints the table and
the rule's choice (``parallel.cpu_device_count``) per config.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
TORCH_SCRIPT = HERE.parent.parent / "shared" / "bench" / "torch_unet_step.py"

CHILD = r'''
import statistics, sys, time
import jax
jax.config.update("jax_num_cpu_devices", int(sys.argv[4]))
jax.config.update("jax_enable_compilation_cache", False)
import numpy as np
from autostructn2v_jax import config as C, masking, models, parallel, preprocess, sampling, train
F, P, B = (int(v) for v in sys.argv[1:4])
s = C.base_config().stage1
s.patch_size, s.batch_size, s.features, s.steps_per_dispatch = P, B, F, 1
spec = train.StageSpec.from_config("stage1", s, masking.stage1_kernel(1))
rng = np.random.default_rng(0)
planes = [preprocess.normalize(rng.random((256, 256)).astype(np.float32))[0] for _ in range(4)]
mesh = parallel.data_mesh(B)
bank = jax.device_put(sampling.make_bank(planes, P), parallel.replicated(mesh))
fn = train.make_train_fn(spec, models.make_apply_fn(F, 2), parallel.batch_sharding(mesh))
state = jax.device_put(train.init_state(spec, 0, 1e-4), parallel.replicated(mesh))
root = jax.random.key(0)
for _ in range(3):
    state, loss = fn(state, bank, root)
jax.block_until_ready(loss)
times = []
for _ in range(8):
    t0 = time.perf_counter()
    state, loss = fn(state, bank, root)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
print("MS", 1e3 * statistics.median(times), len(mesh.devices.flat))
'''


def jax_ms(f: int, p: int, b: int, devices: int) -> float:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(f), str(p), str(b), str(devices)],
                         capture_output=True, text=True, env=env, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("MS"))
    return float(line.split()[1])


def torch_ms(python: str, f: int, p: int, b: int) -> float:
    out = subprocess.run([python, str(TORCH_SCRIPT), f"features={f}", f"batch={b}", f"patch={p}"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split(": ")[1].split(" ms/step")[0])


def main(argv=None) -> int:
    from autostructn2v_jax import parallel

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8x32x8,16x64x16,32x64x16,64x32x4,64x96x4")
    ap.add_argument("--torch", default="", help="a Python with torch: time the PyTorch U-Net too")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    cores = parallel.available_cores()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    print(f"cores {cores}, load {os.getloadavg()[0]:.2f}", flush=True)
    print("| features x patch x batch | layer GFLOP | 1 device ms/step | "
          f"{cores} devices ms/step | speed-up | rule | PyTorch ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for f, p, b in configs:
        one, split, ref = [], [], []
        for _ in range(args.rounds):
            one.append(jax_ms(f, p, b, 1))
            split.append(jax_ms(f, p, b, cores))
            if args.torch:
                ref.append(torch_ms(args.torch, f, p, b))
        o, s = statistics.median(one), statistics.median(split)
        rule = parallel.cpu_device_count(0, [(b, p, f)], cores)
        t = f"{statistics.median(ref):.0f}" if ref else "-"
        print(f"| {f} x {p} x {b} | {parallel.stage_layer_flops(b, p, f) / 1e9:.2f} | {o:.0f} | "
              f"{s:.0f} | {o / s:.2f}x | {rule} | {t} |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
