"""Configs: the full default, loading `configs/*.py`, `--config.key=value` overrides, validation.

Every value is checked once, here, so the rest of the code can trust the config; an error names
the dotted key (``config stage1.patch_size: ...``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from typing import Any, Iterable

import ml_collections

from autostructn2v_jax.errors import ConfigError, UserInputError
from autostructn2v_jax.extractor_config import (  # noqa: F401  (re-exported)
    EXTRACTOR_DEFAULTS,
    EXTRACTOR_METHODS,
    extractor_config,
    validate_extractor_config,
)

FORMAT_VERSION = 2  # 2: one checkpoint per epoch holding state, best variables and history
MASK_SOURCES = ("stage1", "stage1_residual", "file", "extractor")
POSTERIOR_MODES = ("off", "gaussian", "poisson_gaussian")  # "off" + posterior.NOISE_MODELS
TTA_MODES = ("auto", "on", "off")  # test-time augmentation of the final predictions
WARM_STARTS = ("auto", "on", "off")  # stage 2 from stage 1's variables: when possible, always, never


def _stage(**overrides: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            patch_size=32,
            batch_size=4,
            features=64,
            num_layers=2,
            learning_rate=1e-4,
            patches_per_image=100,
            num_val_patches=128,
            mask_percentage=15.0,
            replacement_strategy="local_mean",
            mask_cluster=False,
            pool="max",
            top_skip=True,
            use_roi=True,
            roi_threshold=0.5,
            scale_factor=0.25,
            select_background=True,
            use_augmentation=True,
            steps_per_dispatch=10,
            predict_tile_size=256,
            time_budget_minutes=0.0,
        )
    )
    cfg.update(overrides)
    return cfg


def base_config() -> ml_collections.ConfigDict:
    """The full pipeline with the method's defaults (`configs/default.py`)."""
    cfg = ml_collections.ConfigDict()
    cfg.input_dir = ""
    cfg.output_dir = ""
    cfg.experiment_name = "autostructn2v"
    cfg.clean_dir = ""  # optional clean references: PSNR in the report
    cfg.axes = ""  # "" = infer; else "YX", "SYX", "ZYX", "TYX"
    cfg.output_dtype = "input"  # "input" keeps the input dtype; "float32" on request
    cfg.overwrite = False
    cfg.random_seed = 42
    cfg.cpu_devices = 0  # 0: auto (parallel.cpu_device_count); N: split the CPU into N devices
    cfg.split_ratio = (0.7, 0.15, 0.15)
    cfg.num_epochs = 100
    cfg.early_stopping = True
    cfg.early_stopping_patience = 10
    cfg.early_stopping_min_delta = 1e-4  # relative improvement of the masked validation loss
    cfg.lr_plateau_factor = 0.5
    cfg.lr_plateau_patience = 5
    cfg.time_budget_minutes = 0.0  # 0: no limit; else split over the stages trained
    cfg.lr_schedule = "auto"  # auto: cosine with a time budget, plateau without
    cfg.warmup_fraction = 0.05
    cfg.posterior_mean = "gaussian"  # posterior-mean final step on every prediction (posterior.py)
    # Joint posterior under the noise correlation over a stage-2 mask: +0.26-0.30 dB on a 300-step
    # features-16 model (hcorr), -0.15 / -1.3 dB on the quality tests' small networks: opt-in
    # (docs/benchmarks.md, "Correlated posterior").
    cfg.posterior_correlated = False
    # Mean over the 8 flips/rotations of every prediction, for stages trained with them (auto):
    # +0.56 dB (white) and +0.94 dB (hcorr) on the 5-minute runs, for 8x the network work at
    # prediction (docs/benchmarks.md, "Test-time augmentation by default").
    cfg.tta = "auto"
    cfg.run_stage1 = True
    cfg.run_stage2 = True
    # Stage 1's network and step: what reached a given PSNR first on CPU (docs/benchmarks.md, "Time
    # to quality"): +2.8 dB over features 64 / batch 4 / patch 32 / lr 1e-4 after 5 minutes.
    cfg.stage1 = _stage(mask_center_size=1, patch_size=64, batch_size=16, features=16,
                        learning_rate=1e-3)
    # Stage 2 from scratch, measured the same way (x-correlated photo crops, 5-px line mask, 4 min):
    # 28.6 dB against 21.7 dB for features 64 / batch 4 / patch 96 / lr 1e-5, which under-trained.
    # One level deeper than stage 1: with a structured mask hidden the network predicts from farther
    # pixels (hcorr, 30 min: 30.74 -> 30.90 dB at depth 3). With the centre alone stage 2 continues
    # stage 1's network instead (pipeline.stage2_settings, warm_start=auto).
    cfg.stage2 = _stage(
        patch_size=64,
        batch_size=16,
        features=16,
        num_layers=3,
        learning_rate=1e-3,
        mask_percentage=10.0,
        mask_cluster=True,
        patches_per_image=200,
        use_roi=False,
        select_background=False,
        mask_source="extractor",
        mask_file_path="",
        warm_start="auto",
    )
    cfg.stage2.extractor = extractor_config()
    return cfg


# --------------------------------------------------------------------------- loading


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/config.py[:arg]` and call its `get_config(arg)`."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise UserInputError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a user file: report it in one line
        raise UserInputError(f"{path}: cannot load config: {err}") from err
    if not hasattr(module, "get_config"):
        raise UserInputError(f"{path}: config file has no get_config()")
    return module.get_config(arg or None)


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply `key.sub=value` overrides (the `--config.key=value` syntax without the prefix)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(key, "override needs the form --config.KEY=VALUE")
        set_value(cfg, key, text)


def set_value(cfg: ml_collections.ConfigDict, key: str, text: Any) -> None:
    """Set dotted `key` from a string (parsed by the current value's type) or a value."""
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(key, "unknown config key")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(key, "unknown config key")
    current = node[parts[-1]]
    value = _parse_value(text, current) if isinstance(text, str) else text
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(key, f"wrong type: {err}") from err


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(cfg, key: str, prefix: str) -> None:
    value = cfg[key]
    _check(_is_int(value) and value >= 1, f"{prefix}{key}", f"must be an integer >= 1, got {value!r}")


def _bool(cfg, key: str, prefix: str) -> None:
    _check(isinstance(cfg[key], bool), f"{prefix}{key}", f"must be true or false, got {cfg[key]!r}")


def validate_stage(stage: ml_collections.ConfigDict, name: str) -> None:
    from autostructn2v_jax import masking, models

    p = f"{name}."
    for key in ("patch_size", "batch_size", "features", "num_layers", "patches_per_image",
                "num_val_patches", "steps_per_dispatch", "predict_tile_size"):
        _positive_int(stage, key, p)
    for key in ("use_roi", "select_background", "use_augmentation", "top_skip", "mask_cluster"):
        _bool(stage, key, p)
    _check(stage.pool in models.POOLS, p + "pool", f"must be one of {models.POOLS}, got {stage.pool!r}")
    lr = stage.learning_rate
    _check(_is_number(lr) and 0 < lr < 1, p + "learning_rate", f"must be in (0, 1), got {lr!r}")
    pct = stage.mask_percentage
    _check(_is_number(pct) and 0 < pct <= 50, p + "mask_percentage", f"must be in (0, 50], got {pct!r}")
    strat = stage.replacement_strategy
    _check(strat in masking.STRATEGIES or strat in range(len(masking.STRATEGIES)),
           p + "replacement_strategy",
           f"must be one of {masking.STRATEGIES} (or their index), got {strat!r}")
    thr = stage.roi_threshold
    _check(_is_number(thr) and 0 <= thr <= 1, p + "roi_threshold", f"must be in [0, 1], got {thr!r}")
    sf = stage.scale_factor
    _check(_is_number(sf) and 0 < sf <= 1, p + "scale_factor", f"must be in (0, 1], got {sf!r}")
    _check(stage.num_layers <= 6, p + "num_layers", f"must be <= 6, got {stage.num_layers}")
    models.check_patch_size(stage.patch_size, stage.num_layers, p + "patch_size")
    div = 2 ** stage.num_layers
    _check(stage.predict_tile_size % div == 0, p + "predict_tile_size",
           f"must be a multiple of 2**num_layers = {div}, got {stage.predict_tile_size}")
    _check(_is_number(stage.time_budget_minutes) and stage.time_budget_minutes >= 0,
           p + "time_budget_minutes", f"must be a number of minutes >= 0, got {stage.time_budget_minutes!r}")
    if "mask_center_size" in stage:
        masking.check_center_size(stage.mask_center_size, p + "mask_center_size")


def validate_config(cfg: ml_collections.ConfigDict, *, need_io: bool = True) -> None:
    """Raise ConfigError naming the first invalid key."""
    from autostructn2v_jax import policy, preprocess

    if need_io:
        _check(bool(cfg.input_dir), "input_dir", "is required (--config.input_dir=DIR)")
        _check(bool(cfg.output_dir), "output_dir", "is required (--config.output_dir=DIR)")
    for key in ("run_stage1", "run_stage2", "early_stopping", "overwrite"):
        _bool(cfg, key, "")
    _check(cfg.run_stage1 or cfg.run_stage2, "run_stage1", "at least one of run_stage1/run_stage2 must be true")
    _check(_is_int(cfg.random_seed) and cfg.random_seed >= 0, "random_seed",
           f"must be an integer >= 0, got {cfg.random_seed!r}")
    _check(_is_int(cfg.cpu_devices) and cfg.cpu_devices >= 0, "cpu_devices",
           f"must be an integer >= 0 (0 = auto), got {cfg.cpu_devices!r}")
    preprocess.check_split_ratio(cfg.split_ratio)
    for key in ("num_epochs", "early_stopping_patience", "lr_plateau_patience"):
        _positive_int(cfg, key, "")
    _check(_is_number(cfg.early_stopping_min_delta) and cfg.early_stopping_min_delta >= 0,
           "early_stopping_min_delta", "must be a number >= 0")
    _check(_is_number(cfg.lr_plateau_factor) and 0 < cfg.lr_plateau_factor < 1, "lr_plateau_factor",
           f"must be in (0, 1), got {cfg.lr_plateau_factor!r}")
    _check(_is_number(cfg.time_budget_minutes) and cfg.time_budget_minutes >= 0, "time_budget_minutes",
           f"must be a number of minutes >= 0 (0 = no limit), got {cfg.time_budget_minutes!r}")
    _check(cfg.lr_schedule in policy.LR_SCHEDULES, "lr_schedule",
           f"must be one of {policy.LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    _check(_is_number(cfg.warmup_fraction) and 0 <= cfg.warmup_fraction < 1, "warmup_fraction",
           f"must be in [0, 1), got {cfg.warmup_fraction!r}")
    _check(cfg.output_dtype in ("input", "float32"), "output_dtype",
           f"must be 'input' or 'float32', got {cfg.output_dtype!r}")
    _check(cfg.posterior_mean in POSTERIOR_MODES, "posterior_mean",
           f"must be one of {POSTERIOR_MODES}, got {cfg.posterior_mean!r}")
    _check(isinstance(cfg.posterior_correlated, bool), "posterior_correlated",
           f"must be true or false, got {cfg.posterior_correlated!r}")
    _check(cfg.tta in TTA_MODES, "tta", f"must be one of {TTA_MODES}, got {cfg.tta!r}")
    _check(cfg.axes in ("", "YX", "SYX", "ZYX", "TYX", "CYX"), "axes",
           f"must be one of '', YX, SYX, ZYX, TYX, CYX; got {cfg.axes!r}")
    if cfg.run_stage1:
        validate_stage(cfg.stage1, "stage1")
    if cfg.run_stage2:
        validate_stage(cfg.stage2, "stage2")
        src = cfg.stage2.mask_source
        _check(src in MASK_SOURCES, "stage2.mask_source", f"must be one of {MASK_SOURCES}, got {src!r}")
        if src in ("stage1", "stage1_residual"):
            _check(cfg.run_stage1, "stage2.mask_source",
                   f"{src!r} needs run_stage1=true (use 'file' or 'extractor' for stage 2 alone)")
        if src == "file":
            _check(bool(cfg.stage2.mask_file_path), "stage2.mask_file_path",
                   "is required when stage2.mask_source='file'")
        ext = cfg.stage2.extractor
        validate_extractor_config(ext, prefix="stage2.extractor")
        warm = cfg.stage2.get("warm_start", "off")
        _check(warm in WARM_STARTS, "stage2.warm_start", f"must be one of {WARM_STARTS}, got {warm!r}")
        if warm == "on":
            _check(cfg.run_stage1, "stage2.warm_start", "'on' needs run_stage1=true (or use 'auto'/'off')")
            differ = network_differences(cfg)
            _check(not differ, "stage2.warm_start",
                   f"'on' needs the same network in both stages; stage1 and stage2 differ in {', '.join(differ)}")


NETWORK_KEYS = ("features", "num_layers", "pool", "top_skip")  # what a stage's variables depend on


def network_differences(cfg: ml_collections.ConfigDict,
                        stage2: ml_collections.ConfigDict | None = None) -> list[str]:
    """The keys in which stage 1's and stage 2's networks differ (empty: one can start from the
    other's variables, `stage2.warm_start`). ``stage2``: stage 2's settings as run, when they are
    not `cfg.stage2` itself (`pipeline.stage2_settings`)."""
    s2 = cfg.stage2 if stage2 is None else stage2
    return [k for k in NETWORK_KEYS if cfg.stage1[k] != s2[k]]


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a config saved with `to_json` on top of the defaults (unknown keys are errors)."""
    data = json.loads(text)
    cfg = base_config()

    def merge(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise ConfigError(prefix + key, "unknown key in saved config (incompatible version?)")
            if isinstance(node[key], ml_collections.ConfigDict):
                merge(node[key], value, prefix + key + ".")
            else:
                node[key] = tuple(value) if isinstance(node[key], tuple) else value

    with cfg.unlocked():
        merge(cfg, data, "")
    return cfg


# --------------------------------------------------------------------------- documentation

DESCRIPTIONS = {
    "input_dir": "folder of noisy TIFFs (2D images or stacks of 2D planes)",
    "output_dir": "the run folder: checkpoints, metrics, masks, denoised images",
    "experiment_name": "a name stored with the run",
    "clean_dir": "optional folder of clean references with the same file names: PSNR in summary.json",
    "axes": "axes of the input ('' = infer; YX, SYX, ZYX, TYX; CYX takes the first channel)",
    "output_dtype": "'input' writes the input's dtype, 'float32' writes float32",
    "overwrite": "allow replacing a run folder that holds a run with a different config",
    "random_seed": "root of every random key (splits, patches, masks, initialisation)",
    "cpu_devices": "CPU only: split the processor into this many JAX devices for data-parallel training (0 = auto: one per core when a stage's layers are big enough to gain, see docs/benchmarks.md; 1 = off). Set before JAX starts: the command line applies it, a Python session that already ran JAX keeps its devices",
    "split_ratio": "train/val/test fractions of the image planes; too few planes: a held-out region",
    "num_epochs": "maximum epochs per stage",
    "early_stopping": "stop when the masked validation loss stops improving",
    "early_stopping_patience": "epochs without improvement before stopping",
    "early_stopping_min_delta": "relative improvement that counts",
    "lr_plateau_factor": "learning rate factor on a validation plateau (ReduceLROnPlateau)",
    "lr_plateau_patience": "epochs without improvement before the learning rate is reduced",
    "time_budget_minutes": "training time limit in minutes (0 = none). At the top level it is split over the stages trained (stage 1 half, or a fifth when a structured stage-2 mask is known before it trains; stage 2 the rest); a stage's own value overrides its share. When it runs out the stage validates, keeps its best model, then predicts and reports",
    "lr_schedule": "auto (cosine with a time budget, plateau without), plateau (ReduceLROnPlateau), cosine (warm-up then cosine to 0 over the budget or num_epochs)",
    "warmup_fraction": "cosine schedule: fraction of the budget (or of the steps) spent warming the learning rate up from 0",
    "posterior_mean": "final step after each stage's prediction: combine it with the noisy pixel itself (posterior mean, noise model estimated from the data): off, gaussian or poisson_gaussian",
    "posterior_correlated": "with posterior_mean on, a stage with a structural mask (stage 2) uses the noise correlation over its mask, estimated from the residuals, in a joint posterior mean of the whole plane (helps well-trained models on line-correlated noise; off by default)",
    "tta": "test-time augmentation of the run's predictions (and the default of `predict`): the mean over the 8 flips/90-degree rotations. auto: for a stage trained with use_augmentation (its network has seen every orientation of the image and of the structured noise), on, off. Prediction does 8x the network work",
    "run_stage1": "train stage 1 (Noise2Void)",
    "run_stage2": "train stage 2 (structured Noise2Void)",
    "patch_size": "training patch side; a multiple of 2**num_layers",
    "batch_size": "patches per step (split over the devices)",
    "features": "U-Net base features (doubled per level)",
    "num_layers": "U-Net depth (number of poolings)",
    "learning_rate": "Adam learning rate",
    "patches_per_image": "patches per image plane per epoch (defines the epoch length)",
    "num_val_patches": "size of the fixed validation set (patches and masks drawn once)",
    "mask_percentage": "target percentage of hidden pixels per patch",
    "mask_cluster": "for a line mask (evenly spaced collinear pixels) whose doubled copies still tile the patch at mask_percentage: hide copies of the line extended to twice its length and take the loss at every pixel whose whole mask is hidden (9 loss pixels per 17 hidden for a 9-pixel line, instead of 1 per 9); other masks keep one loss pixel per copy",
    "mask_center_size": "stage 1: side of the hidden centre block (odd)",
    "replacement_strategy": "local_mean (0): mean of unmasked 3x3 neighbours; zero (1); random (2): a random unmasked value; median: median of unmasked 3x3 neighbours (N2V2)",
    "pool": "U-Net down-sampling: max (2x2 max-pool) or blur (N2V2 max-blur-pool, against checkerboard artefacts)",
    "top_skip": "keep the U-Net's top-level skip connection (false: N2V2, the output cannot copy the input's finest detail)",
    "use_roi": "sample patches from regions of interest only",
    "roi_threshold": "ROI threshold on the smoothed, [0,1]-scaled thumbnail",
    "scale_factor": "thumbnail scale for the ROI map",
    "select_background": "ROI selects background (true) or structures (false)",
    "use_augmentation": "random flips and 90-degree rotations (masks turn with the patch)",
    "steps_per_dispatch": "train steps per compiled call (lax.scan)",
    "predict_tile_size": "tile side for whole-image prediction (halo added on top)",
    "mask_source": "extractor (autocorrelation of the raw images; the default), stage1 (autocorrelation of stage-1 output), stage1_residual (noisy - stage 1), file",
    "warm_start": "stage 2 starts from stage 1's best variables instead of a random network: auto (only when stage 2 repeats stage 1's task: stage 1 trained in this run and the mask is stage 1's blind spot, e.g. the centre alone for white noise; stage 2 then takes stage 1's network), on (whenever the networks match; an error otherwise) or off",
    "mask_file_path": "a .npy structural mask (2D, odd sides, centre True) for mask_source=file",
    "method": "deconvolved (significance test as detector, extent from the noise ACF recovered from the flattest tiles), significance (lags significantly above white noise after the high-pass) or ring (ring-by-ring thresholds)",
    "max_center_size": "the crop grows (by 4) up to this side while the mask reaches its edge; a mask still at the edge is reported as truncated",
    "flat_fraction": "deconvolved: the 32-pixel tiles whose coarse variance is at most 2x this quantile are the flat ones whose autocorrelation is inverted",
    "deconv_threshold": "deconvolved: smallest recovered noise correlation kept in the mask",
    "deconv_detect_threshold": "deconvolved: a recovered correlation this high counts as structure even when the significance test finds none (1.0 here and in deconv_excess_threshold: only the significance test detects)",
    "deconv_excess_threshold": "deconvolved: a recovered correlation this far above the recovered ACF's smooth pedestal (image content) counts as structure; beyond the recovery radius lags must also stand out this far",
    "center_size": "side of the autocorrelation crop and the largest mask (odd)",
    "adapt_autocorr": "subtract a radially growing threshold surface before thresholding",
    "adapt_CB": "strength of that surface (percent)",
    "adapt_DF": "its distance factor",
    "center_ratio_threshold": "a ring is considered only if its maximum is this fraction of the centre",
    "base_percentile": "in-ring percentile threshold of the first ring",
    "percentile_decay": "the percentile grows by this factor per ring",
    "use_center_proximity": "also keep pixels close to the centre value",
    "center_proximity_threshold": "value/centre ratio for that",
    "keep_center_component_only": "keep only the 8-connected part holding the centre",
    "max_true_pixels": "cap on mask pixels (highest autocorrelation kept)",
    "z_threshold": "significance method: z-score floor",
    "min_correlation": "significance method: minimum correlation coefficient",
    "num_patches": "patches whose autocorrelation is averaged",
    "num_pixels": "significance method: pixel count behind the z-score (0 = from the patches)",
    "use_background": "draw those patches from background regions",
    "highpass_sigma": "subtract a Gaussian blur of this sigma (pixels) from the images before the autocorrelation, so the image's own smooth correlation is not taken for noise structure (0 = off)",
}


def config_table(cfg: ml_collections.ConfigDict | None = None) -> str:
    """Markdown table of every key, its default and meaning (rendered into the README)."""
    cfg = cfg or base_config()
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(node, prefix):
        for key in sorted(node.keys(), key=lambda k: (isinstance(node[k], ml_collections.ConfigDict), k)):
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                leaf = key.split(".")[-1]
                rows.append(f"| `{prefix}{key}` | `{value!r}` | {DESCRIPTIONS.get(leaf, '')} |")

    walk(cfg, "")
    return "\n".join(rows)
