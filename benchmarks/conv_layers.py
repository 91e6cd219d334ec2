#!/usr/bin/env python
"""Where the train step's time goes: each 3x3 convolution of the U-Net, ours against PyTorch (run by hand).

    .venv/bin/python benchmarks/conv_layers.py [--features 32] [--patch 64] [--batch 16]
                                               [--torch benchmarks/.peers-venv/bin/python] [--rounds 2]

For each of the ten 3x3 layers of the depth-2 U-Net (encoder, bottleneck, decoder; the decoder's
first layer sees the concatenated skip) it times the forward pass, the input gradient and the
weight gradient alone, jitted the way the package compiles the network (``models.reflect_conv3x3``
with ``conv_impl="auto"``, the CPU convolution library of ``compile_options``), median of 15
calls. With ``--torch`` the same layers run in PyTorch (``nn.Conv2d``, reflect padding,
channels_last, 2 threads) in a child process of that Python, round by round with ours. The sums
say how much of the step gap to PyTorch (``../shared/bench/torch_unet_step.py``) is the
convolutions and how much the rest (BatchNorm, ReLU, pooling, up-convolution, loss, Adam).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TORCH_CHILD = r'''
import statistics, sys, time, torch
torch.set_num_threads(2)
B = int(sys.argv[1]); layers = [tuple(int(v) for v in s.split("x")) for s in sys.argv[2:]]
def med(f, n=15):
    f(); f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
for h, c, o in layers:
    conv = torch.nn.Conv2d(c, o, 3, padding=1, padding_mode="reflect", bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(B, c, h, h).to(memory_format=torch.channels_last)
    g = torch.randn(B, o, h, h).to(memory_format=torch.channels_last)
    xi = x.clone()
    def run():
        conv.zero_grad(set_to_none=True); xi.grad = None
        conv(xi).backward(g)
    def fwd():
        with torch.no_grad(): conv(x)
    f = med(fwd)
    conv.weight.requires_grad_(False); xi.requires_grad_(True)
    ig = max(0.0, med(run) - f) if c > 1 else 0.0  # the first layer's input gradient is never needed
    conv.weight.requires_grad_(True); xi.requires_grad_(False)
    wg = max(0.0, med(run) - f)  # forward + gradient minus forward; clipped at 0 (timing noise)
    print(f"{h} {c} {o} {f:.3f} {ig:.3f} {wg:.3f}", flush=True)
'''


def layers(features: int, patch: int) -> list[tuple[int, int, int]]:
    """(map side, C_in, C_out) of the depth-2 U-Net's ten 3x3 layers, in network order."""
    f, p = features, patch
    return [(p, 1, f), (p, f, f), (p // 2, f, 2 * f), (p // 2, 2 * f, 2 * f),
            (p // 4, 2 * f, 4 * f), (p // 4, 4 * f, 4 * f),
            (p // 2, 4 * f, 2 * f), (p // 2, 2 * f, 2 * f), (p, 2 * f, f), (p, f, f)]


def ours(batch: int, shape: tuple[int, int, int], features: int) -> tuple[float, float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autostructn2v_jax import compile_options, models

    h, c, o = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, h, h, o)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)) * 0.1, jnp.float32)

    def jit(fn):
        return compile_options.network_jit(fn, features=features)

    fwd = jit(lambda x, k, g: models.reflect_conv3x3(x, k))
    igrad = jit(lambda x, k, g: jax.vjp(lambda a: models.reflect_conv3x3(a, k), x)[1](g)[0])
    wgrad = jit(lambda x, k, g: jax.vjp(lambda w: models.reflect_conv3x3(x, w), k)[1](g)[0])

    def med(fn, n=15):
        for _ in range(2):
            jax.block_until_ready(fn(x, k, g))
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(fn(x, k, g))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    return med(fwd), (med(igrad) if c > 1 else 0.0), med(wgrad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--torch", default="", help="a Python with torch: time the same layers in PyTorch")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    import jax

    from autostructn2v_jax import compile_options, models

    shapes = layers(args.features, args.patch)
    mine = {s: [] for s in shapes}
    theirs = {s: [] for s in shapes}
    for _ in range(args.rounds):
        for s in shapes:
            mine[s].append(ours(args.batch, s, args.features))
        if args.torch:
            out = subprocess.run([args.torch, "-c", TORCH_CHILD, str(args.batch)]
                                 + [f"{h}x{c}x{o}" for h, c, o in shapes],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.split("\n"):
                if line.strip():
                    h, c, o, *ms = line.split()
                    theirs[(int(h), int(c), int(o))].append(tuple(float(v) for v in ms))

    def median3(rows):
        return tuple(statistics.median(r[i] for r in rows) for i in range(3)) if rows else None

    lib = compile_options.network_library(args.features) if jax.default_backend() == "cpu" else "-"
    print(f"features {args.features}, patch {args.patch}, batch {args.batch}, backend {jax.default_backend()}, "
          f"CPU convolution library {lib}; ms, median of {args.rounds} rounds x 15 calls")
    print("| map | C_in -> C_out | conv | ours fwd / input grad / weight grad | PyTorch fwd / input grad / weight grad |")
    print("|---|---|---|---|---|")
    sums_o, sums_t = [0.0] * 3, [0.0] * 3
    for s in shapes:
        h, c, o = s
        mo, mt = median3(mine[s]), median3(theirs[s])
        impl = models.resolve_conv_impl("auto", models.conv3x3_flops((args.batch, h, h, c), o))
        sums_o = [a + b for a, b in zip(sums_o, mo)]
        t_txt = " / ".join(f"{v:.2f}" for v in mt) if mt else "-"
        if mt:
            sums_t = [a + b for a, b in zip(sums_t, mt)]
        print(f"| {h}x{h} | {c} -> {o} | {impl} | {' / '.join(f'{v:.2f}' for v in mo)} | {t_txt} |")
    t_sum = (" / ".join(f"{v:.1f}" for v in sums_t) + f" = **{sum(sums_t):.1f}**") if args.torch else "-"
    print(f"| sum | | | {' / '.join(f'{v:.1f}' for v in sums_o)} = **{sum(sums_o):.1f}** | {t_sum} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
