#!/usr/bin/env python
"""Speed benchmark of autostructn2v-jax (run by hand; not part of the test suite).

    python benchmarks/speed.py [--quick] [--json OUT]

Measures, on whatever backend JAX picks (CPU here):

1. steady-state training throughput (patches/s) of stage 1 and stage 2 through the real
   ``train.make_train_fn`` (on-device sampling, masking, replacement, augmentation, forward,
   backward, Adam) on an ``ImageBank`` held in device memory;
2. the same network's pure forward + backward + Adam step on fixed, pre-made batches, timed in
   the same run, interleaved round by round with (1); the ratio (1)/(2) is the share of the step
   time that is not lost to the data path (1.0 = free data path); the same model-only step with
   the stock XLA convolution (``conv_impl="xla"``) when ``auto`` picks another one, and with
   ``--scan`` the other dispatch mode of ``make_train_fn`` (lax.scan vs one dispatch per step);
3. achieved GFLOP/s of both steps (XLA cost analysis of the compiled step / step time) against
   the measured float32 matmul peak (a jitted 2048 x 2048 @ 2048 x 2048 matmul);
4. tiled prediction throughput (megapixels/s) of ``predict.predict_image`` on a 2048 x 2048 image;
5. structural-mask extraction time from 1000 patches of 64 x 64 (cold and warm);
6. compile times (model init, train step, model-only step, predict function).

The persistent compilation cache is disabled, so compile times are honest. Every figure is
printed with the 1-minute load average read right after it was measured: on a shared machine,
re-run when the load is above the number of cores. Timings are medians over rounds (the matmul
peak is the best of its repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax

# Honest compile times: never read or write the persistent compilation cache.
jax.config.update("jax_enable_compilation_cache", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from autostructn2v_jax import autocorr, compile_options, extraction, masking, models, parallel, predict, sampling, train  # noqa: E402
from autostructn2v_jax import config as config_lib  # noqa: E402

RESULTS: list[dict] = []


# --------------------------------------------------------------------------- helpers


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def record(name: str, value: float, unit: str, **extra) -> dict:
    row = dict(name=name, value=float(value), unit=unit, load1=load1(), **extra)
    RESULTS.append(row)
    note = f"  ({extra['note']})" if "note" in extra else ""
    print(f"  {name:<50s} {value:>12.4g} {unit:<10s} load {row['load1']:.2f}{note}", flush=True)
    return row


def block(tree):
    return jax.block_until_ready(tree)


def flops_of(compiled) -> float | None:
    """'flops' from a Compiled's cost analysis (a dict, or a list of dicts in older JAX)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import flax
    import optax

    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        flax=flax.__version__,
        optax=optax.__version__,
        numpy=np.__version__,
        use_scan=train.use_scan(),
        conv_impl=models.resolve_conv_impl("auto"),
        loadavg_start=[round(v, 2) for v in os.getloadavg()],
    )


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- 6a. model init compile


def bench_init_compile(features: int, depth: int) -> None:
    # models.init_variables jits once per (features, depth) and caches: first call = compile + run.
    t0 = time.perf_counter()
    block(models.init_variables(features, depth, 64, 0))
    cold = time.perf_counter() - t0
    warm = []
    for seed in (1, 2, 3):
        t0 = time.perf_counter()
        block(models.init_variables(features, depth, 64, seed))
        warm.append(time.perf_counter() - t0)
    w = statistics.median(warm)
    record("compile: models.init_variables", cold - w, "s", note=f"first call {cold:.2f} s, warm {w * 1e3:.1f} ms")


# --------------------------------------------------------------------------- 3a. matmul peak


def bench_matmul_peak(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    block(mm(a, b))
    block(mm(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(mm(a, b))
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = 2.0 * n**3 / best / 1e9
    record(f"matmul peak f32 {n}x{n}@{n}x{n}", peak, "GFLOP/s",
           note=f"best of {repeats}: {best * 1e3:.1f} ms, median {2.0 * n**3 / statistics.median(times) / 1e9:.1f} GFLOP/s")
    return peak


# --------------------------------------------------------------------------- 1-3. training


def make_model_only_step(apply_fn, options="chosen"):
    """Forward + backward + Adam on fixed batches: the train step minus the data path.
    ``options``: XLA compiler options ("chosen": what the package uses, compile_options)."""
    tx = train._optimizer()

    def step(state: train.TrainState, inputs, targets, masks):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, new_stats = apply_fn(variables, inputs[..., None], train=True)
            return masking.masked_mse(out[..., 0], targets, masks), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - state.learning_rate * u, state.params, updates)
        return state._replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state), loss

    if options == "chosen":
        return compile_options.network_jit(step, features=getattr(apply_fn, "features", None), donate_argnums=0)
    return jax.jit(step, donate_argnums=0, compiler_options=options)


def bench_stage(name: str, kernel: np.ndarray, patch: int, batch: int, pct: float, *,
                features: int, depth: int, n_planes: int, steps: int, rounds: int, warmup: int,
                peak: float, with_e2e_aot: bool, compare_conv: bool = True,
                compare_scan: bool = False) -> None:
    print(f"\n[{name}] patch {patch}, batch {batch}, features {features}, depth {depth}, "
          f"kernel {kernel.shape} ({int(kernel.sum())} px) at {pct}%, local_mean, augmentation on; "
          f"{rounds} interleaved rounds x {steps} steps; conv_impl auto = "
          f"{models.resolve_conv_impl('auto')}; CPU conv library {compile_options.network_library(features) if jax.default_backend() == 'cpu' else '-'}", flush=True)
    spec = train.StageSpec(
        name=name, patch_size=patch, batch_size=batch, features=features, num_layers=depth,
        mask_percentage=pct, strategy="local_mean", use_augmentation=True,
        steps_per_dispatch=steps, kernel=tuple(tuple(bool(v) for v in row) for row in kernel),
    )
    rng = np.random.default_rng(0)
    planes = [rng.standard_normal((512, 512)).astype(np.float32) for _ in range(n_planes)]
    # As train.train_stage does it: a 1-D data mesh, replicated bank and state, sharded batch.
    mesh = parallel.data_mesh(batch)
    replicated = parallel.replicated(mesh)
    bank = jax.device_put(sampling.make_bank(planes, patch), replicated)
    root = jax.random.fold_in(jax.random.key(0), 7)
    apply_fn = models.make_apply_fn(features, depth)
    fresh = lambda: jax.device_put(train.init_state(spec, 0, 1e-4), replicated)  # noqa: E731

    # Fixed batches for the model-only steps: drawn once by the same data path.
    fixed = jax.jit(lambda k: train.make_batch(k, bank, spec, augment=True))(jax.random.key(3))
    inputs, targets, masks = block(fixed)

    # Each runner does `steps` steps from its own state and blocks on the result.
    runners, states, compile_s, flops = {}, {}, {}, {}

    def add_e2e(label, scan):
        fn = train.make_train_fn(spec, apply_fn, parallel.batch_sharding(mesh), scan=scan)
        states[label] = fresh()
        t0 = time.perf_counter()
        states[label], losses = fn(states[label], bank, root)  # first call: compile + steps
        block(losses)
        compile_s[label] = time.perf_counter() - t0

        def run():
            states[label], losses = fn(states[label], bank, root)
            block((states[label], losses))
            return losses
        runners[label] = run

    def add_model_only(label, impl, options="chosen"):
        jitted = make_model_only_step(models.make_apply_fn(features, depth, impl), options)
        states[label] = fresh()
        t0 = time.perf_counter()
        compiled = jitted.lower(states[label], inputs, targets, masks).compile()
        compile_s[label] = time.perf_counter() - t0
        flops[label] = flops_of(compiled)

        def run():
            for _ in range(steps):
                states[label], loss = compiled(states[label], inputs, targets, masks)
            block((states[label], loss))
            return loss
        runners[label] = run

    add_e2e("e2e", None)
    add_model_only("model-only", "auto")
    if compare_conv and models.resolve_conv_impl("auto") != "xla":
        add_model_only("model-only stock conv", "xla")
    if compare_conv and jax.default_backend() == "cpu" and compile_options.network_options(features) is not None:
        # the package chose XLA's own convolution over YNNPACK (XLA's default): time the default too
        add_model_only("model-only YNNPACK conv", "auto", None)
    if compare_scan:
        add_e2e("e2e scan" if not train.use_scan() else "e2e per-step", not train.use_scan())
    for run in runners.values():  # one untimed chunk each after compilation
        run()
    for _ in range(warmup):
        for run in runners.values():
            run()

    # Interleaved rounds, rotating which one goes first.
    times = {k: [] for k in runners}
    labels = list(runners)
    last = {}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            last[label] = runners[label]()
            times[label].append((time.perf_counter() - t0) / steps)
    if not np.all(np.isfinite(np.asarray(last["e2e"]))):
        print(f"  WARNING: non-finite training loss in {name}", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    spread = lambda ts: f"min {min(ts) * 1e3:.0f} / max {max(ts) * 1e3:.0f} ms per step"  # noqa: E731
    nice = {"e2e": "train end-to-end (make_train_fn)", "model-only": "train model-only (fixed batch)",
            "model-only stock conv": "train model-only, stock XLA conv",
            "model-only YNNPACK conv": "train model-only, YNNPACK convolutions",
            "e2e scan": "train end-to-end, lax.scan", "e2e per-step": "train end-to-end, per-step dispatch"}
    for label in runners:
        record(f"{name}: {nice[label]}", batch / med[label], "patches/s",
               note=f"{med[label] * 1e3:.1f} ms/step, {spread(times[label])}", stage=name)
    ratios = [m / e for e, m in zip(times["e2e"], times["model-only"])]
    record(f"{name}: ratio end-to-end / model-only", med["model-only"] / med["e2e"], "x",
           note=f"per-round {min(ratios):.3f}..{max(ratios):.3f}; target >= 0.9", stage=name)
    if "model-only stock conv" in med:
        record(f"{name}: speed-up custom conv / stock conv", med["model-only stock conv"] / med["model-only"],
               "x", note="model-only steps, interleaved", stage=name)
    if "model-only YNNPACK conv" in med:
        record(f"{name}: speed-up chosen CPU conv library / YNNPACK", med["model-only YNNPACK conv"] / med["model-only"],
               "x", note=f"compile_options: {compile_options.network_library(features)}; model-only, interleaved", stage=name)
    for label in ("e2e scan", "e2e per-step"):
        if label in med:
            record(f"{name}: ratio {label.split(' ', 1)[1]} / default dispatch", med["e2e"] / med[label], "x",
                   note=f"default use_scan={train.use_scan()}", stage=name)
    record(f"{name}: compile train step (first call - steady)", compile_s["e2e"] - steps * med["e2e"], "s",
           note=f"first call of {steps} steps {compile_s['e2e']:.2f} s minus {steps} steady steps", stage=name)
    record(f"{name}: compile model-only step (AOT)", compile_s["model-only"], "s", stage=name)

    for label in ("model-only", "model-only stock conv"):
        if flops.get(label):
            g = flops[label] / med[label] / 1e9
            record(f"{name}: {label} GFLOP/s", g, "GFLOP/s",
                   note=f"{flops[label] / 1e9:.2f} GFLOP/step (XLA), {100 * g / peak:.1f}% of matmul peak",
                   stage=name)
    if with_e2e_aot:
        # The real step function with one step per call (on CPU: exactly the jitted step that
        # make_train_fn dispatches), compiled ahead of time for its compile time and XLA cost.
        spec1 = dataclasses.replace(spec, steps_per_dispatch=1)
        fn1 = train.make_train_fn(spec1, apply_fn, parallel.batch_sharding(mesh))
        t0 = time.perf_counter()
        compiled = compile_options.network_jit(fn1, features=features).lower(states["e2e"], bank, root).compile()
        record(f"{name}: compile train step (AOT, 1 step)", time.perf_counter() - t0, "s",
               note="jit(make_train_fn(steps_per_dispatch=1)).lower().compile()", stage=name)
        e2e_flops = flops_of(compiled)
        if e2e_flops:
            g = e2e_flops / med["e2e"] / 1e9
            record(f"{name}: train end-to-end GFLOP/s", g, "GFLOP/s",
                   note=f"{e2e_flops / 1e9:.2f} GFLOP/step (XLA), {100 * g / peak:.1f}% of matmul peak", stage=name)


# --------------------------------------------------------------------------- 4. prediction


def bench_predict(features: int, depth: int, size: int, repeats: int) -> None:
    print(f"\n[predict] {size}x{size} image, features {features}, depth {depth}, default tiles", flush=True)
    variables = jax.device_put(models.init_variables(features, depth, 64, 0))
    img = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
    plan = predict.tile_plan(img.shape, depth)
    # The tile forward predict_image jits (a fresh copy, not its cached one), compiled ahead of
    # time: its compile time and XLA cost per batch of 8 tiles.
    tiles = jnp.zeros((8, plan.tile, plan.tile, 1), jnp.float32)
    t0 = time.perf_counter()
    fwd = predict.make_predict_fn(models.apply_model, plan.tile, 8).lower(variables, tiles).compile()
    aot = time.perf_counter() - t0
    batch_flops = flops_of(fwd)
    t0 = time.perf_counter()
    out = predict.predict_image(variables, img)
    first = time.perf_counter() - t0
    assert out.shape == img.shape and np.all(np.isfinite(out))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict.predict_image(variables, img)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    tiles_n = plan.ny * plan.nx
    record(f"predict {size}x{size}", size * size / t / 1e6, "MP/s",
           note=f"{t:.2f} s/image (median of {repeats}); {tiles_n} tiles of {plan.tile} "
                f"(core {plan.core}, halo {plan.halo}), batch 8")
    n_batches = -(-tiles_n // 8)
    if batch_flops:
        g = batch_flops * n_batches / t / 1e9
        record("predict GFLOP/s", g, "GFLOP/s",
               note=f"{batch_flops * n_batches / 1e9:.0f} GFLOP/image (XLA, {n_batches} batches of 8 tiles)")
    record("compile: predict function (AOT)", aot, "s", note="make_predict_fn(...).lower().compile()")
    record("compile: predict function (first call - steady)", first - t, "s",
           note=f"first call {first:.2f} s minus steady call {t:.2f} s: noisy when the run dominates")


# --------------------------------------------------------------------------- 5. structural mask


def bench_structure(n: int, size: int, repeats: int) -> None:
    print(f"\n[structure] find_structural_mask on {n} patches of {size}x{size} (device array), default config",
          flush=True)
    cfg = config_lib.extractor_config()
    patches = jax.device_put(np.random.default_rng(2).standard_normal((n, size, size)).astype(np.float32))
    block(patches)
    t0 = time.perf_counter()
    mask, _ = extraction.find_structural_mask(patches, cfg)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extraction.find_structural_mask(patches, cfg)
        times.append(time.perf_counter() - t0)
    warm = statistics.median(times)
    # Split of the warm time: autocorrelation (device, jitted) vs extraction (host, numpy/scipy).
    acf_t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        acf = np.asarray(autocorr.autocorrelation(patches, normalize=True, log=True))
        acf_t.append(time.perf_counter() - t0)
    ext_t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extraction.extract_structural_mask(acf, {**cfg.to_dict(), "method": "ring"}, is_log=True)
        ext_t.append(time.perf_counter() - t0)
    record("structural mask: cold (incl. compile)", cold * 1e3, "ms", note=f"mask {int(mask.sum())} px")
    record("structural mask: warm", warm * 1e3, "ms",
           note=f"median of {repeats}: autocorrelation {statistics.median(acf_t) * 1e3:.1f} ms + "
                f"extraction {statistics.median(ext_t) * 1e3:.1f} ms")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps/repeats: a smoke check (< 1 min)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--scan", action="store_true",
                    help="also time the other dispatch mode (lax.scan on CPU, per-step on accelerators)")
    ap.add_argument("--no-stock-conv", action="store_true",
                    help="skip the model-only step with the stock XLA convolution")
    ap.add_argument("--train-only", action="store_true", help="training figures only (no predict/structure)")
    args = ap.parse_args(argv)

    q = args.quick
    features, depth = 32, 2
    cfg = dict(
        # Steps per timed chunk = steps_per_dispatch of make_train_fn (one block_until_ready per
        # chunk). The first (compiling) call runs one chunk, the model-only step gets one warm-up
        # chunk, then `rounds` chunks of each are timed, interleaved (e2e, mo, mo, e2e, ...).
        steps=2 if q else 5,
        rounds=2 if q else 4,  # full: 20 timed steps per stage and mode
        warmup=0,  # extra warm-up chunks of both after that
        stages=("stage1",) if q else ("stage1", "stage2"),  # quick: stage 1 only (< 1 min)
        n_planes=4,
        matmul_n=2048,
        matmul_repeats=3 if q else 10,
        predict_size=512 if q else 2048,  # quick: a 512 x 512 image (4 tiles) to stay short
        predict_repeats=1 if q else 2,
        structure_repeats=3 if q else 10,
        e2e_aot=not q,  # an extra AOT compile of the real step: its compile time and XLA cost
    )
    t_start = time.perf_counter()
    info = machine_info()
    print(f"autostructn2v-jax speed benchmark ({'quick' if q else 'full'})")
    for k in ("date", "backend", "cpu_model", "cpu_count", "jax", "jaxlib", "flax", "optax", "use_scan", "conv_impl",
              "loadavg_start"):
        print(f"  {k}: {info[k]}")
    if info["loadavg_start"][0] > (os.cpu_count() or 1):
        print("  WARNING: load average above the core count; figures will be pessimistic", flush=True)

    print("\n[init / matmul]", flush=True)
    bench_init_compile(features, depth)
    peak = bench_matmul_peak(cfg["matmul_n"], cfg["matmul_repeats"])

    common = dict(features=features, depth=depth, n_planes=cfg["n_planes"], steps=cfg["steps"],
                  rounds=cfg["rounds"], warmup=cfg["warmup"], peak=peak, with_e2e_aot=cfg["e2e_aot"],
                  compare_conv=not args.no_stock_conv, compare_scan=args.scan)
    if "stage1" in cfg["stages"]:
        bench_stage("stage1", masking.stage1_kernel(1), 64, 16, 15.0, **common)
    if "stage2" in cfg["stages"]:
        bench_stage("stage2", np.ones((1, 5), bool), 96, 16, 10.0, **common)
    if not args.train_only:
        bench_predict(features, depth, cfg["predict_size"], cfg["predict_repeats"])
        bench_structure(1000, 64, cfg["structure_repeats"])

    total = time.perf_counter() - t_start
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    info["total_seconds"] = round(total, 1)
    print(f"\nSummary ({'quick' if q else 'full'}, {total:.0f} s, load {info['loadavg_start']} -> "
          f"{info['loadavg_end']})")
    print(f"| {'measurement':<50s} | {'value':>10s} | {'unit':<9s} | load1 |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 11}|-------|")
    for r in RESULTS:
        print(f"| {r['name']:<50s} | {r['value']:>10.4g} | {r['unit']:<9s} | {r['load1']:5.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(machine=info, settings=dict(cfg, quick=q, features=features, depth=depth),
                           results=RESULTS, command=" ".join([os.path.basename(sys.executable)] + sys.argv)),
                      fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
