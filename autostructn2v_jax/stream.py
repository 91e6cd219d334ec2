"""Denoising TIFFs larger than memory: planes read and written strip by strip.

For a grey 2D image or stack of 2D planes stored uncompressed and contiguous (what microscopes
and ImageJ write for large data), rows are read straight from the file, normalisation statistics
are accumulated in one pass, the network runs strip by strip (`predict.predict_strips`, exact
stitching) and rows are written into a pre-allocated output TIFF. Peak memory is one strip and
its tiles, whatever the image size. Other files (compressed, RGB, multi-channel) fall back to
plane-by-plane reading, bounded by one plane.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Callable

import numpy as np

from autostructn2v_jax import posterior, predict, preprocess, tiffio
from autostructn2v_jax.files import atomic_path
from autostructn2v_jax.errors import UserInputError

_ROWS = 512  # rows per read when accumulating statistics


class _PlaneSource:
    """Row access to plane `p` of a TIFF's first series, from the file when contiguous."""

    def __init__(self, path: pathlib.Path):
        import tifffile

        self.path = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                self.shape = tuple(int(s) for s in series.shape)
                self.dtype = np.dtype(series.dtype)
                self.axes = str(series.axes)
                self.offset = series.dataoffset
                page = tif.pages[0]
                self.rgb = int(getattr(page, "photometric", 1) or 1) == 2 or int(page.samplesperpixel) > 1
                self.is_imagej = bool(tif.is_imagej)
                self.imagej_metadata = {k: v for k, v in (tif.imagej_metadata or {}).items()
                                        if k in ("unit", "spacing", "finterval")}
                self.resolution = tiffio.resolution_meta(tif)
        self.streamable = (len(self.shape) in (2, 3) and not self.rgb and self.offset is not None
                           and self.dtype.byteorder in ("=", "|", "<" if np.little_endian else ">"))
        self._plane: tuple[int, np.ndarray] | None = None

    @property
    def planes(self) -> int:
        return 1 if len(self.shape) == 2 else self.shape[0]

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    def rows(self, p: int, a: int, b: int) -> np.ndarray:
        h, w = self.hw
        if self.streamable:
            start = self.offset + ((p * h) + a) * w * self.dtype.itemsize
            out = np.fromfile(self.path, dtype=self.dtype, count=(b - a) * w, offset=start)
            out = out.reshape(b - a, w)
        else:  # compressed: one decoded plane at a time
            if self._plane is None or self._plane[0] != p:
                import tifffile

                self._plane = (p, np.asarray(tifffile.imread(self.path, key=p)))
            out = self._plane[1][a:b]
        out = out.astype(np.float32)
        if not np.isfinite(out).all():
            raise UserInputError(f"{self.path}: contains NaN/Inf pixels (plane {p})")
        return out


def _plane_stats(src: _PlaneSource, p: int) -> dict:
    """Mean/std of a plane in one streaming pass, with `preprocess.normalize`'s floor and constant rule
    (`preprocess.normalization_stats`)."""
    h, w = src.hw
    total = total_sq = 0.0
    lo, hi = np.inf, -np.inf
    first = None
    for a in range(0, h, _ROWS):
        rows = src.rows(p, a, min(h, a + _ROWS)).astype(np.float64)
        first = float(rows.flat[0]) if first is None else first
        total += rows.sum()
        total_sq += np.square(rows).sum()
        lo, hi = min(lo, rows.min()), max(hi, rows.max())
    n = float(h * w)
    constant = bool(lo == hi)
    mean = first if constant else total / n
    std = 0.0 if constant else float(np.sqrt(max(total_sq / n - mean * mean, 0.0)))
    return {**preprocess.normalization_stats(mean, std, constant), "constant": constant}


def denoise_tiff(variables, in_path, out_path, *, apply_fn: Callable, num_layers: int,
                 tile_size: int | None = None, halo: int | None = None, dtype: str | None = None,
                 overwrite: bool = False,
                 tta: bool = False, posterior_mean: str = "off") -> pathlib.Path:
    """Denoise one TIFF into `out_path` with memory bounded by a strip; atomic (temp + rename).

    ``posterior_mean`` (a noise model, or "off"): the posterior-mean step per strip, its noise model
    estimated on that strip (a strip holds the full width and many rows)."""
    import tifffile

    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    if out_path.exists() and not overwrite:
        raise UserInputError(f"{out_path}: output file already exists (use --overwrite to replace it)")
    try:
        src = _PlaneSource(in_path)
    except UserInputError:
        raise
    except Exception as err:
        raise UserInputError(f"{in_path}: cannot read TIFF ({type(err).__name__}: {err})") from err
    if len(src.shape) not in (2, 3) or src.rgb:
        raise UserInputError(f"{in_path}: streaming needs a grey 2D image or stack of 2D planes")
    out_dtype = np.dtype(dtype or src.dtype)
    out_axes = src.axes if len(src.axes) == len(src.shape) else ("Q" * (len(src.shape) - 2) + "YX")
    meta = {"imagej_metadata": src.imagej_metadata, "resolution": src.resolution}
    kwargs = tiffio.tiff_write_kwargs(meta, out_dtype, out_axes)
    h, w = src.hw
    row_bytes = w * out_dtype.itemsize

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, ".tif") as tmp:
        target = tifffile.memmap(tmp, shape=src.shape, dtype=out_dtype, **kwargs)
        offset = target.offset
        del target  # pre-allocated file; rows are written with plain file writes below
        with open(tmp, "r+b") as fh:
            for p in range(src.planes):
                stats = _plane_stats(src, p)
                mean, std = stats["mean"], stats["std"]

                def read_normed(a: int, b: int, p=p) -> np.ndarray:
                    if stats["constant"]:
                        return np.zeros((b - a, w), np.float32)
                    return ((src.rows(p, a, b).astype(np.float64) - mean) / std).astype(np.float32)

                for r0, rows in predict.predict_strips(variables, read_normed, h, w, apply_fn=apply_fn,
                                                       num_layers=num_layers, tile_size=tile_size, halo=halo, tta=tta):
                    if posterior_mean != "off" and not stats["constant"]:
                        rows = posterior.posterior_step(read_normed(r0, r0 + rows.shape[0]), rows,
                                                        posterior_mean)
                    restored = preprocess.denormalize(rows, stats)
                    fh.seek(offset + (p * h + r0) * row_bytes)
                    fh.write(np.ascontiguousarray(tiffio.to_output_dtype(restored, out_dtype)).tobytes())
    return out_path


LARGE_PIXELS = 2**23  # files with more pixels than this (32 MiB as float32) are streamed


def is_large(path) -> bool:
    """True for a streamable grey TIFF (uncompressed, contiguous) of more than LARGE_PIXELS pixels."""
    try:
        src = _PlaneSource(pathlib.Path(path))
    except Exception:  # unreadable: the regular reader reports it properly
        return False
    return src.streamable and int(np.prod(src.shape)) > LARGE_PIXELS
