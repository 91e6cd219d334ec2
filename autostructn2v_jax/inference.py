"""Using a trained run: the stage model (variables + tiled predictor), its `model.json`, loading a
run folder, and denoising TIFF files with it."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib

import jax
import numpy as np

from autostructn2v_jax import config as config_lib
from autostructn2v_jax import files, masking, models, parallel, posterior, predict, preprocess, stream, tiffio, train
from autostructn2v_jax.errors import UserInputError

log = logging.getLogger(__name__)


#: The pooled noise estimate's blind samples: each plane is predicted with copies of the stage's
#: mask hidden (as in training) until about ``BLIND_FRACTION`` of its pixels have been mask centres
#: (at most ``BLIND_MAX_PASSES`` passes), and planes are visited until ``BLIND_SAMPLES`` centres
#: are collected (a large stack does not pay passes over every plane).
BLIND_FRACTION = 0.05
BLIND_MAX_PASSES = 8
BLIND_SAMPLES = 200_000
#: Pixels pooled for the noise correlation of a structured-noise stage (first usable planes).
CORRELATION_PIXELS = 1 << 22


@functools.lru_cache(maxsize=32)
def _hide_fn(kernel: tuple, shape: tuple, percentage: float, strategy: str):
    """Jitted ``(key, plane) -> (plane with mask copies replaced, centres)`` for one plane shape."""
    k = np.array(kernel, bool)

    def hide(key, plane):
        # the training batch's masking on a batch of one plane: one random call (compiles faster)
        inputs, centres, _ = masking.make_blind_spot_batch(key, plane[None], k, percentage, strategy)
        return inputs[0], centres[0]

    return jax.jit(hide)


class StageModel:
    """A trained stage: its variables and a tiled predictor for whole images."""

    def __init__(self, variables: dict, stage_cfg, tta: bool = False, posterior_mean: str = "off",
                 kernel=None, posterior_correlated: bool = False):
        self.variables = variables
        # The blind spot it was trained with (the centre pixel when not given), its density and
        # replacement: the pooled noise estimate predicts with it hidden (:meth:`blind_predictions`).
        self.kernel = masking.crop_kernel(np.ones((1, 1), bool) if kernel is None else kernel)
        self.mask_percentage = float(stage_cfg.get("mask_percentage", 15.0))
        self.strategy = str(stage_cfg.get("replacement_strategy", "local_mean"))
        self.posterior_mean = posterior_mean  # "off" or a noise model of `posterior.NOISE_MODELS`
        self.posterior_correlated = bool(posterior_correlated)  # joint step over the mask's lags
        self.num_layers = int(stage_cfg.num_layers)
        self.features = int(stage_cfg.features)
        self.tile_size = int(stage_cfg.predict_tile_size)
        self.tta = tta
        self.pool = str(stage_cfg.get("pool", "max"))
        self.top_skip = bool(stage_cfg.get("top_skip", True))
        self.apply_fn = models.make_apply_fn(self.features, self.num_layers, "auto", self.pool, self.top_skip)
        self.halo = models.receptive_field(self.num_layers, self.pool, self.top_skip)

    def __call__(self, plane: np.ndarray, tta: bool | None = None) -> np.ndarray:
        # A small image gets a smaller tile (no wasted compute); images of at least the configured
        # tile share one compiled shape. ``tta``: None follows ``self.tta``.
        auto = predict.tile_plan(plane.shape, self.num_layers, halo=self.halo)
        tile = min(self.tile_size, auto.tile) if self.tile_size > 2 * auto.halo + 2 ** self.num_layers else auto.tile
        plan = predict.tile_plan(plane.shape, self.num_layers, tile, self.halo)
        batch = max(1, min(8, plan.ny * plan.nx))
        return predict.predict_image(self.variables, plane, apply_fn=self.apply_fn, num_layers=self.num_layers,
                                     tile_size=tile, halo=self.halo, batch_tiles=batch,
                                     tta=self.tta if tta is None else bool(tta))

    def blind_predictions(self, normed: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(prediction, centres)`` pairs of a normalised plane predicted with copies of the stage's
        mask hidden and replaced as in training (no TTA): at the centres the network sees neither
        the pixel nor any neighbour whose noise is correlated with it, so ``normed - prediction``
        there is the prediction error plus the pixel's whole noise. Empty when the mask does not fit
        the plane."""
        shape = tuple(int(v) for v in normed.shape)
        try:
            lay = masking.mask_layout(self.kernel, shape, self.mask_percentage)
        except ValueError:
            return []
        if lay.n < 1:
            return []
        passes = min(BLIND_MAX_PASSES, max(1, math.ceil(BLIND_FRACTION * shape[0] * shape[1] / lay.n)))
        hide = _hide_fn(tuple(map(tuple, self.kernel.tolist())), shape, self.mask_percentage, self.strategy)
        out = []
        for i in range(passes):
            replaced, centres = hide(jax.random.fold_in(jax.random.key(seed), i), normed)
            out.append((self(np.asarray(replaced), tta=False), np.asarray(centres)))
        return out

    def finish(self, normed: np.ndarray, prediction: np.ndarray, noise=None, correlation=None) -> np.ndarray:
        """The written output: the prediction, combined with the noisy plane itself by the
        posterior-mean step unless ``posterior_mean`` is ``"off"``. ``noise``: the noise model in
        this plane's normalised units (see :meth:`finish_all`); None estimates it from the plane.
        ``correlation``: the noise correlation over the stage's mask (structured noise), or None."""
        if self.posterior_mean == "off":
            return prediction
        return posterior.posterior_step(normed, prediction, self.posterior_mean, noise=noise,
                                        correlation=correlation)

    def finish_all(self, normed: list[list[np.ndarray]], predictions: list[list[np.ndarray]],
                   stats: list[list[dict]]) -> list[list[np.ndarray]]:
        """:meth:`finish` for the planes of several files (normalised, with their stats), all with
        one noise model pooled in raw units (:func:`posterior.estimate_noise_pooled`): steadier
        than a model per plane, whose estimate moves with the plane's content. A plane that cannot
        join the pool (constant, smaller than 3x3) keeps its own estimate."""
        flat = lambda lists: [x for xs in lists for x in xs]  # noqa: E731
        planes = list(zip(flat(normed), flat(predictions), flat(stats)))
        usable = [_poolable(y) for y, _, _ in planes]
        noise, correlation = None, None
        if self.posterior_mean != "off" and any(usable):
            noise = posterior.estimate_noise_pooled(self._noise_samples(planes, usable),
                                                    model=self.posterior_mean)
            correlation = self.noise_correlation(planes, usable)
        outs = iter([self.finish(y, mu, noise.rescaled(st["std"], st["mean"])
                                 if noise is not None and ok else None, correlation)
                     for (y, mu, st), ok in zip(planes, usable)])
        return [[next(outs) for _ in ys] for ys in normed]  # back into the files' grouping

    def noise_correlation(self, planes: list, usable: list[bool]) -> np.ndarray | None:
        """The noise correlation over the stage's structural mask (None for a one-pixel blind spot:
        pixel-independent noise), pooled over the first usable planes up to ``CORRELATION_PIXELS``
        pixels (:func:`posterior.estimate_correlation`). A stage-2 mask covers the lags where the
        noise is correlated, so the posterior step can use them (docs/benchmarks.md, "Correlated
        posterior")."""
        if not self.posterior_correlated or int(self.kernel.sum()) <= 1:
            return None
        chosen, count = [], 0
        for (y, mu, st), ok in zip(planes, usable):
            if ok and count < CORRELATION_PIXELS:
                chosen.append((y, mu, st["std"]))
                count += y.size
        return posterior.estimate_correlation(chosen, self.kernel) if chosen else None

    def _noise_samples(self, planes: list, usable: list[bool]) -> list[tuple]:
        """The planes' entries for :func:`posterior.estimate_noise_pooled`: with blind predictions
        (:meth:`blind_predictions`) for the first planes, until ``BLIND_SAMPLES`` centres; only
        those planes are pooled, so one estimator makes the whole estimate. Planes the mask does
        not fit give none; if no plane does, every usable plane's plain residuals are pooled."""
        blind, count = [], 0
        for i, ((y, mu, st), ok) in enumerate(zip(planes, usable)):
            if not ok or count >= BLIND_SAMPLES:
                continue
            pairs = self.blind_predictions(y, seed=i)
            if pairs:
                blind.append((y, mu, st["std"], st["mean"], pairs))
                count += sum(int(c.sum()) for _, c in pairs)
        if blind:
            return blind
        return [(y, mu, st["std"], st["mean"]) for (y, mu, st), ok in zip(planes, usable) if ok]

    def denoise(self, normed: np.ndarray) -> np.ndarray:
        """A normalised plane in, the final output (prediction + posterior step) out, with the noise
        model estimated on the plane as :meth:`finish_all` does."""
        return self.finish_all([[normed]], [[self(normed)]], [[{"mean": 0.0, "std": 1.0}]])[0][0]

    def denoise_files(self, files_planes: list[np.ndarray]) -> list[np.ndarray]:
        """Raw ``(P, H, W)`` planes of several files in, float32 ``(P, H, W)`` each out, in the same
        units: each plane is normalised on its own and predicted; the posterior step uses one noise
        model pooled over all of them."""
        pairs = [[preprocess.normalize(p) for p in planes] for planes in files_planes]
        normed = [[n for n, _ in ps] for ps in pairs]
        stats = [[st for _, st in ps] for ps in pairs]
        finals = self.finish_all(normed, [[self(n) for n in ns] for ns in normed], stats)
        return [np.stack([preprocess.denormalize(o, st) for o, st in zip(outs, sts)]).astype(np.float32)
                for outs, sts in zip(finals, stats)]

    def denoise_planes(self, planes) -> np.ndarray:
        """Raw ``(P, H, W)`` planes in, float32 ``(P, H, W)`` out in the same units (see
        :meth:`denoise_files`)."""
        return self.denoise_files([planes])[0]


def _poolable(plane: np.ndarray) -> bool:
    """Whether a normalised plane can join a pooled noise estimate (not constant, at least 3x3)."""
    return min(plane.shape) >= 3 and bool(np.ptp(plane) > 0)


def stage_model(variables: dict, cfg, stage_cfg, kernel) -> StageModel:
    """A trained stage with the run's prediction settings (``tta``, ``posterior_mean``,
    ``posterior_correlated`` of the top-level ``cfg``)."""
    return StageModel(variables, stage_cfg, tta=uses_tta(cfg, stage_cfg), posterior_mean=cfg.posterior_mean,
                      kernel=kernel, posterior_correlated=bool(cfg.get("posterior_correlated", False)))


def uses_tta(cfg, stage_cfg) -> bool:
    """Whether a stage's predictions average the 8 flips/rotations (top-level ``tta``): ``auto``
    only for a stage trained with them, since a network that never saw a rotated image (and its
    rotated noise structure) cannot be trusted on one."""
    mode = cfg.get("tta", "off")
    return mode == "on" or (mode == "auto" and bool(stage_cfg.use_augmentation))


def save_model_json(stage_dir: pathlib.Path, stage_cfg, kernel: np.ndarray, name: str) -> None:
    """`stage_dir/model.json`: what `load_run` needs to rebuild the stage's network."""
    if not parallel.is_main_process():
        return
    files.atomic_write_text(stage_dir / "model.json", json.dumps(dict(
        format_version=config_lib.FORMAT_VERSION, stage=name, features=int(stage_cfg.features),
        num_layers=int(stage_cfg.num_layers), patch_size=int(stage_cfg.patch_size),
        pool=str(stage_cfg.get("pool", "max")), top_skip=bool(stage_cfg.get("top_skip", True)),
        predict_tile_size=int(stage_cfg.predict_tile_size), kernel=np.asarray(kernel, int).tolist(),
    ), indent=2))


def load_run(run_dir: str | os.PathLike, stage: str | None = None):
    """(config, stage name, StageModel) of the last trained stage of a run folder."""
    run_dir = pathlib.Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserInputError(f"{run_dir}: not a run folder (no config.json)")
    cfg = config_lib.from_json(cfg_path.read_text())
    names = [stage] if stage else ["stage2", "stage1"]
    for name in names:
        model_json = run_dir / name / "model.json"
        if not model_json.is_file():
            continue
        meta = json.loads(model_json.read_text())
        if meta.get("format_version") != config_lib.FORMAT_VERSION:
            raise UserInputError(f"{model_json}: run folder from an incompatible version "
                                 f"(format {meta.get('format_version')}, expected {config_lib.FORMAT_VERSION})")
        variables = train.load_stage_variables(run_dir / name, meta["features"], meta["num_layers"],
                                               meta["patch_size"], bool(meta.get("top_skip", True)))
        if variables is None:
            raise UserInputError(f"{run_dir / name / 'checkpoints'}: no checkpoint found")
        stage_cfg = cfg[name].copy_and_resolve_references()  # the network as trained (model.json)
        stage_cfg.update({k: meta[k] for k in config_lib.NETWORK_KEYS if k in meta})
        return cfg, name, stage_model(variables, cfg, stage_cfg,
                                      np.asarray(meta["kernel"], bool) if "kernel" in meta else None)
    raise UserInputError(f"{run_dir}: no trained stage found (no stage1/ or stage2/ model.json)")


def predict_files(run_dir, input_path, output_dir, *, overwrite: bool = False, axes: str = "",
                  output_dtype: str = "input", tta: bool | None = None,
                  stage: str | None = None) -> list[pathlib.Path]:
    """Denoise a TIFF file or a folder of TIFFs with a trained run; return the written paths.
    ``tta``: None follows the run's config (:func:`uses_tta`)."""
    cfg, name, model = load_run(run_dir, stage)
    if tta is not None:
        model.tta = bool(tta)
    tta = model.tta
    input_path = pathlib.Path(input_path)
    paths = [input_path] if input_path.is_file() else tiffio.list_tiffs(input_path)
    out_dir = pathlib.Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: output exists and is not a folder")
    dtype = None if output_dtype == "input" else "float32"
    written = []
    for path in paths:
        target = out_dir / path.name
        if target.exists() and not overwrite:
            raise UserInputError(f"{target}: exists; pass --overwrite to replace it")
    # Large grey files stream strip by strip (memory bounded by a strip, not the image).
    large = {path for path in paths if not axes and stream.is_large(path)}
    # Read (and so validate) every other input before writing anything: a bad file leaves no
    # partial output.
    images = {path: tiffio.read_image(path, axes or None) for path in paths if path not in large}
    if not parallel.is_main_process():  # the main process writes the files
        return [out_dir / path.name for path in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    # The in-memory files share one pooled noise model for the posterior step (large files stream
    # strip by strip with a model per strip, and the per-pixel step even with posterior_correlated).
    small = [path for path in paths if path not in large]
    denoised = dict(zip(small, model.denoise_files([images[path][0] for path in small])))
    for path in paths:
        if path in large:
            stream.denoise_tiff(model.variables, path, out_dir / path.name, apply_fn=model.apply_fn,
                                num_layers=model.num_layers, tile_size=model.tile_size, halo=model.halo, dtype=dtype,
                                overwrite=overwrite, tta=tta, posterior_mean=model.posterior_mean)
            written.append(out_dir / path.name)
            continue
        tiffio.write_image(out_dir / path.name, denoised[path], images[path][1], dtype=dtype,
                           overwrite=overwrite)
        written.append(out_dir / path.name)
    log.info("%s: denoised %d file(s) with %s into %s", run_dir, len(written), name, out_dir)
    return written
