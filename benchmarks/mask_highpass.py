"""How the high-pass before the autocorrelation affects mask discovery on the raw images.

    python benchmarks/mask_highpass.py [--seeds 5]

No training: masks are extracted (`api.extract_mask`, default extractor otherwise) from the noisy
images themselves (`stage2.mask_source = "extractor"`), for `highpass_sigma` in SIGMAS and both
methods, on two image sets: `cells` (4 synthetic 128x128 cell images, `synth.clean_image`) and
`photos` (16 crops of 128x128 of scikit-image's camera, coins, moon and brick, as in
`benchmarks/quality.py`; needs scikit-image). Noise cases `white`, `hcorr`, `vcorr`
(`synth.add_noise`); the right mask is the centre alone for white and a line of at least 3 pixels
through the centre along the correlation for hcorr/vcorr (`mask_sources.is_right`). Prints right/total
and the mean line length found for the correlated cases.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mask_sources import CASES, is_right  # noqa: E402
from quality import clean_crops  # noqa: E402

from autostructn2v_jax import api, synth  # noqa: E402

SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
METHODS = ("ring", "significance")


def clean_set(name: str, seed: int) -> list[np.ndarray]:
    if name == "cells":
        rng = np.random.default_rng(seed)
        return [synth.clean_image(rng, 128) for _ in range(4)]
    return clean_crops(seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for images, seed in itertools.product(("cells", "photos"), range(args.seeds)):
        clean = clean_set(images, seed)
        for case in CASES:
            rng = np.random.default_rng(100 + 10 * seed + CASES.index(case))
            noisy = [synth.add_noise(rng, c, case) for c in clean]
            for sigma, method in itertools.product(SIGMAS, METHODS):
                ext = api.load_config("configs/default.py").stage2.extractor
                ext.highpass_sigma, ext.method = sigma, method
                mask, _ = api.extract_mask(noisy, ext, seed=seed)
                results.setdefault((images, sigma, method, case), []).append(
                    (is_right(mask, case), int(mask.sum())))
    print("| images | high-pass sigma | method | " + " | ".join(CASES) + " | mean pixels (hcorr / vcorr) |")
    print("|---|---|---|" + "---|" * (len(CASES) + 1))
    for images, sigma, method in itertools.product(("cells", "photos"), SIGMAS, METHODS):
        cells, sizes = [], []
        for case in CASES:
            rows = results[(images, sigma, method, case)]
            cells.append(f"{sum(r for r, _ in rows)}/{len(rows)}")
            if case != "white":
                sizes.append(f"{np.mean([n for _, n in rows]):.1f}")
        print(f"| {images} | {sigma:g} | {method} | " + " | ".join(cells) + f" | {' / '.join(sizes)} |")


if __name__ == "__main__":
    main()
