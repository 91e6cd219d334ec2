#!/usr/bin/env python
"""Side-by-side peer benchmark: our step and stage 1 against PyTorch and CAREamics (run by hand).

    python benchmarks/peers.py [--careamics-steps 1000] [--our-steps 1000] [--noise white,xcorr]
                               [--rounds 3] [--json OUT] [--setup-only]

One run prints, measured on this machine in the same run:

(a) patches/s of our train step (model only, fixed batch; custom and stock XLA convolution)
    against the same U-Net in PyTorch (``../shared/bench/torch_unet_step.py``, run as a
    subprocess in the peers venv), interleaved round by round, with the ratios;
(b) CAREamics N2V for ``--careamics-steps`` steps against our stage 1 at the same features,
    depth, patch and batch, on crops of scikit-image's bundled photographs with white noise
    (sigma 0.1) and with noise correlated along x: PSNR reached, training wall time, and our
    training time to reach CAREamics' final PSNR (PSNR checks are not counted in our time);
(c) prediction throughput (MP/s) of our ``predict_image`` against ``CAREamist.predict`` on the
    same 1024 x 1024 image.

CAREamics and PyTorch live in a separate venv, ``benchmarks/.peers-venv`` (built on first use;
never a runtime dependency). PyTorch is pinned to the CPU wheel that lies on this machine's disk
(``torch==2.13.0``). No CAREamics release accepts a torchvision that works beside that wheel
(PyPI's torchvision is a CUDA build), and CAREamics imports torchvision only for its LVAE models
and model export, so the venv gets a small stand-in ``torchvision`` module that raises if used.
Nothing is downloaded at run time: the photographs ship with scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
VENV = HERE / ".peers-venv"
VPY = VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"
CAREAMICS_PIN = "careamics==0.3.5"
# careamics 0.3.5's own requirements, without torchvision (see the module docstring).
CAREAMICS_DEPS = [
    "bioimageio-core>=0.9.0,<=0.11.0", "lightning>=2.2,<=2.6.6,!=2.6.2,!=2.6.3",
    "matplotlib<=3.11.2", "microssim<=0.0.5", "numpy>=1.21,<=2.4.6", "pillow<=13.0.0",
    "psutil<=7.2.2", "pydantic>=2.11,<=2.14.1", "pyyaml<=6.0.3,!=6.0.0", "scikit-image<=0.26.0",
    "tifffile<=2026.3.3", "torchmetrics>0.7.0,<1.9.0", "zarr>=3.0.0,<4.0.0",
]
_STUB = '''def __getattr__(name):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {__name__}.{name} is not available")
    return unavailable
'''
TORCH_SCRIPT = HERE.parent.parent / "shared" / "bench" / "torch_unet_step.py"
FEATURES, DEPTH, PATCH, BATCH = 32, 2, 64, 16


# --------------------------------------------------------------------------- peers venv


def ensure_venv() -> None:
    """Build benchmarks/.peers-venv with torch (CPU wheel) and CAREamics, once."""
    marker = VENV / ".installed"
    if marker.exists():
        return
    print(f"building {VENV} (torch {TORCH_PIN}, {CAREAMICS_PIN}) ...", flush=True)
    py = os.environ.get("PYTHON", "python3")
    if not VPY.exists():
        subprocess.run([py, "-m", "venv", str(VENV)], check=True)
    pip = [str(VPY), "-m", "pip", "install", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = pathlib.Path(tmp) / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        subprocess.run(pip + [TORCH_PIN], check=True)
        subprocess.run(pip + ["--no-deps", CAREAMICS_PIN], check=True)
        subprocess.run(pip + ["-c", str(constraints)] + CAREAMICS_DEPS, check=True)
    site = next((VENV / "lib").glob("python3*/site-packages"))
    stub = site / "torchvision"
    for sub in ("", "models", "transforms"):
        (stub / sub).mkdir(parents=True, exist_ok=True)
        (stub / sub / "__init__.py").write_text(
            ('__version__ = "0.0.0+stand-in"\n' if sub == "" else "") + (_STUB if sub else ""))
    (stub / "transforms" / "functional.py").write_text(_STUB)
    subprocess.run([str(VPY), "-c", "import careamics, torch"], check=True)
    marker.write_text("ok\n")


# --------------------------------------------------------------------------- data


def photo_crops(size: int = 128, per_image: int = 4) -> np.ndarray:
    """(N, size, size) float32 in [0, 1]: crops of scikit-image's bundled photographs (grey)."""
    from skimage import color, data as skdata

    crops = []
    for name in ("camera", "astronaut", "coffee", "chelsea"):
        img = getattr(skdata, name)()
        img = color.rgb2gray(img) if img.ndim == 3 else img / 255.0
        img = np.asarray(img, np.float32)
        h, w = img.shape
        ys = np.linspace(0, h - size, 2).astype(int)
        xs = np.linspace(0, w - size, per_image // 2).astype(int)
        crops += [img[y:y + size, x:x + size] for y in ys for x in xs]
    return np.stack(crops)


def add_noise(clean: np.ndarray, kind: str, sigma: float = 0.1, seed: int = 0) -> np.ndarray:
    """White Gaussian noise, or the same smoothed along x by a 3-tap box (std kept at sigma)."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal(clean.shape)
    if kind == "xcorr":
        n = (n + np.roll(n, 1, axis=-1) + np.roll(n, -1, axis=-1)) / np.sqrt(3.0)
    elif kind != "white":
        raise ValueError(f"unknown noise {kind!r}")
    return (clean + sigma * n).astype(np.float32)


def psnr(pred: np.ndarray, clean: np.ndarray) -> float:
    """Mean over images of PSNR with data range 1."""
    mse = np.mean((pred.astype(np.float64) - clean) ** 2, axis=(-2, -1))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def big_image() -> np.ndarray:
    from skimage import data as skdata

    cam = skdata.camera().astype(np.float32) / 255.0
    return add_noise(np.tile(cam, (2, 2)), "white", seed=5)


# --------------------------------------------------------------------------- CAREamics worker


def _as_array(out) -> np.ndarray:
    """CAREamist.predict's result (an array, a list of arrays, or (arrays, sources)) as one array."""
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, list):
        return np.concatenate([np.asarray(a).reshape(-1, *np.shape(a)[-2:]) for a in out])
    return np.asarray(out)


def careamics_worker(workdir: str, steps: int) -> None:
    """Runs inside the peers venv: train CAREamics N2V on workdir/noisy.npy, predict, time."""
    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config

    torch.set_num_threads(os.cpu_count() or 1)
    wd = pathlib.Path(workdir)
    noisy = np.load(wd / "noisy.npy")
    # An epoch is one pass over the patches CAREamics cuts from the crops (a few batches), so the
    # step count is set by Lightning's max_steps, with epochs to spare.
    cfg = create_advanced_n2v_config(
        experiment_name="peers", data_type="array", axes="SYX", patch_size=[PATCH, PATCH],
        batch_size=BATCH, num_epochs=steps,
        model_params={"depth": DEPTH, "num_channels_init": FEATURES}, num_workers=0, seed=1,
        trainer_params={"enable_progress_bar": False, "max_steps": steps},
    )
    cam = CAREamist(cfg, work_dir=str(wd / "careamics"))
    t0 = time.perf_counter()
    cam.train(train_data=noisy)
    train_s = time.perf_counter() - t0
    pred = _as_array(cam.predict(noisy, axes="SYX", data_type="array")).reshape(noisy.shape)
    big = np.load(wd / "big.npy")
    cam.predict(big[:256, :256], axes="YX", data_type="array", tile_size=(256, 256))  # warm up
    t0 = time.perf_counter()
    cam.predict(big, axes="YX", data_type="array", tile_size=(256, 256), tile_overlap=(48, 48))
    pred_s = time.perf_counter() - t0
    np.save(wd / "careamics_pred.npy", pred.astype(np.float32))
    (wd / "careamics.json").write_text(json.dumps(dict(train_s=train_s, predict_s=pred_s,
                                                       steps=int(cam.trainer.global_step),
                                                       torch=torch.__version__)))


# --------------------------------------------------------------------------- ours


def our_step_runner(conv_impl: str):
    import jax

    from autostructn2v_jax import models, train
    sys.path.insert(0, str(HERE))
    from speed import make_model_only_step

    spec = _spec(PATCH)
    step = make_model_only_step(models.make_apply_fn(FEATURES, DEPTH, conv_impl))
    state = [train.init_state(spec, 0, 1e-4)]
    x = jax.random.normal(jax.random.key(0), (BATCH, PATCH, PATCH))
    t = jax.random.normal(jax.random.key(1), (BATCH, PATCH, PATCH))
    m = jax.random.uniform(jax.random.key(2), (BATCH, PATCH, PATCH)) < 0.15

    def run(n: int) -> float:  # median seconds per step over n steps
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            state[0], loss = step(state[0], x, t, m)
            jax.block_until_ready((state[0], loss))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    run(3)
    return run


def _spec(patch: int):
    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import masking, train

    s1 = config_lib.base_config().stage1
    kernel = masking.stage1_kernel(1)
    return train.StageSpec(
        name="stage1", patch_size=patch, batch_size=BATCH, features=FEATURES, num_layers=DEPTH,
        mask_percentage=float(s1.mask_percentage), strategy="local_mean", use_augmentation=True,
        steps_per_dispatch=1, kernel=tuple(tuple(bool(v) for v in row) for row in kernel))


def torch_step() -> tuple[float, str]:
    out = subprocess.run([str(VPY), str(TORCH_SCRIPT), f"threads={os.cpu_count() or 1}"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    ms = float(out.split(" ms/step")[0].rsplit(" ", 1)[-1])
    return ms / 1e3, out


def train_ours(noisy: np.ndarray, clean: np.ndarray, steps: int, eval_every: int, lr: float):
    """Our stage-1 step on the noisy crops; PSNR after every `eval_every` steps (untimed)."""
    import dataclasses

    import jax

    from autostructn2v_jax import models, predict, preprocess, sampling, train

    normed = [preprocess.normalize(p) for p in noisy]
    spec = dataclasses.replace(_spec(PATCH), steps_per_dispatch=eval_every)
    bank = jax.device_put(sampling.make_bank([n for n, _ in normed], PATCH))
    apply_fn = models.make_apply_fn(FEATURES, DEPTH)
    fn = train.make_train_fn(spec, apply_fn)
    state = train.init_state(spec, 0, lr)
    root = jax.random.key(11)
    state, losses = fn(state, bank, root)  # compile (not timed) ...
    jax.block_until_ready(losses)
    state = train.init_state(spec, 0, lr)  # ... and start again from scratch
    trace, elapsed = [], 0.0
    while int(state.step) < steps:
        t0 = time.perf_counter()
        state, losses = fn(state, bank, root)
        jax.block_until_ready((state, losses))
        elapsed += time.perf_counter() - t0
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        pred = np.stack([preprocess.denormalize(predict.predict_image(variables, n), st) for n, st in normed])
        trace.append((int(state.step), elapsed, psnr(pred, clean)))
    return trace, {"params": state.params, "batch_stats": state.batch_stats}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--careamics-steps", type=int, default=1000)
    ap.add_argument("--our-steps", type=int, default=None, help="default: as many as CAREamics")
    ap.add_argument("--eval-every", type=int, default=25, help="our PSNR check interval (steps)")
    ap.add_argument("--lr", type=float, default=None, help="our learning rate (default: config stage1)")
    ap.add_argument("--noise", default="white,xcorr")
    ap.add_argument("--rounds", type=int, default=3, help="(a): interleaved rounds")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--careamics-worker", nargs=2, metavar=("DIR", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.careamics_worker:
        careamics_worker(args.careamics_worker[0], int(args.careamics_worker[1]))
        return 0
    ensure_venv()
    if args.setup_only:
        return 0

    from autostructn2v_jax import config as config_lib
    from autostructn2v_jax import models, predict

    skip = set(filter(None, args.skip.split(",")))
    lr = args.lr or float(config_lib.base_config().stage1.learning_rate)
    results = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_start=os.getloadavg(),
                   conv_impl=models.resolve_conv_impl("auto"), args=vars(args))
    print(f"peers benchmark {results['date']}, load {os.getloadavg()[0]:.2f}, conv_impl auto = "
          f"{results['conv_impl']}", flush=True)

    if "a" not in skip:
        print(f"\n(a) train step, U-Net features {FEATURES}, depth {DEPTH}, patch {PATCH}, batch {BATCH}")
        ours = {impl: our_step_runner(impl) for impl in ("auto", "xla")}
        rows = {"ours": [], "ours stock conv": [], "pytorch": []}
        torch_line = ""
        for _ in range(args.rounds):
            rows["ours"].append(ours["auto"](5))
            rows["ours stock conv"].append(ours["xla"](5))
            s, torch_line = torch_step()
            rows["pytorch"].append(s)
        med = {k: statistics.median(v) for k, v in rows.items()}
        for k, v in med.items():
            print(f"  {k:<16s} {BATCH / v:7.1f} patches/s  ({v * 1e3:.0f} ms/step)")
        print(f"  ratio ours / pytorch: {med['pytorch'] / med['ours']:.2f}x;  stock conv / pytorch: "
              f"{med['pytorch'] / med['ours stock conv']:.2f}x;  load {os.getloadavg()[0]:.2f}")
        print(f"  ({torch_line})")
        results["a"] = dict(seconds_per_step=med, torch=torch_line, load=os.getloadavg()[0])

    if "b" not in skip or "c" not in skip:
        clean = photo_crops()
        big = big_image()
        for kind in args.noise.split(","):
            noisy = add_noise(clean, kind)
            with tempfile.TemporaryDirectory() as wd:
                np.save(pathlib.Path(wd) / "noisy.npy", noisy)
                np.save(pathlib.Path(wd) / "big.npy", big)
                print(f"\n(b) {kind} noise: {len(noisy)} crops {noisy.shape[1:]}, noisy PSNR "
                      f"{psnr(noisy, clean):.2f} dB; CAREamics {args.careamics_steps} steps ...", flush=True)
                subprocess.run([str(VPY), __file__, "--careamics-worker", wd, str(args.careamics_steps)],
                               check=True, stdout=subprocess.DEVNULL)
                ct = json.loads((pathlib.Path(wd) / "careamics.json").read_text())
                c_psnr = psnr(np.load(pathlib.Path(wd) / "careamics_pred.npy"), clean)
            steps = args.our_steps or args.careamics_steps
            trace, variables = train_ours(noisy, clean, steps, args.eval_every, lr)
            reach = next(((s, t) for s, t, p in trace if p >= c_psnr), None)
            final = trace[-1]
            print(f"  CAREamics: {c_psnr:.2f} dB after {ct['steps']} steps in {ct['train_s']:.0f} s")
            print(f"  ours:      {final[2]:.2f} dB after {final[0]} steps in {final[1]:.0f} s (lr {lr:g})")
            if reach:
                print(f"  ours reach {c_psnr:.2f} dB after {reach[0]} steps, {reach[1]:.0f} s = "
                      f"{reach[1] / ct['train_s']:.2f}x CAREamics' time (goal <= 0.5x)")
            else:
                print("  ours did not reach CAREamics' PSNR within the steps run")
            row = dict(careamics_psnr=c_psnr, careamics_train_s=ct["train_s"], ours_trace=trace,
                       ours_reach=reach, load=os.getloadavg()[0])
            if "c" not in skip and kind == args.noise.split(",")[0]:
                predict.predict_image(variables, big[:256, :256])
                predict.predict_image(variables, big)  # compile the full-size plan
                t0 = time.perf_counter()
                predict.predict_image(variables, big)
                ours_s = time.perf_counter() - t0
                mp = big.size / 1e6
                print(f"\n(c) predict {big.shape}: ours {mp / ours_s:.2f} MP/s, CAREamics "
                      f"{mp / ct['predict_s']:.2f} MP/s, ratio {ct['predict_s'] / ours_s:.2f}x (goal >= 1.0x)")
                results["c"] = dict(ours_s=ours_s, careamics_s=ct["predict_s"], megapixels=mp)
            results.setdefault("b", {})[kind] = row
    results["load_end"] = os.getloadavg()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
