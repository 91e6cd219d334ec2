"""The posterior-mean step on finished runs: the same predictions scored with and without it.

    PYTHONPATH=. .venv/bin/python benchmarks/posterior_runs.py /tmp/q30g/white_30min/run /tmp/q30g/hcorr_30min/run

Each argument is a run folder made by `benchmarks/quality.py` (its parent holds `noisy/` and
`clean/`). The last stage is rebuilt with `inference.load_run` (TTA as the run was configured) and
predicts every noisy image once (cached in the parent as `predictions.npz`). Rows, PSNR at data
range 1 against the clean images:

* `model`: the prediction alone (`posterior_mean = off`);
* `posterior`: the default pixel-wise step, one noise model pooled over all the images in raw
  units (`StageModel.finish_all`, as the pipeline and `predict` do);
* `posterior, per plane`: the same step with a noise model estimated from each image alone (the
  default before 2026-12-04);
* `posterior, true sigma`: the same step given the true noise variance;
* `leak-aware`: the gain corrected for the fraction ``alpha`` of the pixel's own noise that the
  network passes through at inference (it sees the pixel then), ``alpha`` per gradient bin from a
  finite-difference probe ``z * (f(y + d z) - f(y)) / d`` with a random sign pattern ``z``:
  ``gain = (s_e^2 - alpha (1 - alpha) s_n^2) / E[r^2]`` with ``s_e^2 = E[r^2] - (1 - alpha)^2 s_n^2``;
* `correlated` (structured masks only): a Wiener filter of the residual with the noise covariance
  measured on the residual at the mask's lags (flattest half of the pixels), a white prior of the
  bin's variance: ``e = IFFT(s_p^2 / (s_p^2 + S_n) * FFT(r))`` per bin.
* `masked inference` (`--masked-inference`, structured masks only, slow): blind-spot-consistent
  prediction. Copies of the mask are laid on a regular lattice at about the training density
  (`stage2.mask_percentage`), replaced as in training (`local_mean`), and only the copies'
  centres are kept; the lattice's phases cover every pixel once (passes = lattice cell area,
  without TTA: 80 passes for a 9-pixel line at 10 %). Scored without and with the pooled posterior
  step, beside the plain prediction without TTA (`model, no TTA`).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import tifffile

from autostructn2v_jax import inference, posterior, preprocess, synth

BINS = 16


def _bins(mu: np.ndarray) -> np.ndarray:
    g = np.asarray(posterior._gradient_energy(jnp.asarray(mu, jnp.float32))).ravel()
    return ((np.argsort(np.argsort(g)) * BINS) // g.size).reshape(mu.shape)


def leak_aware(model, y: np.ndarray, mu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    nm = posterior.estimate_noise(y, mu)
    d = 0.1 * np.sqrt(nm.b)
    z = rng.choice([-1.0, 1.0], size=y.shape).astype(np.float32)
    alpha_map = z * (model(y + d * z) - mu) / d
    bid, r = _bins(mu), y - mu
    sn2 = nm.b / (1.0 - float(alpha_map.mean())) ** 2  # the residual's spread is (1 - alpha) s_n
    gain = np.zeros(BINS)
    for k in range(BINS):
        sel = bid == k
        a, er2 = float(alpha_map[sel].mean()), float(np.mean(r[sel] ** 2))
        se2 = er2 - (1 - a) ** 2 * sn2
        gain[k] = np.clip((se2 - a * (1 - a) * sn2) / max(er2, 1e-12), 0.0, 1.0)
    return mu + gain[bid] * r


def correlated(y: np.ndarray, mu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    nm = posterior.estimate_noise(y, mu)
    r, bid = y - mu, _bins(mu)
    flat = bid < BINS // 2
    h, w = r.shape
    cov = np.zeros((h, w))
    cov[0, 0] = nm.b
    cy, cx = mask.shape[0] // 2, mask.shape[1] // 2
    for dy, dx in zip(*np.nonzero(mask)):
        dy, dx = int(dy) - cy, int(dx) - cx
        if dy == 0 and dx == 0:
            continue
        region = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
        shifted = np.roll(r, (-dy, -dx), axis=(0, 1))
        cov[dy % h, dx % w] = np.mean((r[region] * shifted[region])[flat[region]])
    spectrum = np.maximum(np.real(np.fft.fft2(cov)), 1e-4 * nm.b)
    excess = r * r - nm.b
    spectrum_r = np.fft.fft2(r)
    out = np.empty_like(r)
    for k in range(BINS):
        sel = bid == k
        prior = max(float(excess[sel].mean()), 0.0)
        out[sel] = np.real(np.fft.ifft2(prior / (prior + spectrum) * spectrum_r))[sel]
    return mu + out


def masked_prediction(model, y: np.ndarray, mask: np.ndarray, percentage: float) -> np.ndarray:
    """The prediction at every pixel with the whole mask around it hidden, as in training."""
    import jax

    from autostructn2v_jax import masking

    offs = np.argwhere(mask) - np.array(mask.shape) // 2
    (y0, x0), (y1, x1) = offs.min(0), offs.max(0)
    cell = (int(y1 - y0) + 2, int(x1 - x0) + 2)  # the bounding box and a one-pixel gap
    stretch = max(1, round(len(offs) / (cell[0] * cell[1]) / (percentage / 100.0)))
    sy, sx = cell[0] * stretch, cell[1]
    h, w = y.shape
    out = np.zeros_like(y)
    for py in range(sy):
        for px in range(sx):
            centres = np.zeros((h, w), bool)
            centres[py::sy, px::sx] = True
            hidden = np.zeros((h, w), bool)
            cy, cx = np.nonzero(centres)
            for dy, dx in offs:
                ok = (cy + dy >= 0) & (cy + dy < h) & (cx + dx >= 0) & (cx + dx < w)
                hidden[cy[ok] + dy, cx[ok] + dx] = True
            replaced = masking.replace_masked(jax.random.key(py * sx + px), jnp.asarray(y),
                                              jnp.asarray(hidden), "local_mean")
            out[centres] = model(np.asarray(replaced))[centres]
    return out


def rows(run: pathlib.Path, seed: int = 0, masked_inference: bool = False) -> dict:
    folder = run.parent
    cfg, name, model = inference.load_run(run)
    mask_path = run / "mask" / "structural_mask.npy"
    mask = np.load(mask_path) if mask_path.is_file() and name == "stage2" else np.ones((1, 1), bool)
    names = sorted(p.name for p in (folder / "clean").glob("*.tif"))
    clean = [tifffile.imread(folder / "clean" / n) for n in names]
    noisy = [tifffile.imread(folder / "noisy" / n) for n in names]
    cache = folder / "predictions.npz"
    if cache.is_file():
        z = np.load(cache)
        mus, ys, stats = list(z["mu"]), list(z["y"]), json.loads(str(z["stats"]))
    else:
        pairs = [preprocess.normalize(x) for x in noisy]
        ys, stats = [p[0] for p in pairs], [p[1] for p in pairs]
        mus = [model(y) for y in ys]
        np.savez(cache, mu=np.stack(mus), y=np.stack(ys), stats=json.dumps(stats))

    def score(outs):
        return float(np.mean([synth.psnr(c, preprocess.denormalize(o, s), data_range=1.0)
                              for c, o, s in zip(clean, outs, stats)]))

    # true noise in normalised units: y = (x - offset) / scale, scale = std(x) / std(y)
    true_var = [float(((x - c) / ((x - x.mean()).std() / (y - y.mean()).std())).var())
                for c, x, y in zip(clean, noisy, ys)]
    rng = np.random.default_rng(seed)
    pooled = model.finish_all([ys], [mus], [stats])[0]
    out = {"model": score(mus),
           "posterior": score(pooled),
           "posterior, per plane": score([posterior.posterior_step(y, m) for y, m in zip(ys, mus)]),
           "posterior, true sigma": score([np.asarray(posterior.posterior_mean(y, m, v))
                                           for y, m, v in zip(ys, mus, true_var)]),
           "leak-aware": score([leak_aware(model, y, m, rng) for y, m in zip(ys, mus)])}
    if mask.sum() > 1:
        out["correlated"] = score([correlated(y, m, mask) for y, m in zip(ys, mus)])
    if masked_inference and mask.sum() > 1:
        model.tta = False
        out["model, no TTA"] = score([model(y) for y in ys])
        hidden = [masked_prediction(model, y, mask, float(cfg.stage2.mask_percentage)) for y in ys]
        out["masked inference"] = score(hidden)
        out["masked inference + posterior"] = score(model.finish_all([ys], [hidden], [stats])[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of benchmarks/quality.py")
    parser.add_argument("--masked-inference", action="store_true",
                        help="also score blind-spot-consistent prediction (structured masks; slow)")
    args = parser.parse_args()
    for run in args.runs:
        res = rows(pathlib.Path(run), masked_inference=args.masked_inference)
        print(f"{run}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
