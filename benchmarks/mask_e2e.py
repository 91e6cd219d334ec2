"""End to end: does the automatic mask make stage 2 beat stage 1? (small networks, CPU-sized)

    python benchmarks/mask_e2e.py [--cases gauss1,box3,line7@45,disc2,white,poisson] [--seeds 1]
    python benchmarks/mask_e2e.py --cases ring --epochs 15 --set stage2.patch_size=64

Per case: 4 noisy 128x128 synthetic cell images (`--family`: or photo / texture crops; noise from
`noise_family.add_noise`), the full pipeline
(stage 1, mask from the raw images with the default extractor, stage 2) with the small config of
tests/test_quality.py (features 8, patch 32, 5 epochs), PSNR against the clean images.  Prints
noisy / stage 1 / stage 2 PSNR, the gain of stage 2 over stage 1 and the mask.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import tifffile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))
import noise_family as F  # noqa: E402
from test_quality import small_config  # noqa: E402

from autostructn2v_jax import config, pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gauss1,box3,line7@45,disc2,white,poisson")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--family", default="cells", choices=F.FAMILIES,
                        help="image content (photos and texture need scikit-image, the bench extra)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on top of the small config, e.g. stage2.patch_size=64")
    args = parser.parse_args()
    ks = F.kernels()
    print("| case | seed | noisy | stage 1 | stage 2 | stage 2 - stage 1 | mask |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        for seed in range(args.seeds):
            rng = np.random.default_rng(500 + seed)
            clean = F.clean_images(args.family, rng, 4, 128)
            with tempfile.TemporaryDirectory() as tmp:
                root = pathlib.Path(tmp)
                for sub in ("noisy", "clean"):
                    (root / sub).mkdir()
                for i, c in enumerate(clean):
                    tifffile.imwrite(root / "clean" / f"{i}.tif", c)
                    tifffile.imwrite(root / "noisy" / f"{i}.tif", F.add_noise(rng, c, case, ks.get(case)))
                cfg = small_config(root, root / "run", seed=seed, epochs=args.epochs)
                cfg.stage2.mask_source = "extractor"
                config.apply_overrides(cfg, args.set)
                t0 = time.perf_counter()
                summary = pipeline.run_pipeline(cfg)
                p = summary["psnr"]["mean"]
                print(f"| {case} | {seed} | {p['noisy']:.2f} | {p['stage1']:.2f} | {p['stage2']:.2f} | "
                      f"{p['stage2'] - p['stage1']:+.2f} | {summary['stages']['stage2']['mask']} "
                      f"({time.perf_counter() - t0:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
