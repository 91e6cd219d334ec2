"""Quality benchmark on images with known ground truth: our pipeline beside NL-means and BM3D.

    python benchmarks/quality.py [--epochs 8] [--out bench_quality]
    python benchmarks/quality.py --config configs/default.py --budgets 5,15,30   # minutes per run
    python benchmarks/quality.py --rescore --out bench_quality                    # tables of runs made

Clean images: every non-overlapping 128x128 crop ([0, 1]) of scikit-image's bundled camera,
coins, moon and brick images (54 crops: the data of issue 12), or 16 synthetic cell images
(`synth.clean_image`, 128x128). Cases: `white`
(Gaussian sigma 0.1) and `hcorr` (N(0,1) convolved along x with a length-5 box, rescaled to std
0.08, plus independent Gaussian std 0.04) on the photo crops (the same noisy crops as
`benchmarks/classical.py` and `benchmarks/posterior.py`), and `cells_white` / `cells_hcorr` on the
cells. For each case the full pipeline runs with `--config` (default `configs/demo.py`; 50 patches
per image per epoch, `--epochs` epochs, or until a `--budgets` time budget in minutes for the whole
run is spent); reported: PSNR (data range 1, as for the classical methods) and SSIM of the noisy
input, the stage-1 and the final output against the clean images, and the mask found.
With `--classical` (default) each case also gets NL-means (scikit-image, sigma given) and BM3D
(sigma given; for the `hcorr` cases also given the exact noise spectrum) rows on the same noisy
images; BM3D runs in the peers venv (`benchmarks/classical.py`) and is skipped without it.
Needs the `bench` extra (scikit-image).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np
import tifffile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402

from autostructn2v_jax import api, cli, compile_options, synth  # noqa: E402

NAMES = ("camera", "coins", "moon", "brick")
CASES = ("white", "hcorr", "cells_white", "cells_hcorr")


def _photos() -> list[np.ndarray]:
    """The four bundled photos as float32 in [0, 1]."""
    import skimage.data

    out = []
    for name in NAMES:
        img = getattr(skimage.data, name)().astype(np.float32)
        out.append((img - img.min()) / max(float(img.max() - img.min()), 1e-6))
    return out


def clean_crops(size: int = 128, per_image: int = 4, seed: int = 0) -> list[np.ndarray]:
    """``per_image`` random ``size`` crops of each photo (the 16-crop set of earlier sessions)."""
    rng = np.random.default_rng(seed)
    crops = []
    for img in _photos():
        for _ in range(per_image):
            y = int(rng.integers(0, img.shape[0] - size + 1))
            x = int(rng.integers(0, img.shape[1] - size + 1))
            crops.append(img[y:y + size, x:x + size].copy())
    return crops


def grid_crops(size: int = 128) -> list[np.ndarray]:
    """Every non-overlapping ``size`` crop of the four photos, row by row (54 at 128): the data set of
    issue 12, on which its NL-means and BM3D figures were made."""
    return [img[y:y + size, x:x + size].copy() for img in _photos()
            for y in range(0, img.shape[0] - size + 1, size) for x in range(0, img.shape[1] - size + 1, size)]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=float(a.max() - a.min()) or 1.0))


def clean_images(case: str, seed: int = 0) -> list[np.ndarray]:
    """The clean set of a case: the 54 photo crops, or 16 synthetic cell images for `cells_*`."""
    if case.startswith("cells_"):
        rng = np.random.default_rng(seed + 100)
        return [synth.clean_image(rng, 128) for _ in range(16)]
    return grid_crops()


def noise_kind(case: str) -> str:
    return case.split("_", 1)[1] if case.startswith("cells_") else case


def noisy_images(case: str, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(clean, noisy) of a case; the photo cases draw the same noise as classical.noisy_crops and
    benchmarks/posterior.py (stream 0 for white, 1 for hcorr)."""
    if case not in CASES:
        raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    rng = np.random.default_rng(seed + CASES.index(case))
    clean = clean_images(case, seed)
    return clean, [synth.add_noise(rng, img, noise_kind(case)) for img in clean]


def write_case(case: str, folder: pathlib.Path, seed: int = 0) -> list[np.ndarray]:
    clean, noisy = noisy_images(case, seed)
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("noisy", "clean"):
        (folder / sub).mkdir(parents=True)
    for i, (img, z) in enumerate(zip(clean, noisy)):
        tifffile.imwrite(folder / "clean" / f"{i:02d}.tif", img)
        tifffile.imwrite(folder / "noisy" / f"{i:02d}.tif", z)
    return clean


def score(folder: pathlib.Path) -> dict:
    """PSNR (data range 1) / SSIM of the noisy input, stage 1 and the final output of a run folder."""
    clean = [tifffile.imread(p) for p in sorted((folder / "clean").glob("*.tif"))]
    names = [p.name for p in sorted((folder / "clean").glob("*.tif"))]
    metrics = {}
    for label, sub in (("noisy", folder / "noisy"), ("stage1", folder / "run/stage1/denoised"),
                       ("final", folder / "run/stage2/denoised")):
        if not sub.is_dir():
            continue
        imgs = [tifffile.imread(sub / n) for n in names]
        metrics[label] = dict(psnr=float(np.mean([synth.psnr(c, x, data_range=1.0) for c, x in zip(clean, imgs)])),
                              ssim=float(np.mean([ssim(c, x) for c, x in zip(clean, imgs)])))
    if "final" not in metrics:
        metrics["final"] = metrics["stage1"]
    return metrics


def run_case(case: str, out: pathlib.Path, epochs: int, seed: int = 0, config: str = "configs/demo.py",
             budget: float = 0.0, **overrides) -> dict:
    folder = out / (f"{case}_{budget:g}min" if budget else case)
    n_images = len(write_case(case, folder, seed))
    # configs/demo.py with the same patches per epoch as the demo (4 images x 200 = 800)
    # With a time budget (minutes, whole run) the epochs are only a ceiling: the budget stops training.
    budget_keys = {"time_budget_minutes": budget, "num_epochs": 100000, "early_stopping": False} if budget else {}
    cfg = api.load_config(config, input_dir=str(folder / "noisy"), output_dir=str(folder / "run"),
                          clean_dir=str(folder / "clean"),
                          **{"num_epochs": epochs, "stage1.patches_per_image": max(1, 800 // n_images),
                             "stage2.patches_per_image": max(1, 800 // n_images), **budget_keys, **overrides})
    t0 = time.perf_counter()
    summary = api.run(cfg)
    seconds = time.perf_counter() - t0
    mask_path = folder / "run/mask/structural_mask.npy"  # absent when stage 2 was not run
    mask = np.load(mask_path).astype(int).tolist() if mask_path.is_file() else None
    row = dict(case=case, seconds=seconds, budget=budget, config=config, folder=str(folder),
               mask=summary["stages"].get("stage2", {}).get("mask", "-"), mask_array=mask, **score(folder))
    (folder / "row.json").write_text(json.dumps(row, indent=2))
    return row


def classical_rows(case: str, bm3d_python: str, seed: int = 0) -> list[dict]:
    """NL-means (sigma given) and BM3D rows on the case's noisy images (`benchmarks/classical.py`)."""
    import classical

    clean, noisy = (np.stack(a) for a in noisy_images(case, seed))
    sigma = classical.SIGMA[noise_kind(case)]
    out, seconds, _ = classical.nl_means(noisy, sigma)
    rows = [dict(case=case, method="NL-means, sigma given", psnr=classical.psnr_mean(clean, out), seconds=seconds)]
    for r in classical.bm3d_rows(noise_kind(case), clean, noisy, bm3d_python):
        rows.append(dict(r, case=case))
    return rows


def print_table(rows: list[dict], classical: list[dict]) -> None:
    print("| case | method | budget | PSNR (dB, range 1) / SSIM | stage 1 | mask | time |")
    print("|---|---|---|---|---|---|---|")
    for case in dict.fromkeys([r["case"] for r in rows] + [r["case"] for r in classical]):
        mine = [r for r in rows if r["case"] == case]
        if mine:
            n = mine[0]["noisy"]
            print(f"| {case} | noisy input | - | {n['psnr']:.2f} / {n['ssim']:.3f} | - | - | - |")
        for r in mine:
            budget = f"{r['budget']:g} min" if r["budget"] else "epochs"
            f, s1 = r["final"], r.get("stage1")  # no stage-1 row when stage 1 was not run
            s1_text = f"{s1['psnr']:.2f} / {s1['ssim']:.3f}" if s1 else "-"
            print(f"| {case} | ours ({r['config']}) | {budget} | **{f['psnr']:.2f}** / {f['ssim']:.3f} | "
                  f"{s1_text} | {r['mask']} | {r['seconds']:.0f} s |")
        for r in (r for r in classical if r["case"] == case):
            print(f"| {case} | {r['method']} | - | {r['psnr']:.2f} | - | - | {r['seconds']:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="bench_quality")
    parser.add_argument("--cases", default="white,hcorr", help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--budgets", default="", help="comma-separated training budgets in minutes (whole run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. --set stage2.extractor.method=significance")
    parser.add_argument("--no-classical", dest="classical", action="store_false",
                        help="leave out the NL-means and BM3D rows")
    parser.add_argument("--bm3d-python", default=str(pathlib.Path(__file__).resolve().parent / ".peers-venv/bin/python"))
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score the run folders under --out again (row.json files)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    cases = [c for c in args.cases.split(",") if c]
    if args.rescore:
        rows = []
        for path in sorted(out.glob("*/row.json")):
            row = json.loads(path.read_text())
            if row["case"] in cases:
                rows.append(dict(row, **score(pathlib.Path(row["folder"]))))
    else:
        overrides = dict(item.split("=", 1) for item in args.set)
        budgets = [float(b) for b in args.budgets.split(",") if b] or [0.0]
        # The CPU device split that `autostructn2v train` would choose (before JAX starts).
        cfg = api.load_config(args.config, **overrides)
        cli.split_cpu_for_config(cfg)
        print(f"{jax.device_count()} {jax.default_backend()} device(s); CPU convolutions: "
              f"{[compile_options.network_library(st.features) for st in (cfg.stage1, cfg.stage2)]}", flush=True)
        rows = [run_case(case, out, args.epochs, config=args.config, budget=b, **overrides)
                for b in budgets for case in cases]
        print(f"overrides {overrides or '-'}")
    rows.sort(key=lambda r: (cases.index(r["case"]), r["budget"]))
    classical = [r for case in cases for r in classical_rows(case, args.bm3d_python)] if args.classical else []
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(ours=rows, classical=classical), indent=2))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print_table(rows, classical)


if __name__ == "__main__":
    main()
