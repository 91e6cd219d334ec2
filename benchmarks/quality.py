"""Quality benchmark on images with known ground truth.

    python benchmarks/quality.py [--epochs 8] [--out bench_quality]
    python benchmarks/quality.py --config configs/default.py --budgets 5,15,30   # minutes per run

Clean images: 128x128 crops ([0, 1]) of scikit-image's bundled camera, coins, moon and brick
images (4 crops each). Two noise cases: `white` (Gaussian sigma 0.1) and `hcorr` (N(0,1) convolved
along x with a length-5 box, rescaled to std 0.08, plus independent Gaussian std 0.04). For each
case the full pipeline runs with `configs/demo.py` (features 16, patch 64, batch 16, 50 patches per
crop per epoch, `--epochs` epochs); reported: PSNR and SSIM of the noisy input,
the stage-1 and the final output against the clean images, and the extracted mask.
Needs the `bench` extra (scikit-image).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import numpy as np
import tifffile

from autostructn2v_jax import api, synth

NAMES = ("camera", "coins", "moon", "brick")


def clean_crops(size: int = 128, per_image: int = 4, seed: int = 0) -> list[np.ndarray]:
    import skimage.data

    rng = np.random.default_rng(seed)
    crops = []
    for name in NAMES:
        img = getattr(skimage.data, name)().astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        for _ in range(per_image):
            y = int(rng.integers(0, img.shape[0] - size + 1))
            x = int(rng.integers(0, img.shape[1] - size + 1))
            crops.append(img[y:y + size, x:x + size].copy())
    return crops


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=float(a.max() - a.min()) or 1.0))


def run_case(case: str, out: pathlib.Path, epochs: int, seed: int = 0, config: str = "configs/demo.py",
             budget: float = 0.0, **overrides) -> dict:
    rng = np.random.default_rng(seed + (0 if case == "white" else 1))
    folder = out / case
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("noisy", "clean"):
        (folder / sub).mkdir(parents=True)
    clean = clean_crops(seed=seed)
    for i, img in enumerate(clean):
        tifffile.imwrite(folder / "clean" / f"{i:02d}.tif", img)
        tifffile.imwrite(folder / "noisy" / f"{i:02d}.tif", synth.add_noise(rng, img, case))
    # configs/demo.py with the same patches per epoch as the demo (4 images x 200): 16 crops x 50
    # With a time budget (minutes, whole run) the epochs are only a ceiling: the budget stops training.
    budget_keys = {"time_budget_minutes": budget, "num_epochs": 100000, "early_stopping": False} if budget else {}
    cfg = api.load_config(config, input_dir=str(folder / "noisy"), output_dir=str(folder / "run"),
                          clean_dir=str(folder / "clean"),
                          **{"num_epochs": epochs, "stage1.patches_per_image": 50,
                             "stage2.patches_per_image": 50, **budget_keys, **overrides})
    t0 = time.perf_counter()
    summary = api.run(cfg)
    seconds = time.perf_counter() - t0
    metrics = {}
    for label, sub in (("noisy", folder / "noisy"), ("stage1", folder / "run/stage1/denoised"),
                       ("final", folder / "run/stage2/denoised")):
        imgs = [tifffile.imread(sub / f"{i:02d}.tif") for i in range(len(clean))]
        metrics[label] = dict(psnr=float(np.mean([synth.psnr(c, x) for c, x in zip(clean, imgs)])),
                              ssim=float(np.mean([ssim(c, x) for c, x in zip(clean, imgs)])))
    mask = np.load(folder / "run/mask/structural_mask.npy")
    return dict(case=case, seconds=seconds, budget=budget, config=config, mask=summary["stages"]["stage2"]["mask"],
                mask_array=mask.astype(int).tolist(), **metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="bench_quality")
    parser.add_argument("--cases", default="white,hcorr")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--budgets", default="", help="comma-separated training budgets in minutes (whole run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. --set stage2.extractor.method=significance")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    overrides = dict(item.split("=", 1) for item in args.set)
    budgets = [float(b) for b in args.budgets.split(",") if b] or [0.0]
    rows = [run_case(case, out, args.epochs, config=args.config, budget=b, **overrides)
            for b in budgets for case in args.cases.split(",")]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"config {args.config}, overrides {overrides or '-'}")
    print("| case | budget | noisy PSNR / SSIM | stage 1 | final | mask | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]['psnr']:.2f} dB / {r[k]['ssim']:.3f}" for k in ("noisy", "stage1", "final")]
        budget = f"{r['budget']:g} min" if r["budget"] else "epochs"
        print(f"| {r['case']} | {budget} | " + " | ".join(cells) + f" | {r['mask']} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
