"""TIFF IO: list, read and write TIFF images, with one-line errors that name the file.

* :func:`list_tiffs`, :func:`read_image`, :func:`write_image` (atomic), plus the pieces the
  streaming reader/writer shares: :func:`resolution_meta`, :func:`to_output_dtype`,
  :func:`tiff_write_kwargs`.

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
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import UserInputError
from .files import atomic_path

__all__ = [
    "list_tiffs",
    "read_image",
    "write_image",
    "resolution_meta",
    "to_output_dtype",
    "tiff_write_kwargs",
    "TIFF_SUFFIXES",
]

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
_USER_AXES_LETTERS = set("STZCYX")
# ImageJ hyperstack axis orders we can write (a subsequence of TZCYX, without C: output is grey).
_IMAGEJ_AXES = ("YX", "ZYX", "TYX", "TZYX")
_IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")
_WRITE_DTYPES = (
    "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64",
)
# tifffile log messages that mean the file is damaged (tifffile logs instead of raising).
_FATAL_LOG_WORDS = ("corrupt", "invalid page offset", "truncat", "failed to read", "invalid offset")
# A corrupt header can claim an enormous image: refuse more than this (or half the RAM if smaller).
_MAX_READ_BYTES = 16 << 30


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


def resolution_meta(tif: Any) -> dict | None:
    """``{"x", "y", "unit"}`` pixels per unit from an open ``tifffile.TiffFile``'s first page, or None."""
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


class _RawImage(NamedTuple):
    """What :func:`_read_raw` takes from a file: the first series' array and its description."""

    array: np.ndarray
    axes: str  # tifffile's axes of the series
    photometric: int
    imagej: bool
    imagej_metadata: dict
    resolution: dict | None


def _read_limit() -> int:
    """Bytes an image may claim: ``_MAX_READ_BYTES``, or half the RAM if smaller."""
    try:
        return min(_MAX_READ_BYTES, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (AttributeError, ValueError, OSError):
        return _MAX_READ_BYTES


def _check_claimed_size(series: Any, path: Path) -> None:
    """Refuse a zero-size image, or one whose header claims more than :func:`_read_limit` bytes
    (before tifffile allocates it)."""
    shape = tuple(int(s) for s in series.shape)
    if math.prod(shape) == 0:
        raise UserInputError(f"{path}: zero-size image (shape {shape})")
    nbytes = math.prod(shape) * np.dtype(series.dtype).itemsize
    limit = _read_limit()
    if nbytes > limit:
        raise UserInputError(
            f"{path}: header claims a {shape} {np.dtype(series.dtype)} image "
            f"({nbytes / 2**30:.1f} GiB), more than the {limit / 2**30:.1f} GiB this reader "
            f"accepts (corrupt header or image too large)"
        )


def _read_raw(path: Path) -> _RawImage:
    """Read the first series of a TIFF; damage of any kind becomes a ``UserInputError``."""
    import tifffile

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
                _check_claimed_size(series, path)
                _check_file_extent(tif, series, path)
                raw = _RawImage(
                    array=np.asarray(series.asarray()), axes=str(series.axes),
                    photometric=int(getattr(tif.pages[0], "photometric", 1) or 1),
                    imagej=bool(tif.is_imagej), imagej_metadata=dict(tif.imagej_metadata or {}),
                    resolution=resolution_meta(tif))
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
    return raw


def _check_pixels(arr: np.ndarray, path: Path) -> None:
    """Refuse pixel types and values the denoiser cannot use."""
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


def _first_channel(arr: np.ndarray, ax: str, ci: int, path: Path) -> np.ndarray:
    """The channel rule: keep channel 0 of axis ``ci`` (a warning names the file)."""
    if arr.shape[ci] > 1:
        warnings.warn(f"{path}: {arr.shape[ci]} channels/samples (axes '{ax}'); using the first "
                      f"channel only", UserWarning, stacklevel=4)
    return np.take(arr, 0, axis=ci)


def _rgb_to_grey(arr: np.ndarray, ci: int, path: Path) -> np.ndarray:
    """The RGB rule: unweighted mean of R, G, B along axis ``ci``, rounded back to an int dtype."""
    warnings.warn(f"{path}: RGB image; converted to grey as the mean of R, G, B",
                  UserWarning, stacklevel=4)
    grey = np.take(arr, [0, 1, 2], axis=ci).astype(np.float64).mean(axis=ci)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        grey = np.clip(np.rint(grey), info.min, info.max)
    return grey.astype(arr.dtype)


def _to_grey(raw: _RawImage, axes: str | None, path: Path) -> tuple[np.ndarray, str, str, bool]:
    """Apply the layout rules: ``(grey array, axes used, grey axes, rgb rule applied)``."""
    arr = raw.array
    if axes is not None:
        ax = _parse_user_axes(axes, tuple(arr.shape), path)
        if "C" in ax:
            arr = _first_channel(arr, ax, ax.index("C"), path)
        return arr, ax, ax.replace("C", ""), False
    if arr.ndim >= 4:
        raise UserInputError(
            f"{path}: {arr.ndim}-D image {tuple(arr.shape)} (tifffile guesses axes '{raw.axes}'); "
            f"pass axes, e.g. 'TZYX' or 'ZYXC'"
        )
    ax = raw.axes
    if len(ax) != arr.ndim or "YX" not in ax:  # unexpected tifffile layout: trust the shape
        ax = "Q" * (arr.ndim - 2) + "YX"
    rgb = False
    for ch in ("S", "C"):
        if ch in ax:
            ci = ax.index(ch)
            if ch == "S" and raw.photometric == 2 and arr.shape[ci] in (3, 4):
                arr, rgb = _rgb_to_grey(arr, ci, path), True
            else:
                arr = _first_channel(arr, ax, ci, path)
            ax = ax[:ci] + ax[ci + 1:]
    return arr, raw.axes, ax, rgb


def read_image(path: str | os.PathLike, axes: str | None = None) -> tuple[np.ndarray, dict]:
    """Read one TIFF as ``(planes (P, H, W) in the file's dtype, meta)``; see the module docstring.

    ``meta`` keys: ``path`` (str), ``dtype`` (str), ``shape`` (original array shape, list),
    ``axes`` (axes of the original array: the user's ``axes`` or tifffile's), ``out_shape`` /
    ``out_axes`` (the grey layout written back by :func:`write_image`), ``imagej`` (bool),
    ``imagej_metadata`` (``unit`` / ``spacing`` / ``finterval`` when present), ``resolution``
    (``{"x", "y", "unit"}`` pixels per unit from the XResolution/YResolution/ResolutionUnit tags,
    or ``None``), ``rgb`` (bool: the RGB rule was applied).
    """
    path = Path(path)
    raw = _read_raw(path)
    _check_pixels(raw.array, path)
    grey, used_axes, grey_axes, rgb = _to_grey(raw, axes, path)
    h, w = grey.shape[-2:]
    if grey.size == 0:
        raise UserInputError(f"{path}: zero-size image (shape {tuple(raw.array.shape)})")
    meta = {
        "path": str(path),
        "dtype": str(raw.array.dtype),
        "shape": [int(s) for s in raw.array.shape],
        "axes": used_axes,
        "out_shape": [int(s) for s in grey.shape],
        "out_axes": grey_axes,
        "imagej": raw.imagej,
        "imagej_metadata": {k: raw.imagej_metadata[k] for k in ("unit", "spacing", "finterval")
                            if k in raw.imagej_metadata},
        "resolution": raw.resolution,
        "rgb": rgb,
    }
    return np.ascontiguousarray(grey.reshape(-1, h, w)), meta


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
    try:
        with atomic_path(path, ".tif") as tmp:
            tifffile.imwrite(tmp, data, **kwargs)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{path}: cannot write TIFF ({_one_line(exc)})") from exc
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
