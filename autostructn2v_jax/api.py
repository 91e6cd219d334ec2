"""The small public Python API: a whole job in a few lines.

    import autostructn2v_jax as asn2v
    cfg = asn2v.load_config("configs/default.py", input_dir="tiffs", output_dir="runs/exp1")
    summary = asn2v.run(cfg)                      # train the configured stages, denoise the inputs
    clean = asn2v.denoise("runs/exp1", noisy)     # a numpy array (H, W) or (P, H, W) in, same out
    mask, info = asn2v.extract_mask(noisy_planes) # structural mask straight from raw images
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from autostructn2v_jax import config as config_lib


def load_config(path: str = "configs/default.py", **overrides: Any):
    """Load a config file and set dotted keys, e.g. `load_config(p, **{"stage1.patch_size": 64})`."""
    cfg = config_lib.load_config(path) if os.path.exists(path.partition(":")[0]) else _packaged(path)
    for key, value in overrides.items():
        config_lib.set_value(cfg, key, value)
    return cfg


def _packaged(name: str):
    """A shipped config by mode name when the `configs/` folder is not at hand (e.g. pip install)."""
    cfg = config_lib.base_config()
    stem = os.path.splitext(os.path.basename(name))[0]
    if stem == "stage1_only":
        cfg.run_stage2 = False
    elif stem == "stage2_mask_file":
        cfg.run_stage1, cfg.stage2.mask_source = False, "file"
    elif stem == "stage2_extract":
        cfg.run_stage1, cfg.stage2.mask_source = False, "extractor"
    elif stem != "default":
        return config_lib.load_config(name)  # raises the not-found error naming the file
    return cfg


def run(cfg, progress=None) -> dict:
    """Run the configured mode end to end (see `pipeline.run_pipeline`)."""
    from autostructn2v_jax import pipeline

    return pipeline.run_pipeline(cfg, progress=progress)


def denoise(run_dir: str | os.PathLike, image: np.ndarray, *, stage: str | None = None,
            tta: bool | None = None) -> np.ndarray:
    """Denoise an array (H, W) or (P, H, W) with a trained run; float32 in the input's units.
    ``tta`` (mean over the 8 flips/rotations): None follows the run's config (``tta``)."""
    from autostructn2v_jax import inference

    _, _, model = inference.load_run(run_dir, stage)
    if tta is not None:
        model.tta = bool(tta)
    arr = np.asarray(image)
    planes = arr[None] if arr.ndim == 2 else arr
    if planes.ndim != 3:
        raise ValueError(f"denoise expects (H, W) or (P, H, W), got shape {arr.shape}")
    result = model.denoise_planes(planes)
    return result[0] if arr.ndim == 2 else result


def extract_mask(planes, config=None, *, seed: int = 0):
    """Structural mask of raw noisy planes (list of (H, W) arrays or a (P, H, W) array).

    Returns `(mask, info)`; `config` is a `stage2.extractor` ConfigDict (defaults when None).
    """
    from autostructn2v_jax import extraction, preprocess

    ext = config if config is not None else config_lib.base_config().stage2.extractor
    config_lib.validate_extractor_config(ext)
    normed = [preprocess.normalize(np.asarray(p, np.float32))[0] for p in planes]
    return extraction.mask_from_planes(normed, ext, seed)


def history(run_dir: str | os.PathLike) -> dict:
    """Per-stage training records from `metrics.jsonl` ({stage: [record per epoch]})."""
    import json
    import pathlib

    out = {}
    for stage in ("stage1", "stage2"):
        path = pathlib.Path(run_dir) / stage / "metrics.jsonl"
        if path.exists():
            out[stage] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def tiled_mask(mask: np.ndarray, patch_size: int = 96, mask_percentage: float = 10.0,
               seed: int = 0, cluster: bool = True) -> np.ndarray:
    """One random tiling of `mask` over a patch, as drawn for every patch during training
    (`cluster`: a line mask's copies are the line twice as long, as with stage 2's default
    `mask_cluster`)."""
    from autostructn2v_jax import masking

    input_mask, _ = masking.draw_mask(seed, np.asarray(mask, bool), (patch_size, patch_size),
                                      mask_percentage, cluster)
    return input_mask


def write_report(run_dir: str | os.PathLike, clean_dir: str | None = None):
    """Write `run_dir/report/report.html` (images embedded) and return its path."""
    from autostructn2v_jax import report

    return report.write_report(run_dir, clean_dir=clean_dir)
