"""Posterior-mean final step and test-time augmentation: what they add to a blind-spot model.

    python benchmarks/posterior.py [--epochs 6] [--features 16] [--out bench_posterior]
    python benchmarks/posterior.py --eval-only --out bench_posterior   # re-score saved predictions

Data: the 16 photo crops of `benchmarks/quality.py` (128x128 from scikit-image's camera, coins,
moon, brick; float32 [0, 1]) with `white` (Gaussian sigma 0.1) and `hcorr` (length-5 box-correlated
std 0.08 along x + independent std 0.04) noise. Per case a small stage-1 (N2V) model is trained
with `train.train_stage` on the normalised noisy crops (uniform patch sampling); for `hcorr` also a
stage-2-style model with the structural mask given (the horizontal 9-pixel line the extractor finds
on this noise). Every crop is predicted with and without TTA (8 flips/rotations), timed after a
warm-up call; predictions are saved to `OUT/CASE/predictions.npz` so the evaluation (posterior
variants, noise estimates) can be re-run without training. Reported: mean PSNR over the crops of
the model output, of the posterior step (noise model estimated from the data; several variants) and
of an oracle that is given the true noise variance. PSNR with data range 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from autostructn2v_jax import config as config_lib  # noqa: E402
from autostructn2v_jax import masking, preprocess, models, posterior, predict, synth, train  # noqa: E402
from autostructn2v_jax.files import atomic_write_text  # noqa: E402

# total noise variance per pixel of each case (the oracle)
TRUE_VAR = {"white": 0.1**2, "hcorr": 0.08**2 + 0.04**2}
STAGE2_MASK = np.ones((1, 9), bool)  # horizontal line of 9 pixels


def stage_cfg(features: int, lr: float, strategy: str, stage2: bool, pool: str = "max",
              top_skip: bool = True) -> tuple:
    cfg = config_lib.base_config()
    s = cfg.stage2 if stage2 else cfg.stage1
    s.features, s.batch_size, s.patch_size, s.learning_rate = features, 16, 64, lr
    s.patches_per_image, s.num_val_patches, s.use_roi = 50, 64, False
    s.replacement_strategy = strategy
    s.pool, s.top_skip = pool, top_skip
    s.num_layers = 2  # both stages at depth 2 (the stage-2 default is 3), as predicted below
    cfg.num_epochs = 0  # set by the caller
    return cfg, s


def train_and_predict(noisy_n: list[np.ndarray], workdir: pathlib.Path, *, epochs: int, features: int,
                      lr: float, strategy: str, kernel: np.ndarray, name: str, seed: int,
                      pool: str = "max", top_skip: bool = True) -> dict:
    cfg, s = stage_cfg(features, lr, strategy, name == "stage2", pool, top_skip)
    cfg.num_epochs, cfg.random_seed = epochs, seed
    cfg.early_stopping = False
    t0 = time.perf_counter()
    result = train.train_stage(noisy_n, noisy_n[:4], s, cfg, kernel, workdir, name=name)
    train_s = time.perf_counter() - t0
    apply_fn = models.make_apply_fn(features, 2, "auto", pool, top_skip)
    out = {"train_s": train_s, "steps": int(result.history[-1]["step"]) if result.history else 0}
    for tta in (False, True):
        kw = dict(apply_fn=apply_fn, num_layers=2, batch_tiles=1, tta=tta,
                  halo=models.receptive_field(2, pool, top_skip))
        t0 = time.perf_counter()
        predict.predict_image(result.variables, noisy_n[0], **kw)  # compile + warm-up
        out[f"compile_s_tta{int(tta)}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        preds = [predict.predict_image(result.variables, x, **kw) for x in noisy_n]
        out[f"predict_s_tta{int(tta)}"] = time.perf_counter() - t0
        out[f"pred_tta{int(tta)}"] = np.stack(preds)
    return out


def time_tta(case: str, out: pathlib.Path, features: int, rounds: int = 3) -> list[dict]:
    """Prediction seconds for the 16 crops without / with TTA, interleaved, best of ``rounds``
    (trained models reloaded from ``OUT/CASE/run_*``; compile excluded)."""
    z = np.load(out / case / "predictions.npz")
    normed = (z["noisy"] - z["mean"][:, None, None]) / z["std"][:, None, None]
    apply_fn = models.make_apply_fn(features, 2)
    rows = []
    for run in sorted((out / case).glob("run_stage*")):
        variables = train.load_stage_variables(run, features, 2, 64)
        best = {False: np.inf, True: np.inf}
        for tta in (False, True):  # compile + warm-up
            predict.predict_image(variables, normed[0], apply_fn=apply_fn, num_layers=2, batch_tiles=1, tta=tta)
        for _ in range(rounds):
            for tta in (False, True):
                t0 = time.perf_counter()
                for x in normed:
                    predict.predict_image(variables, x, apply_fn=apply_fn, num_layers=2, batch_tiles=1, tta=tta)
                best[tta] = min(best[tta], time.perf_counter() - t0)
        rows.append(dict(case=case, model=run.name[4:], variant="predict_seconds_16_crops",
                         plain=round(best[False], 3), tta=round(best[True], 3),
                         ratio=round(best[True] / best[False], 2), load=round(os.getloadavg()[0], 2)))
    return rows


def make_case(case: str, out: pathlib.Path, args) -> None:
    from quality import clean_crops

    rng = np.random.default_rng(1 if case == "hcorr" else 0)
    clean = np.stack(clean_crops())
    noisy = np.stack([synth.add_noise(rng, c, case) for c in clean])
    normed, stats = zip(*(preprocess.normalize(x) for x in noisy))
    folder = out / case
    folder.mkdir(parents=True, exist_ok=True)
    saved = dict(clean=clean, noisy=noisy, mean=np.array([s["mean"] for s in stats]),
                 std=np.array([s["std"] for s in stats]))
    timing = {}
    stages = [("stage1", masking.stage1_kernel(1))]
    if case == "hcorr" and not args.no_stage2:
        stages.append(("stage2", STAGE2_MASK))
    for name, kernel in stages:
        r = train_and_predict(list(normed), folder / f"run_{name}", epochs=args.epochs, features=args.features,
                              lr=args.lr, strategy=args.strategy, kernel=kernel, name=name, seed=args.seed,
                              pool=args.pool, top_skip=not args.no_top_skip)
        for tta in (0, 1):
            saved[f"{name}_tta{tta}"] = r.pop(f"pred_tta{tta}")
        timing[name] = r
        print(f"{case} {name}: {json.dumps(r)}", flush=True)
    np.savez_compressed(folder / "predictions.npz", **saved)
    atomic_write_text(folder / "timing.json", json.dumps(timing, indent=2))


def evaluate(case: str, out: pathlib.Path, bins: int) -> list[dict]:
    """Rows (model, tta, variant, psnr / sigma estimates) for one case, from saved predictions.

    PSNR uses data range 1 (the crops are [0, 1] scaled before the noise is added)."""
    z = np.load(out / case / "predictions.npz")
    clean, noisy, mean, std = z["clean"], z["noisy"], z["mean"], z["std"]
    normed = (noisy - mean[:, None, None]) / std[:, None, None]
    psnr = lambda c, x: synth.psnr(c, x, data_range=1.0)  # noqa: E731
    rows = []
    for key in sorted(k for k in z.files if k.startswith("stage")):
        name, tta = key.split("_tta")
        preds = z[key]
        variants: dict[str, list] = {k: [] for k in ("model", "posterior_gauss", "posterior_pg",
                                                    "posterior_global", "posterior_highpass",
                                                    "oracle_sigma")}
        sig = {"resid": [], "highpass": []}
        t_post = 0.0
        for i in range(len(clean)):
            y, mu = normed[i], preds[i]
            t0 = time.perf_counter()
            g = posterior.estimate_noise(y, mu)
            gauss = np.asarray(posterior.posterior_mean(y, mu, g, bins=bins))
            t_post += time.perf_counter() - t0
            pg = posterior.estimate_noise(y, mu, model="poisson_gaussian")
            hp = posterior.estimate_noise(y)
            sig["resid"].append(np.sqrt(g.b) * std[i])
            sig["highpass"].append(np.sqrt(hp.b) * std[i])
            oracle = posterior.NoiseModel(0.0, TRUE_VAR[case] / std[i] ** 2)
            outs = {
                "model": mu,
                "posterior_gauss": gauss,
                "posterior_pg": posterior.posterior_mean(y, mu, pg, bins=bins),
                "posterior_global": posterior.posterior_mean(y, mu, g, bins=1),
                "posterior_highpass": posterior.posterior_mean(y, mu, hp, bins=bins),
                "oracle_sigma": posterior.posterior_mean(y, mu, oracle, bins=bins),
            }
            for k, v in outs.items():
                variants[k].append(psnr(clean[i], np.asarray(v) * std[i] + mean[i]))
        for k, v in variants.items():
            rows.append(dict(case=case, model=name, tta=int(tta), variant=k, bins=bins,
                             psnr=round(float(np.mean(v)), 3)))
        rows.append(dict(case=case, model=name, tta=int(tta), variant="sigma_estimate",
                         resid=round(float(np.mean(sig["resid"])), 4),
                         highpass=round(float(np.mean(sig["highpass"])), 4),
                         true=round(float(np.sqrt(TRUE_VAR[case])), 4),
                         posterior_seconds_16_crops=round(t_post, 3)))
    rows.append(dict(case=case, model="noisy", variant="input",
                     psnr=round(float(np.mean([psnr(c, x) for c, x in zip(clean, noisy)])), 3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of 50 steps (16 crops x 50 patches / 16)")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--strategy", default="local_mean", help="replacement strategy (e.g. median)")
    parser.add_argument("--seed", type=int, default=42, help="training seed (the noise is fixed)")
    parser.add_argument("--pool", default="max", help="U-Net down-sampling: max or blur (N2V2)")
    parser.add_argument("--no-top-skip", action="store_true", help="N2V2: no top-level skip connection")
    parser.add_argument("--cases", default="white,hcorr")
    parser.add_argument("--no-stage2", action="store_true")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--time-tta", action="store_true", help="also time prediction with/without TTA")
    parser.add_argument("--bins", default="16", help="posterior gradient-energy bins to score, e.g. 1,8,16,64")
    parser.add_argument("--out", default="bench_posterior")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    cases = args.cases.split(",")
    if not args.eval_only:
        for case in cases:
            make_case(case, out, args)
    rows = [r for case in cases for b in map(int, args.bins.split(",")) for r in evaluate(case, out, b)]
    if args.time_tta:
        rows += [r for case in cases for r in time_tta(case, out, args.features)]
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    print(f"load average: {os.getloadavg()[0]:.2f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
