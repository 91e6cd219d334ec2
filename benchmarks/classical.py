"""Classical reference denoisers on the photo crops of `benchmarks/quality.py`: NL-means and BM3D.

    python benchmarks/classical.py [--json classical.json] [--ours bench_posterior/results.json]

The 54 clean crops of `benchmarks/quality.py` (every non-overlapping 128x128 crop of scikit-image's
camera, coins, moon, brick; [0, 1]; the data of issue 12) and the same noise cases and seeds
(`white`: Gaussian sigma 0.1; `hcorr`: length-5 box-correlated std 0.08 along x + independent std
0.04). Rows:

* NL-means (scikit-image, `fast_mode`, its default patch 7 and distance 11, h = 0.8 sigma; the
  setting of issue 12's figures) with sigma given (the
  total noise std) and with sigma estimated from the noisy crop (a high-pass MAD).
* BM3D (the `bm3d` package) with sigma given and, for `hcorr`, given the exact noise power
  spectrum. `bm3d` is a benchmark-only peer: it runs in a separate virtual environment
  (`--bm3d-python`, default `benchmarks/.peers-venv/bin/python`; make it with
  `python -m venv benchmarks/.peers-venv && benchmarks/.peers-venv/bin/pip install bm3d`), fed
  through a temporary .npz file; the row is skipped when that interpreter is missing.

PSNR with data range 1, averaged over the crops; seconds are the total for the 54 crops.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from autostructn2v_jax import synth  # noqa: E402
from autostructn2v_jax.files import atomic_write_text  # noqa: E402
from quality import grid_crops  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
SIGMA = {"white": 0.1, "hcorr": float(np.sqrt(0.08**2 + 0.04**2))}

_BM3D_SCRIPT = r"""
import sys, time, numpy as np, bm3d
z = np.load(sys.argv[1])
noisy = z["noisy"]
out = {}
t0 = time.perf_counter()
out["sigma"] = np.stack([bm3d.bm3d(x, sigma_psd=float(z["sigma"])) for x in noisy])
out["sigma_seconds"] = np.array(time.perf_counter() - t0)
if "psd" in z.files:
    t0 = time.perf_counter()
    out["psd"] = np.stack([bm3d.bm3d(x, sigma_psd=z["psd"]) for x in noisy])
    out["psd_seconds"] = np.array(time.perf_counter() - t0)
np.savez(sys.argv[2], **out)
"""


def noisy_crops(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) stacks of the 54 crops, drawn as `quality.noisy_images` draws them."""
    rng = np.random.default_rng(1 if case == "hcorr" else 0)
    clean = np.stack(grid_crops())
    return clean, np.stack([synth.add_noise(rng, c, case) for c in clean])


def hcorr_psd(shape: tuple[int, int]) -> np.ndarray:
    """Noise power spectrum of `hcorr` in the `bm3d` convention (|FFT(kernel)|^2 * H * W for noise
    = kernel * unit white noise): box of 5 along x scaled to std 0.08, plus white std 0.04."""
    h, w = shape
    box = np.zeros((h, w))
    box[0, :5] = 1.0 / np.sqrt(5.0)  # unit-variance box-filtered noise
    return (0.08**2 * np.abs(np.fft.fft2(box)) ** 2 + 0.04**2) * h * w


def psnr_mean(clean: np.ndarray, images: np.ndarray) -> float:
    return float(np.mean([synth.psnr(c, x, data_range=1.0) for c, x in zip(clean, images)]))


def nl_means(noisy: np.ndarray, sigma: float | None) -> tuple[np.ndarray, float, float]:
    """(denoised, seconds, mean sigma used); sigma None: estimated per crop from the noisy crop alone
    (`posterior.estimate_noise`: MAD of a 4-neighbour high-pass, as skimage's `estimate_sigma`
    this assumes white noise)."""
    from skimage.restoration import denoise_nl_means

    from autostructn2v_jax.posterior import estimate_noise

    t0 = time.perf_counter()
    outs, used = [], []
    for x in noisy:
        s = float(np.sqrt(estimate_noise(x).b)) if sigma is None else sigma
        used.append(s)
        outs.append(denoise_nl_means(x, h=0.8 * s, sigma=s, fast_mode=True, patch_size=7, patch_distance=11))
    return np.stack(outs), time.perf_counter() - t0, float(np.mean(used))


def bm3d_rows(case: str, clean: np.ndarray, noisy: np.ndarray, python: str) -> list[dict]:
    if not os.path.exists(python):
        print(f"BM3D skipped: {python} not found", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pathlib.Path(tmp) / "in.npz", pathlib.Path(tmp) / "out.npz"
        extra = {"psd": hcorr_psd(noisy.shape[1:])} if case == "hcorr" else {}
        np.savez(src, noisy=noisy.astype(np.float64), sigma=SIGMA[case], **extra)
        subprocess.run([python, "-c", _BM3D_SCRIPT, str(src), str(dst)], check=True)
        z = np.load(dst)
        rows = [dict(case=case, method="BM3D, sigma given", psnr=psnr_mean(clean, z["sigma"]),
                     seconds=float(z["sigma_seconds"]))]
        if "psd" in z.files:
            rows.append(dict(case=case, method="BM3D, exact noise spectrum given",
                             psnr=psnr_mean(clean, z["psd"]), seconds=float(z["psd_seconds"])))
    return rows


def our_rows(path: str) -> list[dict]:
    """Our rows from a `benchmarks/posterior.py` results.json: each model plain and with TTA +
    posterior (16 bins), so the table shows them beside the classical methods."""
    rows = []
    for r in json.loads(pathlib.Path(path).read_text()):
        if r.get("bins") != 16:
            continue
        if (r["variant"], r["tta"]) in (("model", 0), ("posterior_gauss", 1)):
            what = "plain" if r["tta"] == 0 else "TTA + posterior"
            rows.append(dict(case=r["case"], method=f"ours, {r['model']} ({what})", psnr=r["psnr"],
                             seconds=float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="white,hcorr")
    parser.add_argument("--bm3d-python", default=str(HERE / ".peers-venv" / "bin" / "python"))
    parser.add_argument("--json", default="")
    parser.add_argument("--ours", default="", help="results.json of benchmarks/posterior.py to print beside")
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        clean, noisy = noisy_crops(case)
        rows.append(dict(case=case, method="noisy input", psnr=psnr_mean(clean, noisy), seconds=0.0))
        for label, sigma in (("sigma given", SIGMA[case]), ("sigma estimated", None)):
            out, seconds, used = nl_means(noisy, sigma)
            rows.append(dict(case=case, method=f"NL-means, {label} ({used:.4f})",
                             psnr=psnr_mean(clean, out), seconds=seconds))
        rows.extend(bm3d_rows(case, clean, noisy, args.bm3d_python))
        if args.ours:
            rows.extend(r for r in our_rows(args.ours) if r["case"] == case)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print("| case | method | PSNR (dB) | seconds (54 crops) |")
    print("|---|---|---|---|")
    for r in rows:
        seconds = "" if r["seconds"] != r["seconds"] else f"{r['seconds']:.1f}"
        print(f"| {r['case']} | {r['method']} | {r['psnr']:.2f} | {seconds} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
