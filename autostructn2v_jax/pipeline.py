"""The four execution modes and the run folder (composed from tiffio, preprocess, extraction,
train and inference).

1. full pipeline (`run_stage1`, `run_stage2`; the mask from the raw images by default, or from the
   stage-1 output with `stage2.mask_source` = stage1 / stage1_residual)
2. stage 1 only (`run_stage2=False`)
3. stage 2 with a mask file (`run_stage1=False`, `mask_source="file"`)
4. stage 2 with a mask extracted from the raw images (`run_stage1=False`, `mask_source="extractor"`)

Run folder (`output_dir`): `config.json`, `normalization.json`, `stage1/` and `stage2/` with
`checkpoints/`, `metrics.jsonl`, `model.json`, `denoised/`; `mask/` for stage 2; `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Callable

import numpy as np

from autostructn2v_jax import config as config_lib
from autostructn2v_jax import extraction, files, inference, maskfile, masking, parallel, policy, preprocess, synth, tiffio, train
from autostructn2v_jax.errors import ConfigError, UserInputError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Dataset:
    """The input images: per file its planes (original dtype), metadata and normalised planes."""

    paths: list[pathlib.Path]
    raw: list[np.ndarray]  # (P, H, W) per file, original dtype
    meta: list[dict]
    normed: list[list[np.ndarray]]  # float32 per plane
    stats: list[list[dict]]

    def flat(self) -> list[np.ndarray]:
        return [p for planes in self.normed for p in planes]

    def restore(self, i: int, outputs: list[np.ndarray]) -> np.ndarray:
        """Normalised outputs of file `i`'s planes back in its intensity units, `(P, H, W)`."""
        return np.stack([preprocess.denormalize(o, s) for o, s in zip(outputs, self.stats[i])])


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """A run-folder text file, written by the main process only (see `parallel.is_main_process`)."""
    if not parallel.is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, text)


def load_dataset(folder: str | os.PathLike, axes: str = "") -> Dataset:
    paths = tiffio.list_tiffs(folder)
    raw, meta, normed, stats = [], [], [], []
    for path in paths:
        planes, m = tiffio.read_image(path, axes or None)
        raw.append(planes)
        meta.append(m)
        pairs = [preprocess.normalize(p) for p in planes]
        normed.append([n for n, _ in pairs])
        stats.append([s for _, s in pairs])
    return Dataset(paths, raw, meta, normed, stats)


def split_planes(ds: Dataset, cfg, patch_size: int):
    """(train, val, test) plane lists; a held-out region when there are too few planes."""
    planes = ds.flat()
    train_idx, val_idx, test_idx = preprocess.split_images(len(planes), tuple(cfg.split_ratio), int(cfg.random_seed))
    if len(val_idx) == 0 or len(train_idx) == 0:
        train_planes, val_planes = preprocess.holdout_split([planes[i] for i in range(len(planes))], patch_size)
        log.info("%d image plane(s): validation uses a held-out region of each image", len(planes))
        return train_planes, val_planes, []
    return [planes[i] for i in train_idx], [planes[i] for i in val_idx], [planes[i] for i in test_idx]


def denoise_dataset(model: inference.StageModel, ds: Dataset, out_dir: pathlib.Path, cfg, *,
                    overwrite: bool = True) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Denoise every plane (normalised space); the main process writes the final outputs as TIFFs
    in the input's units. Returns (final outputs, raw network predictions), both normalised, in
    every process: the raw ones feed a stage-1-based autocorrelation, which must not see the
    posterior-mean step's pass-through of the noisy pixels."""
    write = parallel.is_main_process()
    dtype = None if cfg.output_dtype == "input" else "float32"
    raws = [[model(p) for p in planes] for planes in ds.normed]
    finals = model.finish_all(ds.normed, raws, ds.stats)  # one noise model for the whole dataset
    if write:
        for i, path in enumerate(ds.paths):
            tiffio.write_image(out_dir / path.name, ds.restore(i, finals[i]), ds.meta[i], dtype=dtype,
                               overwrite=overwrite)
    return finals, raws




def check_kernel_fits(kernel: np.ndarray, patch_size: int, source: str) -> None:
    """A structural kernel must fit (with its one-pixel gap) into a stage-2 training patch."""
    try:
        masking.mask_capacity(np.asarray(kernel, bool), (patch_size, patch_size))
    except ValueError as err:
        raise UserInputError(f"{source}: mask of shape {np.shape(kernel)} does not fit a "
                             f"stage2.patch_size={patch_size} patch ({err})") from None


def find_mask(cfg, ds: Dataset, train_planes_for_acf: list[np.ndarray], run_dir: pathlib.Path,
              mask_file: np.ndarray | None = None):
    """The stage-2 kernel from the configured source; writes `mask/`.

    `mask_file`: the already loaded and validated mask for `mask_source="file"` (loaded before the
    run folder is written, so a bad mask file leaves nothing behind)."""
    s2 = cfg.stage2
    info: dict = {"source": s2.mask_source}
    if s2.mask_source == "file":
        mask = mask_file if mask_file is not None else maskfile.load_mask_file(s2.mask_file_path)
    else:
        ext = s2.extractor
        mask, extracted = extraction.mask_from_planes(train_planes_for_acf, ext, int(cfg.random_seed),
                                                      patch_size=int(s2.patch_size))
        check_kernel_fits(mask, int(s2.patch_size), "config stage2.extractor.center_size")
        info.update(extracted)
        info["highpass_sigma"] = float(ext.highpass_sigma)
    info["summary"] = extraction.mask_summary(mask)
    if parallel.is_main_process():
        _write_mask_dir(run_dir / "mask", mask, info, cfg)
    log.info("stage 2 structural mask (%s): %s", s2.mask_source, info["summary"])
    if info.get("truncated"):
        log.warning("the noise correlation is longer than the largest mask (stage2.extractor.max_center_size): "
                    "stage 2 cannot remove it fully (stripes along whole rows or columns need destriping first)")
    if mask.sum() == 1:
        log.info("no structure found: stage 2 trains as plain N2V with the stage-2 settings")
    return mask, info


def stage2_settings(cfg, stage1_kernel: np.ndarray | None, stage2_kernel: np.ndarray):
    """Stage 2's settings: `cfg.stage2`, but with stage 1's network (`config.NETWORK_KEYS`) when
    `stage2.warm_start=auto` and stage 2 repeats stage 1's task (stage 1 trained in this run, the
    mask is its blind spot): stage 2 then continues stage 1's network. Stage 2's own network (by
    default deeper than stage 1's, for the far context a structured mask needs) is for the
    structured case."""
    s2 = cfg.stage2
    if (s2.get("warm_start", "off") != "auto" or stage1_kernel is None
            or _offsets(stage1_kernel) != _offsets(stage2_kernel)):
        return s2
    differ = config_lib.network_differences(cfg)
    if not differ:
        return s2
    adopted = s2.copy_and_resolve_references()
    for key in config_lib.NETWORK_KEYS:
        adopted[key] = cfg.stage1[key]
    try:  # stage 2's patch and tile sizes must suit stage 1's network
        config_lib.validate_stage(adopted, "stage2")
    except ConfigError as err:
        log.info("stage 2 keeps its own network: with stage 1's, %s", err)
        return s2
    log.info("stage 2 repeats stage 1's task (its mask is stage 1's blind spot): it continues stage 1's "
             "network (%s as stage 1's; stage2.warm_start=auto)", ", ".join(differ))
    return adopted


def warm_start_variables(cfg, stage1_variables: dict | None, stage1_kernel: np.ndarray | None,
                         stage2_kernel: np.ndarray, s2=None) -> dict | None:
    """Stage 1's best variables for stage 2 to start from (`stage2.warm_start`), or None.

    `auto` warm-starts only when stage 2 repeats stage 1's task: the same blind spot (a mask of the
    centre pixel alone, the white-noise case), and then stage 2 has stage 1's network
    (:func:`stage2_settings`; ``s2``, default `cfg.stage2`). Stage 2 then continues stage 1's
    training instead of starting over on half the budget (white photo crops, 5 minutes:
    +0.3-0.6 dB). With a structured mask it trains from scratch: stage 1's network has learned to copy
    the correlated noise from the neighbours, and unlearning that cost 1.9 dB against a fresh
    network in the same time (docs/benchmarks.md, "Warm start"). `on` warm-starts whenever the
    networks match (`config.validate_config` checks it)."""
    mode = cfg.stage2.get("warm_start", "off")
    if mode == "off" or stage1_variables is None:
        return None
    same_net = not config_lib.network_differences(cfg, s2)
    same_task = stage1_kernel is not None and _offsets(stage1_kernel) == _offsets(stage2_kernel)
    if mode == "auto" and not (same_net and same_task):
        why = "its network differs from stage 1's" if not same_net else "its mask differs from stage 1's blind spot"
        log.info("stage 2 trains from scratch: %s (stage2.warm_start=auto)", why)
        return None
    log.info("stage 2 starts from stage 1's best variables (stage2.warm_start=%s)", mode)
    return stage1_variables


def _offsets(kernel: np.ndarray) -> set[tuple[int, int]]:
    """The hidden pixels of an odd-sided kernel as offsets from its centre (shape-independent)."""
    k = np.asarray(kernel, bool)
    ys, xs = np.nonzero(k)
    return set(zip((ys - k.shape[0] // 2).tolist(), (xs - k.shape[1] // 2).tolist()))


def _write_mask_dir(mask_dir: pathlib.Path, mask: np.ndarray, info: dict, cfg) -> None:
    """`mask/`: the mask, the autocorrelation it came from, a figure and `extraction.json`."""
    s2 = cfg.stage2
    mask_dir.mkdir(parents=True, exist_ok=True)
    if "acf_crop" in info:
        acf = np.asarray(info["acf_crop"], np.float32)
        files.atomic_write(mask_dir / "autocorrelation.npy", lambda f: np.save(f, acf), ".npy")
    maskfile.save_mask(mask_dir / "structural_mask.npy", mask)
    tiled, _ = masking.draw_mask(int(cfg.random_seed), mask, (int(s2.patch_size),) * 2,
                                 float(s2.mask_percentage), bool(s2.get("mask_cluster", False)))
    try:
        from autostructn2v_jax import report

        report.plot_mask_figure(info, mask, tiled, mask_dir / "mask.png")
    except Exception as err:  # a figure must never cost a run
        log.warning("could not draw mask figure: %s", err)
    write_text_atomic(mask_dir / "extraction.json", json.dumps(_jsonable(info), indent=2))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


def prepare_run_dir(cfg) -> pathlib.Path:
    """Create the run folder; refuse a folder holding a different run unless `overwrite`."""
    run_dir = pathlib.Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: output_dir exists and is not a folder")
    cfg_path = run_dir / "config.json"
    text = config_lib.to_json(cfg)
    if cfg_path.exists():
        if cfg_path.read_text() != text:
            if not cfg.overwrite:
                raise UserInputError(
                    f"{run_dir}: holds a run with a different config; choose a new output_dir "
                    "or pass --config.overwrite=true to replace it")
            for sub in ("stage1", "stage2", "mask"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        else:
            log.info("%s: same config found, resuming", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg_path, text)
    return run_dir


def load_clean_references(cfg, ds: Dataset) -> list[np.ndarray] | None:
    """The clean reference of every input image (same order), checked for names and shapes; None
    without `clean_dir`. Called before training, so a bad clean folder fails before any work."""
    if not cfg.clean_dir:
        return None
    clean = load_dataset(cfg.clean_dir, cfg.axes)
    by_name = {p.name: planes for p, planes in zip(clean.paths, clean.raw)}
    refs = []
    for i, path in enumerate(ds.paths):
        if path.name not in by_name:
            raise UserInputError(f"{pathlib.Path(cfg.clean_dir) / path.name}: no clean reference for {path}")
        ref = by_name[path.name].astype(np.float32)
        if ref.shape != ds.raw[i].shape:
            raise UserInputError(f"{pathlib.Path(cfg.clean_dir) / path.name}: shape {ref.shape} "
                                 f"does not match the noisy image {ds.raw[i].shape}")
        refs.append(ref)
    return refs


def _psnr_table(ds: Dataset, outputs: dict[str, list[list[np.ndarray]]],
                refs: list[np.ndarray] | None) -> dict | None:
    """PSNR of the noisy inputs and every stage's outputs against the clean references."""
    if refs is None:
        return None
    return synth.psnr_table(
        (path.name, refs[i], {"noisy": ds.raw[i].astype(np.float32),
                              **{stage: ds.restore(i, outs[i]) for stage, outs in outputs.items()}})
        for i, path in enumerate(ds.paths))


def run_pipeline(cfg, progress: Callable[[str, dict], None] | None = None) -> dict:
    """Run the configured mode end to end; return a summary (also written to `summary.json`)."""
    config_lib.validate_config(cfg)
    ds = load_dataset(cfg.input_dir, cfg.axes)
    for name, run in (("stage1", cfg.run_stage1), ("stage2", cfg.run_stage2)):
        if run:
            preprocess.check_min_size(ds.raw, ds.paths, int(cfg[name].patch_size), f"{name}.patch_size")
    # Everything else that can fail on user input is loaded before the run folder is touched.
    mask_file = None
    if cfg.run_stage2 and cfg.stage2.mask_source == "file":
        mask_file = maskfile.load_mask_file(cfg.stage2.mask_file_path)
        check_kernel_fits(mask_file, int(cfg.stage2.patch_size), f"mask file {cfg.stage2.mask_file_path}")
    clean_refs = load_clean_references(cfg, ds)
    run_dir = prepare_run_dir(cfg)
    write_text_atomic(run_dir / "normalization.json", json.dumps(
        {p.name: s for p, s in zip(ds.paths, ds.stats)}, indent=2, default=float))
    summary: dict = {"stages": {}, "outputs": {}}
    outputs: dict[str, list[list[np.ndarray]]] = {}

    stage1_out = stage1_variables = stage1_kernel = None
    trained_seconds = 0.0  # training time so far: stage 2's budget is what the run has left
    # A mask from the raw images or a file is found first: when it is structured, stage 2 makes the
    # final output alone and gets the larger share of a time budget (policy.stage1_share).
    early_mask = None
    if cfg.run_stage2 and cfg.stage2.mask_source in ("extractor", "file"):
        early_mask = find_mask(cfg, ds, ds.flat(), run_dir, mask_file)
    if cfg.run_stage1:
        s1 = cfg.stage1
        kernel = masking.stage1_kernel(int(s1.mask_center_size))
        train_p, val_p, _ = split_planes(ds, cfg, int(s1.patch_size))
        result = train.train_stage(train_p, val_p, s1, cfg, kernel, run_dir / "stage1", name="stage1",
                                   progress=(lambda r: progress("stage1", r)) if progress else None,
                                   budget_seconds=policy.stage_budget_seconds(
                                       cfg, "stage1", stage1_share=policy.stage1_share(
                                           early_mask[0] if early_mask else None)))
        trained_seconds += result.seconds
        stage1_variables, stage1_kernel = result.variables, kernel
        inference.save_model_json(run_dir / "stage1", s1, kernel, "stage1")
        model = inference.stage_model(result.variables, cfg, s1, kernel)
        outputs["stage1"], stage1_out = denoise_dataset(model, ds, run_dir / "stage1" / "denoised", cfg)
        summary["stages"]["stage1"] = dict(best_val_loss=result.best_val_loss, epochs=result.epochs_run,
                                           stopped_early=result.stopped_early,
                                           out_of_time=result.out_of_time, tta=model.tta,
                                           train_seconds=round(result.seconds, 1))
        summary["outputs"]["stage1"] = str(run_dir / "stage1" / "denoised")

    if cfg.run_stage2:
        train_p, val_p, _ = split_planes(ds, cfg, int(cfg.stage2.patch_size))
        if early_mask is not None:
            kernel, info = early_mask
        else:  # the mask comes from stage 1's output
            flat_out = [p for planes in stage1_out for p in planes]
            if cfg.stage2.mask_source == "stage1_residual":
                flat_out = [n - o for n, o in zip(ds.flat(), flat_out)]
            kernel, info = find_mask(cfg, ds, flat_out, run_dir, mask_file)
        s2 = stage2_settings(cfg, stage1_kernel, kernel)
        warm = warm_start_variables(cfg, stage1_variables, stage1_kernel, kernel, s2)
        result = train.train_stage(train_p, val_p, s2, cfg, kernel, run_dir / "stage2", name="stage2",
                                   progress=(lambda r: progress("stage2", r)) if progress else None,
                                   budget_seconds=policy.stage_budget_seconds(cfg, "stage2", trained_seconds),
                                   init_variables=warm)
        inference.save_model_json(run_dir / "stage2", s2, kernel, "stage2")
        model = inference.stage_model(result.variables, cfg, s2, kernel)
        outputs["stage2"], _ = denoise_dataset(model, ds, run_dir / "stage2" / "denoised", cfg)
        summary["stages"]["stage2"] = dict(best_val_loss=result.best_val_loss, epochs=result.epochs_run,
                                           stopped_early=result.stopped_early,
                                           out_of_time=result.out_of_time,
                                           train_seconds=round(result.seconds, 1), mask=info.get("summary"),
                                           warm_start=warm is not None, tta=model.tta,
                                           mask_pixels=int(np.asarray(kernel).sum()), num_layers=int(s2.num_layers))
        summary["outputs"]["stage2"] = str(run_dir / "stage2" / "denoised")

    summary["final"] = "stage2" if cfg.run_stage2 else "stage1"
    summary["psnr"] = _psnr_table(ds, outputs, clean_refs)
    write_text_atomic(run_dir / "summary.json", json.dumps(_jsonable(summary), indent=2))
    if parallel.is_main_process():
        try:
            from autostructn2v_jax import report

            summary["report"] = str(report.write_report(run_dir))
        except Exception as err:  # the report is a convenience: never lose a finished run over it
            log.warning("could not write the run report: %s", err)
    return summary
