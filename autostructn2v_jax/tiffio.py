"""TIFF IO, normalisation, splits, ROI candidates, on-device patch sampling and augmentation.

Host side (numpy, run once per stage)
-------------------------------------
* :func:`list_tiffs`, :func:`read_image`, :func:`read_images`, :func:`write_image`: TIFF IO with
  one-line :class:`~autostructn2v_jax.errors.UserInputError` messages that name the file.
* :func:`normalize` / :func:`denormalize`: per-image mean/std normalisation and its exact inverse.
  The caller normalises every plane on its own and stores the returned ``stats`` dict with the run
  (it is needed to map predictions back to the original intensity range).
* :func:`split_images`, :func:`holdout_split`, :func:`check_min_size`.
* :func:`roi_candidates` and :func:`make_bank`: build the :class:`ImageBank` sampled on device.

Device side (pure jax, jittable, vmapped over the batch)
--------------------------------------------------------
* :func:`sample_patches`: draws ``(B, P, P)`` patches from an :class:`ImageBank`.
* :func:`augment`, :func:`augment_batch`, :func:`dihedral_transforms`: the 8 flips/rotations of the
  square (dihedral group D4), applied identically to every array given.

Image layout rules (:func:`read_image`)
---------------------------------------
Every image becomes a ``(P, H, W)`` stack of grey planes in the file's own dtype.

* 2-D ``YX`` images give one plane; 3-D stacks (Z, T, or an unlabelled page sequence) give ``P``
  planes.
* **RGB rule**: a file whose photometric interpretation is RGB (tifffile's sample axis ``S`` with 3
  or 4 samples, interleaved or planar) is converted to grey as the *unweighted mean of its R, G
  and B samples* (an alpha sample is dropped), rounded back to the file's dtype for integer
  images; a ``UserWarning`` names the file. A grey image saved as RGB therefore round-trips
  exactly. The output is written back as a grey image. (Note: older tifffile versions store a
  ``(3, H, W)`` array written without ``photometric=`` as planar RGB; pass ``axes="ZYX"`` to
  read such a file as a stack.)
* **Channel rule**: a channel axis (``C`` from ImageJ metadata or from the user's ``axes``, or
  non-RGB extra samples) keeps only its *first* channel, with a ``UserWarning`` naming the file.
* ``axes`` (optional, CAREamics-style vocabulary): letters from ``S`` (sample), ``T`` (time), ``Z``
  (depth), ``C`` (channel), ``Y``, ``X``; unique letters, one per array dimension (after tifffile
  squeezes length-1 dimensions), ``Y`` directly followed by ``X``, and only ``C`` may follow ``X``:
  e.g. ``"YX"``, ``"SYX"``, ``"ZYX"``, ``"TYX"``, ``"CYX"``, ``"YXC"``, ``"TZYX"``. Given ``axes``
  override the file's own interpretation (including the RGB rule).
* Arrays with 4 or more dimensions need ``axes`` (the error says so and shows tifffile's guess).
* Refused (``UserInputError`` naming the file): unreadable / truncated / corrupt files, zero-size
  images, NaN/Inf pixels, complex, bool and non-numeric dtypes.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from .errors import ConfigError, UserInputError

__all__ = [
    "list_tiffs",
    "read_image",
    "read_images",
    "write_image",
    "normalize",
    "denormalize",
    "split_images",
    "holdout_split",
    "check_min_size",
    "roi_candidates",
    "ROI_MIN_FRACTION",
    "ImageBank",
    "make_bank",
    "sample_patches",
    "augment",
    "augment_batch",
    "dihedral_transforms",
]

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
#: Fraction of a patch (measured on the low-resolution ROI map) that must lie in the selected class
#: (background or foreground) for its corner to be an ROI candidate.
ROI_MIN_FRACTION = 0.75
#: Smoothing (in low-resolution pixels) of the ROI map before thresholding.
ROI_SMOOTH_SIGMA = 1.0

_USER_AXES_LETTERS = set("STZCYX")
# ImageJ hyperstack axis orders we can write (a subsequence of TZCYX, without C: output is grey).
_IMAGEJ_AXES = ("YX", "ZYX", "TYX", "TZYX")
_IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")
_WRITE_DTYPES = (
    "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64",
)
# tifffile log messages that mean the file is damaged (tifffile logs instead of raising).
_FATAL_LOG_WORDS = ("corrupt", "invalid page offset", "truncat", "failed to read", "invalid offset")


# --------------------------------------------------------------------------------------------
# Listing / reading
# --------------------------------------------------------------------------------------------
def list_tiffs(folder: str | os.PathLike) -> list[Path]:
    """Sorted ``*.tif`` / ``*.tiff`` files (any case) directly inside ``folder`` (non-recursive).

    Other files are ignored (a note is logged). Raises ``UserInputError`` naming the folder when it
    is missing, is not a folder, or holds no TIFF file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserInputError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: not a folder")
    tiffs, others = [], []
    for p in folder.iterdir():
        if not p.is_file():
            continue
        (tiffs if p.suffix.lower() in TIFF_SUFFIXES else others).append(p)
    if others:
        logger.info("%s: ignoring %d non-TIFF file(s), e.g. %s", folder, len(others),
                    sorted(o.name for o in others)[0])
    if not tiffs:
        raise UserInputError(f"{folder}: no .tif/.tiff files found in this folder")
    return sorted(tiffs)


class _LogCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - trivial
        try:
            self.messages.append(record.getMessage())
        except Exception:
            self.messages.append(str(record.msg))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _parse_user_axes(axes: str, shape: tuple[int, ...], path: Path) -> str:
    axes = str(axes).upper().strip()
    if len(axes) != len(shape):
        raise UserInputError(
            f"{path}: axes '{axes}' has {len(axes)} letters but the image has {len(shape)} "
            f"dimensions {tuple(shape)}"
        )
    bad = set(axes) - _USER_AXES_LETTERS
    tail_ok = "YX" in axes and axes.split("YX")[1] in ("", "C")
    if bad or len(set(axes)) != len(axes) or not tail_ok:
        raise UserInputError(
            f"{path}: invalid axes '{axes}' (use unique letters from S,T,Z,C,Y,X with 'YX' "
            f"adjacent and only C after X, e.g. 'YX', 'ZYX', 'TYX', 'SYX', 'CYX', 'YXC')"
        )
    return axes


def _resolution_meta(tif: Any) -> dict | None:
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None

    def _f(v: Any) -> float:
        if isinstance(v, tuple) and len(v) == 2:
            return float(v[0]) / float(v[1]) if v[1] else 0.0
        return float(v)

    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 1
    return {"x": _f(tags["XResolution"].value), "y": _f(tags["YResolution"].value),
            "unit": int(unit)}


def _check_file_extent(tif: Any, series: Any, path: Path) -> None:
    """Truncation check: every data strip / the contiguous series must lie inside the file."""
    size = os.path.getsize(path)
    off = getattr(series, "dataoffset", None)
    if off is not None and off + series.nbytes > size:
        raise UserInputError(f"{path}: truncated TIFF (image data runs past the end of the file)")
    for page in series.pages:
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for o, c in zip(offsets, counts):
            if o + c > size:
                raise UserInputError(
                    f"{path}: truncated TIFF (image data runs past the end of the file)"
                )


def read_image(path: str | os.PathLike, axes: str | None = None) -> tuple[np.ndarray, dict]:
    """Read one TIFF as ``(planes (P, H, W) in the file's dtype, meta)``; see the module docstring.

    ``meta`` keys: ``path`` (str), ``dtype`` (str), ``shape`` (original array shape, list),
    ``axes`` (axes of the original array: the user's ``axes`` or tifffile's), ``out_shape`` /
    ``out_axes`` (the grey layout written back by :func:`write_image`), ``imagej`` (bool),
    ``imagej_metadata`` (``unit`` / ``spacing`` / ``finterval`` when present), ``resolution``
    (``{"x", "y", "unit"}`` pixels per unit from the XResolution/YResolution/ResolutionUnit tags,
    or ``None``), ``rgb`` (bool: the RGB rule was applied).
    """
    import tifffile

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: file does not exist")
    if not path.is_file():
        raise UserInputError(f"{path}: not a file")

    catcher = _LogCatcher()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(catcher)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile's own warnings; damage is detected below
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise UserInputError(f"{path}: TIFF contains no image data")
                series = tif.series[0]
                file_axes = str(series.axes)
                photometric = int(getattr(tif.pages[0], "photometric", 1) or 1)
                is_imagej = bool(tif.is_imagej)
                ij_meta = tif.imagej_metadata or {}
                resolution = _resolution_meta(tif)
                if math.prod(series.shape) == 0:
                    raise UserInputError(f"{path}: zero-size image (shape {tuple(series.shape)})")
                # Size guard: a corrupt header can claim an enormous image; refuse it before
                # tifffile allocates the output (limit: 16 GiB, or half the RAM if smaller).
                nbytes = math.prod(int(s) for s in series.shape) * np.dtype(series.dtype).itemsize
                limit = 16 << 30
                try:
                    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                    limit = min(limit, ram // 2)
                except (AttributeError, ValueError, OSError):
                    pass
                if nbytes > limit:
                    raise UserInputError(
                        f"{path}: header claims a {tuple(int(s) for s in series.shape)} "
                        f"{np.dtype(series.dtype)} image ({nbytes / 2**30:.1f} GiB), more than the "
                        f"{limit / 2**30:.1f} GiB this reader accepts (corrupt header or image too "
                        f"large)"
                    )
                _check_file_extent(tif, series, path)
                arr = series.asarray()
    except UserInputError:
        raise
    except Exception as exc:  # tifffile, OSError, ValueError, struct errors, ...
        raise UserInputError(f"{path}: cannot read TIFF ({_one_line(exc)})") from None
    finally:
        tlog.removeHandler(catcher)
    fatal = [m for m in catcher.messages if any(w in m.lower() for w in _FATAL_LOG_WORDS)]
    if fatal:
        first = fatal[0].splitlines()[0] if fatal[0] else "damaged file"
        raise UserInputError(f"{path}: corrupt or truncated TIFF ({first})")

    arr = np.asarray(arr)
    dtype = arr.dtype
    if dtype == np.bool_:
        raise UserInputError(f"{path}: bool (binary) images are not supported; save it as uint8")
    if np.iscomplexobj(arr):
        raise UserInputError(f"{path}: complex-valued images are not supported")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UserInputError(f"{path}: unsupported pixel type {dtype}")
    if arr.size == 0:
        raise UserInputError(f"{path}: zero-size image (shape {tuple(arr.shape)})")
    if arr.ndim < 2:
        raise UserInputError(f"{path}: not an image (shape {tuple(arr.shape)}; need at least 2-D)")
    if np.issubdtype(dtype, np.floating) and not np.isfinite(arr).all():
        raise UserInputError(f"{path}: image contains NaN/Inf pixels")

    orig_shape = tuple(int(s) for s in arr.shape)
    rgb = False
    if axes is not None:
        ax = _parse_user_axes(axes, orig_shape, path)
        if "C" in ax:
            ci = ax.index("C")
            if arr.shape[ci] > 1:
                warnings.warn(f"{path}: {arr.shape[ci]} channels (axes '{ax}'); using the first "
                              f"channel only", UserWarning, stacklevel=2)
            arr = np.take(arr, 0, axis=ci)
            grey_axes = ax.replace("C", "")
        else:
            grey_axes = ax
        used_axes = ax
    else:
        used_axes = file_axes
        if arr.ndim >= 4:
            raise UserInputError(
                f"{path}: {arr.ndim}-D image {orig_shape} (tifffile guesses axes '{file_axes}'); "
                f"pass axes, e.g. 'TZYX' or 'ZYXC'"
            )
        ax = file_axes
        if len(ax) != arr.ndim or "YX" not in ax:  # unexpected tifffile layout: trust the shape
            ax = "Q" * (arr.ndim - 2) + "YX"
        for ch in ("S", "C"):
            if ch in ax:
                ci = ax.index(ch)
                n = arr.shape[ci]
                if ch == "S" and photometric == 2 and n in (3, 4):  # RGB rule
                    warnings.warn(f"{path}: RGB image; converted to grey as the mean of R, G, B",
                                  UserWarning, stacklevel=2)
                    grey = np.take(arr, [0, 1, 2], axis=ci).astype(np.float64).mean(axis=ci)
                    if np.issubdtype(dtype, np.integer):
                        info = np.iinfo(dtype)
                        grey = np.clip(np.rint(grey), info.min, info.max)
                    arr = grey.astype(dtype)
                    rgb = True
                else:  # channel rule
                    warnings.warn(f"{path}: {n} channels/samples (axes '{ax}'); using the first "
                                  f"channel only", UserWarning, stacklevel=2)
                    arr = np.take(arr, 0, axis=ci)
                ax = ax[:ci] + ax[ci + 1:]
        grey_axes = ax

    out_shape = tuple(int(s) for s in arr.shape)
    h, w = out_shape[-2:]
    if h == 0 or w == 0 or arr.size == 0:
        raise UserInputError(f"{path}: zero-size image (shape {orig_shape})")
    planes = np.ascontiguousarray(arr.reshape(-1, h, w))
    meta = {
        "path": str(path),
        "dtype": str(dtype),
        "shape": list(orig_shape),
        "axes": used_axes,
        "out_shape": list(out_shape),
        "out_axes": grey_axes,
        "imagej": is_imagej,
        "imagej_metadata": {k: ij_meta[k] for k in ("unit", "spacing", "finterval")
                            if k in ij_meta},
        "resolution": resolution,
        "rgb": rgb,
    }
    return planes, meta


def read_images(paths: Sequence[str | os.PathLike], axes: str | None = None
                ) -> list[tuple[np.ndarray, dict]]:
    """:func:`read_image` for each path, in order."""
    return [read_image(p, axes=axes) for p in paths]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _imagej_axes(out_axes: str) -> str | None:
    """Map the grey output axes onto an ImageJ hyperstack order, or None if not expressible."""
    stack = out_axes[:-2]
    if len(stack) == 1 and stack not in ("T", "Z"):
        stack = "Z"  # an unlabelled / sample stack is written as slices
    cand = stack + "YX"
    return cand if cand in _IMAGEJ_AXES else None


def write_image(path: str | os.PathLike, planes: np.ndarray, meta: dict,
                dtype: str | np.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``planes`` (``(P, H, W)`` or ``(H, W)`` float) in the layout described by ``meta``.

    * Output dtype: ``meta["dtype"]`` unless ``dtype`` is given (e.g. ``"float32"``).
    * Integer output: values are rounded (``np.rint``) and clipped to the dtype's range, only at
      this final conversion: predictions outside e.g. ``[0, 65535]`` cannot be represented and
      saturate.
      Float output is cast (``float16`` is clipped to its finite range).
    * Layout: ``meta["out_shape"]`` (a 2-D input is written 2-D, a stack as a stack; an RGB input
      as its grey version).
    * ImageJ-compatible (hyperstack axes, resolution, unit/spacing/finterval) when the dtype is
      uint8/uint16/int16/float32 and the axes fit ImageJ (YX, ZYX, TYX, TZYX); otherwise a plain
      TIFF with the axes in its description and the resolution tags.
    * Atomic: written to a temporary file in the destination folder then ``os.replace``d, so no
      partial file is ever left at ``path`` (the temporary file is removed on failure). The
      destination folder is created when missing. An existing ``path`` is refused
      (``UserInputError`` naming it) unless ``overwrite=True``.
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path}: output file already exists (use overwrite to replace it)")
    if path.exists() and path.is_dir():
        raise UserInputError(f"{path}: output path is a folder")
    out_dtype = np.dtype(dtype if dtype is not None else meta.get("dtype", "float32"))
    if out_dtype.name not in _WRITE_DTYPES:
        raise UserInputError(f"{path}: cannot write dtype {out_dtype} "
                             f"(supported: {', '.join(_WRITE_DTYPES)})")
    data = np.asarray(planes)
    if not np.isfinite(data).all():
        raise UserInputError(f"{path}: refusing to write an image with NaN/Inf values")
    out_shape = tuple(meta.get("out_shape") or data.shape)
    out_axes = str(meta.get("out_axes") or ("Q" * (len(out_shape) - 2) + "YX"))
    if data.size != math.prod(out_shape):
        raise ValueError(f"{path}: planes of shape {data.shape} do not fit the image shape "
                         f"{out_shape}")
    data = to_output_dtype(data.reshape(out_shape), out_dtype)
    kwargs = tiff_write_kwargs(meta, out_dtype, out_axes)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, **kwargs)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, Exception) and not isinstance(exc, UserInputError):
            raise UserInputError(f"{path}: cannot write TIFF ({_one_line(exc)})") from exc
        raise
    return path


def to_output_dtype(data: np.ndarray, out_dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range (only here), or cast floats."""
    out_dtype = np.dtype(out_dtype)
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        return np.clip(np.rint(np.asarray(data, np.float64)), info.min, info.max).astype(out_dtype)
    info = np.finfo(out_dtype)
    return np.clip(data, info.min, info.max).astype(out_dtype)


def tiff_write_kwargs(meta: dict, out_dtype, out_axes: str) -> dict[str, Any]:
    """tifffile keyword arguments that keep the input's axes and resolution metadata."""
    out_dtype = np.dtype(out_dtype)
    res = meta.get("resolution")
    kwargs: dict[str, Any] = {}
    ij_axes = _imagej_axes(out_axes) if out_dtype.name in _IMAGEJ_DTYPES else None
    if ij_axes is not None:
        md: dict[str, Any] = {"axes": ij_axes}
        md.update(meta.get("imagej_metadata") or {})
        kwargs.update(imagej=True, metadata=md)
        if res:
            kwargs["resolution"] = (res["x"], res["y"])
    else:
        kwargs.update(metadata={"axes": out_axes}, photometric="minisblack")
        if res:
            kwargs["resolution"] = (res["x"], res["y"])
            kwargs["resolutionunit"] = int(res.get("unit", 1))
    return kwargs


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def normalize(plane: np.ndarray) -> tuple[np.ndarray, dict]:
    """``(plane - mean) / std`` as float32 with ``stats = {"mean": float, "std": float}``.

    Statistics are over the whole array given (call it per plane). ``std`` is floored at
    ``1e-6 * max(1, |mean|)`` so tiny-range images stay finite; a constant image gives all zeros.
    Store ``stats`` per image with the run; :func:`denormalize` is the exact inverse.
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.size == 0:
        raise ValueError("normalize: empty array")
    constant = bool(x.max() == x.min())
    mean = float(x.flat[0]) if constant else float(x.mean())
    raw_std = 0.0 if constant else float(x.std())
    std = max(raw_std, 1e-6 * max(1.0, abs(mean)))
    if constant:
        normed = np.zeros(x.shape, np.float32)
    else:
        normed = ((x - mean) / std).astype(np.float32)
    return normed, {"mean": mean, "std": std}


def denormalize(normed: np.ndarray, stats: dict) -> np.ndarray:
    """Inverse of :func:`normalize`: ``normed * std + mean`` as float32 (no clipping)."""
    x = np.asarray(normed, dtype=np.float64)
    return (x * float(stats["std"]) + float(stats["mean"])).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Splits and size checks
# --------------------------------------------------------------------------------------------
def split_images(n_images: int, split_ratio: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reproducible random split of ``range(n_images)`` into sorted, disjoint, covering indices.

    Counts: ``n_val = round(r_val * n)``, ``n_test = round(r_test * n)``, the rest is train; at
    least one train image is kept (taken from test, then val). Permutation from
    ``np.random.default_rng(seed)``. Raises ``ConfigError("split_ratio", ...)`` unless the ratio is
    3 finite non-negative numbers summing to 1 with train > 0.
    """
    try:
        ratios = [float(r) for r in split_ratio]
        if isinstance(split_ratio, (str, bytes)):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError("split_ratio",
                          f"must be 3 numbers (train, val, test), got {split_ratio!r}") from None
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise ConfigError("split_ratio", f"must be 3 non-negative numbers, got {split_ratio!r}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError("split_ratio", f"must sum to 1, got {split_ratio!r} (sum {sum(ratios)})")
    if ratios[0] <= 0:
        raise ConfigError("split_ratio", f"train fraction must be > 0, got {split_ratio!r}")
    n = int(n_images)
    if n < 1:
        raise UserInputError(f"split_images: need at least one image, got {n_images}")
    n_val = int(round(ratios[1] * n))
    n_test = int(round(ratios[2] * n))
    while n - n_val - n_test < 1:
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n - n_val - n_test
    train = np.sort(perm[:n_train])
    val = np.sort(perm[n_train:n_train + n_val])
    test = np.sort(perm[n_train + n_val:])
    return train, val, test


def holdout_split(planes: Sequence[np.ndarray], patch_size: int, fraction: float = 0.15
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Carve a validation region out of every plane (for datasets too small for an image split).

    For each ``(H, W)`` plane: the bottom strip of height ``max(patch_size, round(fraction * H))``
    becomes a validation plane and the rest a training plane, provided the rest is at least
    ``patch_size`` high. Otherwise the same is done along the width (right strip). If neither
    fits, the whole plane is used for both training and validation and a warning is logged.
    Returns ``(train_planes, val_planes)``, one entry per input plane.
    """
    p = int(patch_size)
    train, val = [], []
    for i, plane in enumerate(planes):
        plane = np.asarray(plane)
        if plane.ndim != 2:
            raise ValueError(f"holdout_split: plane {i} must be 2-D, got shape {plane.shape}")
        h, w = plane.shape
        hv = max(p, int(round(fraction * h)))
        wv = max(p, int(round(fraction * w)))
        if h - hv >= p and hv <= h:
            train.append(plane[: h - hv])
            val.append(plane[h - hv:])
        elif w - wv >= p and wv <= w:
            train.append(plane[:, : w - wv])
            val.append(plane[:, w - wv:])
        else:
            logger.warning("holdout_split: plane %d (%dx%d) is too small to hold out a %d-pixel "
                           "validation strip; using it for both training and validation",
                           i, h, w, p)
            train.append(plane)
            val.append(plane)
    return train, val


def check_min_size(planes: Sequence[np.ndarray], paths: Sequence[str | os.PathLike],
                   patch_size: int, key: str) -> None:
    """Raise ``UserInputError`` naming the file and ``key`` if any image is smaller than a patch.

    ``planes[i]`` is ``(H, W)`` or ``(P, H, W)``; ``paths[i]`` is its file; ``key`` the config key
    of the patch size (e.g. ``"stage1.patch_size"``).
    """
    for arr, path in zip(planes, paths):
        h, w = np.shape(arr)[-2:]
        if h < patch_size or w < patch_size:
            raise UserInputError(
                f"{path}: image is {h}x{w} pixels, smaller than {key}={patch_size}; use a smaller "
                f"patch size or larger images"
            )


# --------------------------------------------------------------------------------------------
# ROI candidates
# --------------------------------------------------------------------------------------------
def _corner_grid(n: int, p: int, stride: int) -> np.ndarray:
    g = np.arange(0, n - p + 1, stride)
    if g[-1] != n - p:
        g = np.append(g, n - p)
    return g


def roi_candidates(plane: np.ndarray, patch_size: int, roi_threshold: float = 0.5,
                   scale_factor: float = 0.25, select_background: bool = True) -> np.ndarray:
    """Patch corners ``(K, 2)`` int32 ``(y, x)`` whose patch lies mostly in the selected class.

    Rule: the plane is block-averaged by ``b = max(1, round(1 / scale_factor))`` (edge rows/columns
    that do not fill a block are dropped, then the map is edge-extended back to full size), smoothed
    with a Gaussian (sigma ``ROI_SMOOTH_SIGMA`` low-res pixels), min-max normalised to ``[0, 1]`` (a
    constant plane maps to 0, i.e. background). Background = value ``<= roi_threshold`` (if
    ``select_background``), foreground = ``> roi_threshold`` otherwise. A corner is a candidate when
    at least ``ROI_MIN_FRACTION`` (75 %) of its ``patch_size``-square patch lies in the selected
    class. Corners are taken on a grid of stride ``max(1, patch_size // 4)`` (plus the last valid
    row/column) to bound their number. With no candidate, all grid corners are returned (a note is
    logged). Fully vectorised (integral image).
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"roi_candidates: plane must be 2-D, got shape {x.shape}")
    h, w = x.shape
    p = int(patch_size)
    if p < 1 or h < p or w < p:
        raise ValueError(f"roi_candidates: patch_size {p} does not fit a {h}x{w} plane")
    if not (0 < float(scale_factor) <= 1):
        raise ConfigError("scale_factor", f"must be in (0, 1], got {scale_factor}")
    b = max(1, min(int(round(1.0 / float(scale_factor))), h, w))
    hc, wc = (h // b) * b, (w // b) * b
    low = x[:hc, :wc].reshape(hc // b, b, wc // b, b).mean(axis=(1, 3))
    if ROI_SMOOTH_SIGMA > 0:
        low = ndimage.gaussian_filter(low, ROI_SMOOTH_SIGMA, mode="nearest")
    lo, hi = float(low.min()), float(low.max())
    norm = (low - lo) / (hi - lo) if hi > lo else np.zeros_like(low)
    sel = norm <= roi_threshold if select_background else norm > roi_threshold
    full = np.repeat(np.repeat(sel, b, axis=0), b, axis=1)
    full = np.pad(full, ((0, h - hc), (0, w - wc)), mode="edge")
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = full.astype(np.int64).cumsum(0).cumsum(1)
    stride = max(1, p // 4)
    ys = _corner_grid(h, p, stride)
    xs = _corner_grid(w, p, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    counts = (integral[yy + p, xx + p] - integral[yy, xx + p] - integral[yy + p, xx]
              + integral[yy, xx])
    ok = counts >= ROI_MIN_FRACTION * p * p
    if not ok.any():
        logger.info("roi_candidates: no %s patch found in a %dx%d plane; using all corners",
                    "background" if select_background else "foreground", h, w)
        ok = np.ones_like(ok)
    return np.stack([yy[ok], xx[ok]], axis=1).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Device-side bank, sampling and augmentation
# --------------------------------------------------------------------------------------------
class ImageBank(NamedTuple):
    """A stage's normalised images, ready for on-device sampling (a pytree of arrays).

    images:  float32 (N, Hmax, Wmax), plane i in ``images[i, :H_i, :W_i]``, zero padding elsewhere.
    shapes:  int32 (N, 2), ``(H_i, W_i)``.
    corners: int32 (M, 3) rows ``(image, y, x)``; ``y = x = -1`` means a uniform random corner
             inside that image.
    weights: float32 (M,) sampling probabilities (sum 1).
    """

    images: Any
    shapes: Any
    corners: Any
    weights: Any


def make_bank(planes: Sequence[np.ndarray], patch_size: int, use_roi: bool = False,
              roi_threshold: float = 0.5, scale_factor: float = 0.25,
              select_background: bool = True) -> ImageBank:
    """Build an :class:`ImageBank` (numpy arrays; the caller ``jax.device_put``s it).

    ``planes``: normalised 2-D float planes, each at least ``patch_size`` in both dimensions.
    Random mode (``use_roi=False``): one row ``(i, -1, -1)`` per plane weighted by its number of
    valid corners ``(H-P+1)(W-P+1)``, so every valid patch of every plane is equally likely.
    ROI mode: rows are the :func:`roi_candidates` of every plane, uniformly weighted.
    """
    p = int(patch_size)
    if len(planes) == 0:
        raise ValueError("make_bank: no planes")
    arrs = [np.asarray(a, dtype=np.float32) for a in planes]
    for i, a in enumerate(arrs):
        if a.ndim != 2:
            raise ValueError(f"make_bank: plane {i} must be 2-D, got shape {a.shape}")
        if a.shape[0] < p or a.shape[1] < p:
            raise ValueError(f"make_bank: plane {i} of shape {a.shape} is smaller than patch {p}")
    hmax = max(a.shape[0] for a in arrs)
    wmax = max(a.shape[1] for a in arrs)
    images = np.zeros((len(arrs), hmax, wmax), np.float32)
    for i, a in enumerate(arrs):
        images[i, : a.shape[0], : a.shape[1]] = a
    shapes = np.array([a.shape for a in arrs], np.int32)
    if use_roi:
        rows = []
        for i, a in enumerate(arrs):
            c = roi_candidates(a, p, roi_threshold, scale_factor, select_background)
            rows.append(np.concatenate([np.full((len(c), 1), i, np.int32), c], axis=1))
        corners = np.concatenate(rows, axis=0).astype(np.int32)
        weights = np.full(len(corners), 1.0 / len(corners), np.float64)
    else:
        corners = np.stack([np.arange(len(arrs)), np.full(len(arrs), -1), np.full(len(arrs), -1)],
                           axis=1).astype(np.int32)
        n_valid = (shapes[:, 0].astype(np.float64) - p + 1) * (shapes[:, 1] - p + 1)
        weights = n_valid / n_valid.sum()
    return ImageBank(images=images, shapes=shapes, corners=corners,
                     weights=weights.astype(np.float32))


def sample_patches(key: jax.Array, bank: ImageBank, patch_size: int, batch_size: int) -> jax.Array:
    """Draw ``(batch_size, patch_size, patch_size)`` float32 patches from ``bank`` (jittable).

    ``patch_size`` and ``batch_size`` must be static under ``jax.jit``. Rows are drawn with
    probabilities ``bank.weights``; a ``-1`` corner becomes a uniform corner inside that image, so
    padding is never sampled.
    """
    p, b = int(patch_size), int(batch_size)
    k_rows, k_pos = jax.random.split(key)
    corners = jnp.asarray(bank.corners)
    rows = jax.random.choice(k_rows, corners.shape[0], shape=(b,), replace=True,
                             p=jnp.asarray(bank.weights))
    images = jnp.asarray(bank.images)
    shapes = jnp.asarray(bank.shapes)

    def one(row: jax.Array, k: jax.Array) -> jax.Array:
        c = corners[row]
        i = c[0]
        hw = shapes[i]
        ky, kx = jax.random.split(k)
        ry = jax.random.randint(ky, (), 0, hw[0] - p + 1)
        rx = jax.random.randint(kx, (), 0, hw[1] - p + 1)
        y = jnp.where(c[1] < 0, ry, c[1])
        x = jnp.where(c[2] < 0, rx, c[2])
        return jax.lax.dynamic_slice(images, (i, y, x), (1, p, p))[0]

    return jax.vmap(one)(rows, jax.random.split(k_pos, b))


def _dihedral(t: int, axes: tuple[int, int]) -> tuple[Callable, Callable]:
    rot, flip = t % 4, t // 4

    def forward(a):
        if flip:
            a = jnp.flip(a, axis=axes[1])
        return jnp.rot90(a, rot, axes=axes)

    def inverse(a):
        a = jnp.rot90(a, -rot, axes=axes)
        if flip:
            a = jnp.flip(a, axis=axes[1])
        return a

    return forward, inverse


def dihedral_transforms(axes: tuple[int, int] = (0, 1)) -> list[tuple[Callable, Callable]]:
    """The 8 transforms of the square as ``(forward, inverse)`` pairs acting on ``axes``.

    Index ``t``: ``forward = rot90(k=t % 4)`` after a flip of the second axis if ``t >= 4``;
    ``t = 0`` is the identity. Use ``axes=(1, 2)`` for ``(B, H, W, C)`` batches (test-time
    augmentation).
    """
    return [_dihedral(t, tuple(axes)) for t in range(8)]


_D4 = dihedral_transforms((0, 1))


def augment(key: jax.Array, *arrays: jax.Array) -> tuple:
    """Apply one random dihedral transform (of 8, uniform) identically to every array.

    Each array is ``(H, W)`` or ``(H, W, ...)`` with ``H == W`` (any dtype, e.g. bool masks).
    Jittable and vmappable (see :func:`augment_batch`). Returns a tuple of the transformed arrays.
    """
    if not arrays:
        return ()
    for a in arrays:
        if a.ndim < 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"augment: arrays must be square (H, W, ...), got shape {a.shape}")
    t = jax.random.randint(key, (), 0, 8)
    branches = [lambda arrs, f=f: tuple(f(a) for a in arrs) for f, _ in _D4]
    return tuple(jax.lax.switch(t, branches, tuple(jnp.asarray(a) for a in arrays)))


def augment_batch(key: jax.Array, *arrays: jax.Array) -> tuple:
    """:func:`augment` over the leading (batch) axis with independent per-sample transforms."""
    if not arrays:
        return ()
    keys = jax.random.split(key, arrays[0].shape[0])
    return jax.vmap(augment)(keys, *arrays)
