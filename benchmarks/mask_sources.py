"""Which images and which method find the right structural mask (issue: mask sources).

    python benchmarks/mask_sources.py [--seeds 3] [--out bench_masks]

For each noise case (`white`, `hcorr`, `vcorr` from `synth.add_noise`) and seed: 4 synthetic cell
images of 128x128 (`synth.clean_image`), a short stage-1 training (`configs/demo.py`, stage 1
only, 4 epochs of 100 patches per image), then the mask is extracted (`api.extract_mask`, default
extractor settings otherwise) from each source:

* `raw`      the noisy images themselves (`stage2.mask_source = "extractor"`)
* `stage1`   the stage-1 output (`"stage1"`)
* `residual` noisy minus stage-1 output (`"stage1_residual"`)

with the high-pass off and on (`highpass_sigma` 0 and 2) and both methods (`ring`,
`significance`). A mask is right when it is the centre pixel alone for `white`, a horizontal
segment of at least 3 pixels through the centre and nothing else for `hcorr`, the vertical one for
`vcorr`. Prints a markdown table of right/total per setting and case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import shutil
import time

import numpy as np
import tifffile

from autostructn2v_jax import api, extraction, synth

CASES = ("white", "hcorr", "vcorr")
SOURCES = ("raw", "stage1", "residual")
SIGMAS = (0.0, 2.0)
METHODS = ("ring", "significance")


def is_right(mask: np.ndarray, case: str) -> bool:
    """The mask the noise case calls for (see the module docstring)."""
    mask = np.asarray(mask, bool)
    c = mask.shape[0] // 2
    if case == "white":
        return int(mask.sum()) == 1
    line = mask if case == "hcorr" else mask.T
    row = line[c]
    if int(line.sum()) != int(row.sum()) or int(row.sum()) < 3:
        return False
    idx = np.flatnonzero(row)
    return bool(idx[0] <= c <= idx[-1] and idx[-1] - idx[0] + 1 == idx.size)


def stage1_outputs(noisy: list[np.ndarray], folder: pathlib.Path, seed: int) -> list[np.ndarray]:
    """Train a small stage 1 on `noisy` and return its denoised images."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "noisy").mkdir(parents=True)
    for i, img in enumerate(noisy):
        tifffile.imwrite(folder / "noisy" / f"{i:02d}.tif", img)
    cfg = api.load_config("configs/demo.py", input_dir=str(folder / "noisy"), output_dir=str(folder / "run"),
                          run_stage2=False, num_epochs=4, random_seed=seed,
                          **{"stage1.patches_per_image": 100})
    api.run(cfg)
    return [tifffile.imread(folder / "run/stage1/denoised" / f"{i:02d}.tif") for i in range(len(noisy))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench_masks")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    records = []
    t0 = time.perf_counter()
    for case, seed in itertools.product(CASES, range(args.seeds)):
        rng = np.random.default_rng(1000 * seed + CASES.index(case))
        clean = [synth.clean_image(rng, 128) for _ in range(4)]
        noisy = [synth.add_noise(rng, c, case) for c in clean]
        denoised = stage1_outputs(noisy, out / f"{case}_{seed}", seed)
        planes = {"raw": noisy, "stage1": denoised,
                  "residual": [n - d for n, d in zip(noisy, denoised)]}
        for source, sigma, method in itertools.product(SOURCES, SIGMAS, METHODS):
            ext = api.load_config("configs/default.py").stage2.extractor
            ext.highpass_sigma, ext.method = sigma, method
            mask, _ = api.extract_mask(planes[source], ext, seed=seed)
            records.append(dict(case=case, seed=seed, source=source, highpass_sigma=sigma, method=method,
                                right=is_right(mask, case), mask=extraction.mask_summary(mask)))
    (out / "results.json").write_text(json.dumps(records, indent=2))
    print(f"{len(records)} extractions, {time.perf_counter() - t0:.0f} s\n")
    print("| source | high-pass sigma | method | " + " | ".join(CASES) + " | wrong masks seen |")
    print("|---|---|---|" + "---|" * (len(CASES) + 1))
    for source, sigma, method in itertools.product(SOURCES, SIGMAS, METHODS):
        rows = [r for r in records if (r["source"], r["highpass_sigma"], r["method"]) == (source, sigma, method)]
        cells = []
        for case in CASES:
            sub = [r for r in rows if r["case"] == case]
            cells.append(f"{sum(r['right'] for r in sub)}/{len(sub)}")
        wrong = sorted({f"{r['case']}: {r['mask']}" for r in rows if not r["right"]})
        print(f"| {source} | {sigma:g} | {method} | " + " | ".join(cells) + f" | {'; '.join(wrong) or '-'} |")


if __name__ == "__main__":
    main()
