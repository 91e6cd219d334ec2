#!/usr/bin/env python
"""Compile time and step time of the U-Net's gradient per 3x3 convolution implementation.

    JAX_COMPILATION_CACHE_DIR= .venv/bin/python benchmarks/conv_choice.py [--configs 8x32x4,...]

For each ``FxPxB`` (features, patch, batch; depth 2) it compiles ``jax.grad`` of the train-mode
forward pass once with ``conv_impl="xla"`` and once with ``"edges"`` (no persistent cache) and times
the compiled step (best of 5). This is what ``models.EDGES_MIN_FLOPS`` is chosen from: the layer
size from which the custom convolution's faster steps pay for its longer compile.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_compilation_cache", False)

from autostructn2v_jax import models  # noqa: E402


def measure(impl: str, f: int, b: int, p: int) -> tuple[float, float]:
    net = models.UNet(f, 2, conv_impl=impl)
    v = models.init_variables(f, 2, p, 0)
    x = jax.random.normal(jax.random.key(0), (b, p, p, 1))

    def loss(params, x):
        y, _ = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
        return jnp.sum(y ** 2)

    t0 = time.perf_counter()
    step = jax.jit(jax.grad(loss)).lower(v["params"], x).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(step(v["params"], x))
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        jax.block_until_ready(step(v["params"], x))
        times.append(time.perf_counter() - t1)
    return compile_s, min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8x32x4,8x32x8,16x32x4,16x32x8,16x32x16,32x32x4,8x64x16,16x64x16,32x64x16")
    args = ap.parse_args(argv)
    print("| features x patch x batch | layer MFLOP | xla compile / step | edges compile / step |")
    print("|---|---:|---:|---:|")
    for c in args.configs.split(","):
        f, p, b = (int(v) for v in c.split("x"))
        flops = models.conv3x3_flops((b, p, p, f), f)
        (cx, sx), (ce, se) = measure("xla", f, b, p), measure("edges", f, b, p)
        print(f"| {f} x {p} x {b} | {flops / 1e6:.0f} | {cx:.1f} s / {1e3 * sx:.1f} ms | "
              f"{ce:.1f} s / {1e3 * se:.1f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
