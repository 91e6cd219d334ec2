"""The structural-mask extractor's settings (`stage2.extractor`): defaults and validation.

Layer 2, beside the extraction it configures, so `extraction` can validate a config without
importing the pipeline-level `config` module (which re-exports these names).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import ml_collections

from autostructn2v_jax.errors import ConfigError

__all__ = ["EXTRACTOR_METHODS", "EXTRACTOR_DEFAULTS", "extractor_config", "validate_extractor_config"]

EXTRACTOR_METHODS = ("ring", "significance", "deconvolved")
EXTRACTOR_DEFAULTS: dict[str, Any] = {
    "method": "deconvolved",  # measured best (docs/benchmarks.md, "Mask discovery")
    "center_size": 11,
    "max_center_size": 31,  # the crop grows up to this while the mask reaches its edge
    "adapt_autocorr": True,
    "adapt_CB": 50.0,
    "adapt_DF": 0.95,
    "center_ratio_threshold": 0.3,
    "base_percentile": 50.0,
    "percentile_decay": 1.15,
    "use_center_proximity": True,
    "center_proximity_threshold": 0.95,
    "keep_center_component_only": True,
    "max_true_pixels": 121,
    "z_threshold": 4.0,
    "min_correlation": 0.05,
    "num_pixels": 0,  # 0: derive from the data (find_structural_mask) or pass num_pixels=...
    # deconvolved method: the flattest fraction of tiles, and the recovered correlation kept
    "flat_fraction": 0.1,
    "deconv_threshold": 0.08,
    "deconv_detect_threshold": 0.35,
    "deconv_excess_threshold": 0.08,
    # Preprocessing of the images before the patches are drawn (pipeline; see highpass()):
    "highpass_sigma": 1.0,  # subtract a Gaussian blur of this sigma (pixels); 0 = off
    # Which patches the pipeline measures (not used by the extraction itself):
    "num_patches": 1000,  # patches whose autocorrelation is averaged
    "patch_size": 64,  # their side (capped by the image size)
    "use_background": True,  # draw them from background regions (ROI, select_background)
}

_EXTRACTOR_BOOLS = ("adapt_autocorr", "use_center_proximity", "keep_center_component_only", "use_background")
# key -> (lo, hi, lo_inclusive, hi_inclusive)
_EXTRACTOR_RANGES = {
    "adapt_CB": (0.0, 100.0, True, True),
    "adapt_DF": (0.0, 1.0, False, True),
    "center_ratio_threshold": (0.0, 1.0, True, True),
    "base_percentile": (0.0, 100.0, True, True),
    "percentile_decay": (0.0, math.inf, False, False),
    "center_proximity_threshold": (0.0, 1.0, False, True),
    "z_threshold": (0.0, math.inf, True, False),
    "min_correlation": (0.0, 1.0, True, False),
    "highpass_sigma": (0.0, math.inf, True, False),
    "flat_fraction": (0.0, 1.0, False, True),
    "deconv_threshold": (0.0, 1.0, False, False),
    "deconv_detect_threshold": (0.0, 1.0, False, True),
    "deconv_excess_threshold": (0.0, 1.0, False, True),
}


def extractor_config() -> ml_collections.ConfigDict:
    """Structural-mask extractor keys (`stage2.extractor`) with their defaults."""
    return ml_collections.ConfigDict(dict(EXTRACTOR_DEFAULTS))


def _as_plain_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"extractor config must be a ConfigDict or mapping, got {type(cfg).__name__}")


def _is_integral(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_real_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def validate_extractor_config(
    cfg: Any, prefix: str = "stage2.extractor"
) -> ml_collections.ConfigDict:
    """Check an extractor config; return it merged over the defaults as a ``ConfigDict``.

    Raises :class:`ConfigError` naming ``f"{prefix}.{key}"`` for unknown keys, wrong types and
    out-of-range values (``center_size`` must be an odd int >= 1, ``method`` one of
    ``"ring"``/``"significance"``, percentiles in [0, 100], ...).
    """
    given = _as_plain_dict(cfg)
    for key in given:
        if key not in EXTRACTOR_DEFAULTS:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (known: {', '.join(EXTRACTOR_DEFAULTS)})")
    merged = {**EXTRACTOR_DEFAULTS, **given}

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{prefix}.{key}", f"{msg}, got {merged[key]!r}")

    if not isinstance(merged["method"], str) or merged["method"] not in EXTRACTOR_METHODS:
        raise err("method", f"must be one of {list(EXTRACTOR_METHODS)}")
    cs = merged["center_size"]
    if not _is_integral(cs) or cs < 1:
        raise err("center_size", "must be an int >= 1")
    if cs % 2 == 0:
        raise err("center_size", "must be odd (the kernel needs a centre pixel)")
    mcs = merged["max_center_size"]
    if not _is_integral(mcs) or mcs < cs or mcs % 2 == 0:
        raise err("max_center_size", f"must be an odd int >= center_size ({cs})")
    merged["max_center_size"] = int(mcs)
    for key in _EXTRACTOR_BOOLS:
        if not isinstance(merged[key], bool) or type(merged[key]).__name__ == "bool_":
            raise err(key, "must be true or false")
    for key, (lo, hi, lo_inc, hi_inc) in _EXTRACTOR_RANGES.items():
        v = merged[key]
        if not _is_real_number(v) or not math.isfinite(float(v)):
            raise err(key, "must be a finite number")
        v = float(v)
        ok_lo = v >= lo if lo_inc else v > lo
        ok_hi = v <= hi if hi_inc else v < hi
        if not (ok_lo and ok_hi):
            rng = f"{'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
            raise err(key, f"must be in {rng}")
        merged[key] = v
    mt = merged["max_true_pixels"]
    if not _is_integral(mt) or mt < 1:
        raise err("max_true_pixels", "must be an int >= 1")
    npx = merged["num_pixels"]
    if not _is_integral(npx) or npx < 0:
        raise err("num_pixels", "must be an int >= 0 (0: derive from the data)")
    merged["center_size"] = int(cs)
    for key in ("num_patches", "patch_size"):
        if not _is_integral(merged[key]) or merged[key] < 1:
            raise err(key, "must be an int >= 1")
    merged["max_true_pixels"] = int(mt)
    merged["num_pixels"] = int(npx)
    for key in _EXTRACTOR_BOOLS:
        merged[key] = bool(merged[key])
    return ml_collections.ConfigDict(merged)
