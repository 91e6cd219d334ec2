#!/usr/bin/env python
"""Stage-1 (or stage-2) PSNR reached in a fixed training time, per (features, batch, patch, lr).

    PYTHONPATH=. .venv/bin/python benchmarks/time_to_quality.py [--seconds 90] [--stage2] \
        [--candidates 64x4x32x1e-4,32x4x32x4e-4,...]

``--stage2``: the stage-2 config trained from scratch on the same crops with noise correlated
along x (``peers.add_noise(..., "xcorr")``: a 3-tap box, so correlated up to lag 2) under its
structural mask, a horizontal line of 5 pixels (stage 2 as the pipeline runs it, mask given).

The data of ``benchmarks/peers.py`` (b): 16 crops (128 x 128) of scikit-image's bundled photos
with white Gaussian noise of sigma 0.1 (noisy: 20.0 dB). Each candidate ``FxBxPxLR`` trains our
stage-1 step (``train.make_train_fn``, depth 2, 15 % masking, local_mean, augmentation, lr
constant) for ``--seconds`` of training time after its compilation, in a fresh process that
splits the CPU as ``autostructn2v train`` would (``parallel.cpu_device_count``). The PSNR of the
raw prediction (no posterior step) against the clean crops is checked every ``--check`` seconds
(not counted). Prints a table of PSNR after 1/3, 2/3 and all of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax
from autostructn2v_jax import parallel
F, B, P, LR, SECONDS, CHECK = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
STAGE2 = sys.argv[7] == "1"
parallel.split_cpu(parallel.cpu_device_count(0, [(B, P, F)], parallel.available_cores()))
jax.config.update("jax_enable_compilation_cache", False)
import numpy as np
sys.path.insert(0, "benchmarks")
import peers
from autostructn2v_jax import config as C, masking, models, predict, preprocess, sampling, train
clean = peers.photo_crops()
noisy = peers.add_noise(clean, "xcorr" if STAGE2 else "white")
normed = [preprocess.normalize(p) for p in noisy]
s = C.base_config().stage2 if STAGE2 else C.base_config().stage1
s.patch_size, s.batch_size, s.features, s.steps_per_dispatch = P, B, F, 5
kernel = np.zeros((5, 5), bool)
kernel[2] = True
spec = train.StageSpec.from_config("stage2" if STAGE2 else "stage1", s, kernel if STAGE2 else masking.stage1_kernel(1))
mesh = parallel.data_mesh(B)
bank = jax.device_put(sampling.make_bank([n for n, _ in normed], P), parallel.replicated(mesh))
fn = train.make_train_fn(spec, models.make_apply_fn(F, 2), parallel.batch_sharding(mesh))
init = lambda: jax.device_put(train.init_state(spec, 0, LR), parallel.replicated(mesh))
state = init(); root = jax.random.key(11)
state, losses = fn(state, bank, root); jax.block_until_ready(losses)  # compile
state = init()
def score(state):
    v = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    pred = np.stack([preprocess.denormalize(predict.predict_image(v, n), st) for n, st in normed])
    return peers.psnr(pred, clean)
score(state)  # compile the prediction
trace, elapsed, next_check = [], 0.0, CHECK
while elapsed < SECONDS:
    t0 = time.perf_counter(); state, losses = fn(state, bank, root); jax.block_until_ready(losses)
    elapsed += time.perf_counter() - t0
    if elapsed >= next_check or elapsed >= SECONDS:
        trace.append((int(state.step), elapsed, score(state))); next_check += CHECK
print("TRACE" + json.dumps(dict(devices=len(mesh.devices.flat), trace=trace)))
'''


def run(f, b, p, lr, seconds, check, stage2=False):
    out = subprocess.run([sys.executable, "-c", CHILD, str(f), str(b), str(p), str(lr), str(seconds), str(check),
                          "1" if stage2 else "0"],
                         capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("TRACE"))[5:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--check", type=float, default=30.0)
    ap.add_argument("--candidates", default="64x4x32x1e-4,64x4x32x4e-4,32x4x32x4e-4,32x16x64x4e-4,16x16x64x4e-4,16x16x64x1e-3")
    ap.add_argument("--stage2", action="store_true", help="stage 2 on x-correlated noise, mask given")
    args = ap.parse_args(argv)
    print(f"load {os.getloadavg()[0]:.2f}; {args.seconds:.0f} s of training each; "
          f"{'stage 2, xcorr' if args.stage2 else 'stage 1, white'}", flush=True)
    print("| features x batch x patch, lr | devices | steps | PSNR at checks (dB, s) |")
    print("|---|---:|---:|---|")
    for c in args.candidates.split(","):
        f, b, p, lr = c.split("x")
        res = run(int(f), int(b), int(p), float(lr), args.seconds, args.check, args.stage2)
        tr = res["trace"]
        checks = ", ".join(f"{q:.2f} @ {t:.0f}" for _, t, q in tr)
        print(f"| {f} x {b} x {p}, {lr} | {res['devices']} | {tr[-1][0]} | {checks} |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
