"""Automatic masks on a family of structured noises, image contents and seeds (no training).

    python benchmarks/mask_family.py [--quick] [--seeds 3] [--methods deconvolved,significance]

Noise shapes and image families: `noise_family.py` (lines of 3-13 px at 0/45/90/135/30 degrees,
boxes, discs, other convex and non-convex kernels, isotropic and anisotropic Gaussian-correlated
noise, row/column stripes, white, Poisson + Gaussian; synthetic cells, scikit-image photos and
dense textures).  Per case the mask comes from `extraction.mask_from_planes` on 4 noisy 192x192
images (the pipeline's `mask_source="extractor"` path, default extractor otherwise) and is scored
against the true noise correlation: recall of the lags with correlation >= 0.15 and the number of
masked lags with correlation < 0.02.  Goal per case: recall 1.0 and <= 2 false lags (correlated),
the centre alone (pixel-independent).  `--quick`: fewer line lengths / sizes and one seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import noise_family as F  # noqa: E402

from autostructn2v_jax import config, extraction, preprocess  # noqa: E402

VARIANTS = {
    "deconvolved": {},
    "deconvolved-sigdetect": {"method": "deconvolved", "deconv_detect_threshold": 1.0,
                              "deconv_excess_threshold": 1.0},
    "significance": {"method": "significance"},
    "ring": {"method": "ring"},
}


def group(case: str) -> str:
    for prefix, name in (("line", "lines"), ("box", "boxes"), ("disc", "discs"), ("gauss", "gaussian"),
                         ("stripes", "stripes")):
        if case.startswith(prefix):
            return name
    return "independent" if case in F.CASES_INDEPENDENT else "other 2-D"


def run(quick: bool, seeds: int, methods: list[str]) -> list[dict]:
    ks = F.kernels(quick)
    cases = list(ks) + list(F.CASES_STRIPES) + list(F.CASES_INDEPENDENT)
    rows = []
    for family, seed in itertools.product(F.FAMILIES, range(seeds)):
        rng = np.random.default_rng(1000 * seed + F.FAMILIES.index(family))
        clean = F.clean_images(family, rng)
        for case in cases:
            k = ks.get(case)
            planes = [preprocess.normalize(F.add_noise(rng, c, case, k))[0] for c in clean]
            true = F.true_correlation(case, k)
            for name in methods:
                ext = config.validate_extractor_config(VARIANTS[name])
                mask, info = extraction.mask_from_planes(planes, ext, seed)
                recall, false = F.score(mask, true)
                independent = case in F.CASES_INDEPENDENT
                ok = int(mask.sum()) == 1 if independent else (recall == 1.0 and false <= 2)
                rows.append(dict(method=name, family=family, seed=seed, case=case, group=group(case),
                                 recall=recall, false=false, pixels=int(mask.sum()), ok=bool(ok),
                                 truncated=bool(info.get("truncated"))))
    return rows


def tables(rows: list[dict], methods: list[str]) -> str:
    out = ["| method | group | " + " | ".join(F.FAMILIES) + " |", "|---|---|" + "---|" * len(F.FAMILIES)]
    groups = ("lines", "boxes", "discs", "other 2-D", "gaussian", "stripes", "independent")
    for name, g in itertools.product(methods, groups):
        cells = []
        for fam in F.FAMILIES:
            sub = [r for r in rows if (r["method"], r["group"], r["family"]) == (name, g, fam)]
            if sub:
                cells.append(f"{sum(r['ok'] for r in sub)}/{len(sub)} (recall {min(r['recall'] for r in sub):.2f}, "
                             f"false <= {max(r['false'] for r in sub)})")
        out.append(f"| {name} | {g} | " + " | ".join(cells) + " |")
    out += ["", f"Per case, {methods[0]}: goal met / seeds, min recall, max false lags, mean mask pixels", "",
            "| case | " + " | ".join(F.FAMILIES) + " |", "|---|" + "---|" * len(F.FAMILIES)]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for fam in F.FAMILIES:
            sub = [r for r in rows if (r["method"], r["case"], r["family"]) == (methods[0], case, fam)]
            cells.append(f"{sum(r['ok'] for r in sub)}/{len(sub)}: {min(r['recall'] for r in sub):.2f} / "
                         f"{max(r['false'] for r in sub)} / {np.mean([r['pixels'] for r in sub]):.0f}"
                         + (" T" if any(r["truncated"] for r in sub) else ""))
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, one seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per family (default 3; 1 with --quick)")
    parser.add_argument("--methods", default="deconvolved,significance",
                        help=f"comma-separated, first one gets the per-case table; from {list(VARIANTS)}")
    parser.add_argument("--out", default="", help="also write every row as JSON here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    seeds = args.seeds or (1 if args.quick else 3)
    t0 = time.perf_counter()
    rows = run(args.quick, seeds, methods)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} extractions in {time.perf_counter() - t0:.0f} s\n")
    print(tables(rows, methods))


if __name__ == "__main__":
    main()
