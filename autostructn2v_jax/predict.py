"""Tiled whole-image prediction (eval mode), exact and seamless by construction.

How it works
------------
The image ``(H, W)`` is reflect-padded into a *frame*: ``halo`` pixels on the top/left and at
least ``halo`` on the bottom/right, so that the frame is ``ny * core + 2 * halo`` by
``nx * core + 2 * halo``. Tiles of side ``tile = core + 2 * halo`` start at multiples of ``core`` in
that frame (``core`` and ``2 * halo`` are multiples of ``2**num_layers``, so every tile is aligned
with the pooling grid of the whole frame). Each tile's central ``core x core`` block is kept.

With ``halo >= receptive_field(num_layers)`` every kept pixel depends only on pixels inside its
tile, through intermediate features that are themselves computed identically in the tile and in the
whole frame (the network's own reflect padding at a tile border never reaches a kept pixel). Hence
the stitched result equals running the network on the whole frame and cropping ``[halo:halo+H,
halo:halo+W]`` (up to float summation order): no blending needed.

All tiles have the same shape, the forward is one ``jit`` with a fixed tile batch
(``batch_tiles``; the last batch is zero-padded), so one compilation serves every image of every
size for a given ``tile_size``. Tile extraction (a strided window view + one gather) and stitching
(reshape/transpose) are vectorised NumPy on the host; the only Python loop is over tile batches,
whose forwards are dispatched asynchronously before anything is read back.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import compile_options
from .errors import ConfigError, UserInputError
from .models import apply_model, architecture, receptive_field
from .sampling import dihedral_transforms

__all__ = ["predict_image", "make_predict_fn", "tile_plan", "TilePlan", "DEFAULT_CORE"]

DEFAULT_CORE = 256
# Test-time augmentation: the 8 symmetries of the square on NHWC tiles (axes 1, 2).
_D4_NHWC = dihedral_transforms((1, 2))


def make_predict_fn(
    apply_fn: Callable, tile_size: int, batch_tiles: int, tta: bool = False
) -> Callable:
    """One jitted eval-mode forward ``fn(variables, tiles (batch_tiles, t, t, 1)) -> same shape``.

    ``apply_fn(variables, x, train)`` is called as ``apply_fn(variables, x, False)`` and must
    return ``y`` (e.g. :func:`autostructn2v_jax.models.apply_model` or ``make_apply_fn(...)``).
    With ``tta=True`` the output is the mean over the 8 flips/rotations of the tile, each network
    output mapped back by the inverse transform (the 8 forwards run one after another inside the
    jit via ``lax.map``, so memory stays that of one forward). ``tile_size`` and ``batch_tiles``
    fix the only shape the function is meant to be called with; other shapes would recompile.
    """
    t, bt = int(tile_size), int(batch_tiles)

    def forward(variables, tiles):
        x = jnp.asarray(tiles, jnp.float32)
        if not tta:
            return apply_fn(variables, x, False).astype(jnp.float32)
        views = jnp.stack([forward_t(x) for forward_t, _ in _D4_NHWC])  # square tiles: same shape
        outs = jax.lax.map(lambda v: apply_fn(variables, v, False).astype(jnp.float32), views)
        return sum(inverse_t(outs[k]) for k, (_, inverse_t) in enumerate(_D4_NHWC)) / 8.0

    forward.__name__ = f"predict_tiles_t{t}_b{bt}{'_tta' if tta else ''}"
    return compile_options.network_jit(forward, features=getattr(apply_fn, "features", None))


_cached_predict_fn = functools.lru_cache(maxsize=64)(make_predict_fn)


# --------------------------------------------------------------------------------------------
# Tiling plan
# --------------------------------------------------------------------------------------------
class TilePlan(NamedTuple):
    """Geometry of a tiled prediction (all ints). Frame = padded image; tiles start at
    ``(iy * core, ix * core)`` in the frame; the image starts at ``(halo, halo)``."""

    tile: int
    core: int
    halo: int
    ny: int
    nx: int
    pad: tuple  # ((top, bottom), (left, right)) reflect padding image -> frame


def _round_up(v: int, m: int) -> int:
    return -(-int(v) // m) * m


def tile_plan(
    shape: tuple, num_layers: int, tile_size: int | None = None, halo: int | None = None
) -> TilePlan:
    """The tiling :func:`predict_image` uses for an image of ``shape`` (see the module docstring).

    ``halo`` (default ``receptive_field(num_layers)``) is rounded up to a multiple of
    ``2**(num_layers-1)`` so that ``2 * halo`` is a multiple of ``2**num_layers``. ``tile_size``
    is the full tile side (core + 2 * halo) and must be a multiple of ``2**num_layers`` larger than
    ``2 * halo``. Default: ``core = min(256, max(H, W) rounded up to a multiple of
    max(2**num_layers, 16))``, i.e. one fixed tile for all images of at least 256 pixels a side.
    """
    h, w = (int(s) for s in shape)
    m = 2 ** int(num_layers)
    step = max(m // 2, 1)
    rf = receptive_field(num_layers)
    if halo is None:
        halo = rf
    if isinstance(halo, bool) or int(halo) != halo or halo < 0:
        raise ConfigError("predict.halo", f"must be a non-negative integer, got {halo!r}")
    halo = _round_up(int(halo), step)
    if halo < rf:
        warnings.warn(
            f"predict halo {halo} < receptive field {rf}: tiles will not be exactly seamless",
            stacklevel=3,
        )
    if tile_size is None:
        core = min(DEFAULT_CORE, _round_up(max(h, w), max(m, 16)))
        core = _round_up(core, m)
        tile = core + 2 * halo
    else:
        if isinstance(tile_size, bool) or int(tile_size) != tile_size:
            raise ConfigError("predict.tile_size", f"must be an integer, got {tile_size!r}")
        tile = int(tile_size)
        core = tile - 2 * halo
        if tile % m != 0 or core < m:
            raise ConfigError(
                "predict.tile_size",
                f"{tile} must be a multiple of 2**num_layers = {m} and at least "
                f"2 * halo + {m} = {2 * halo + m} (halo {halo})",
            )
    ny, nx = math.ceil(h / core), math.ceil(w / core)
    pad = ((halo, ny * core + halo - h), (halo, nx * core + halo - w))
    return TilePlan(tile, core, halo, ny, nx, pad)


def _reflect_pad(image: np.ndarray, pad) -> np.ndarray:
    # NumPy reflects repeatedly when a pad exceeds the size, and replicates a size-1 axis.
    return np.pad(image, pad, mode="reflect")


def predict_image(
    variables,
    image,
    *,
    apply_fn: Callable | None = None,
    num_layers: int | None = None,
    tile_size: int | None = None,
    halo: int | None = None,
    batch_tiles: int = 8,
    tta: bool = False,
) -> np.ndarray:
    """Predict a whole normalised ``(H, W)`` float32 image of any size by exact tiling.

    ``apply_fn`` defaults to :func:`models.apply_model` and ``num_layers`` to the depth read from
    ``variables``; pass both for a custom network. ``tile_size`` is the full tile side (see
    :func:`tile_plan`); pass it explicitly to get one compiled shape for all image sizes.
    ``batch_tiles`` tiles go through each forward. ``tta``: average of the 8 flips/rotations.
    Returns a NumPy ``(H, W)`` float32 array equal (to float rounding) to the network applied to
    the reflect-padded frame and cropped.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise UserInputError(f"predict_image expects a non-empty 2-D (H, W) image, got {img.shape}")
    if apply_fn is None:
        apply_fn = apply_model
    if num_layers is None:
        num_layers = architecture(variables)[1]
    if int(batch_tiles) < 1:
        raise ConfigError("predict.batch_tiles", f"must be >= 1, got {batch_tiles!r}")
    h, w = img.shape
    plan = tile_plan((h, w), num_layers, tile_size, halo)
    t, core, bt = plan.tile, plan.core, int(batch_tiles)

    frame = _reflect_pad(img, plan.pad)
    windows = np.lib.stride_tricks.sliding_window_view(frame, (t, t))[::core, ::core]
    n_tiles = plan.ny * plan.nx
    n_batches = -(-n_tiles // bt)
    tiles = np.zeros((n_batches * bt, t, t, 1), np.float32)
    tiles[:n_tiles, ..., 0] = windows.reshape(n_tiles, t, t)  # one vectorised gather

    fn = _cached_predict_fn(apply_fn, t, bt, bool(tta))
    outs = [fn(variables, tiles[i * bt:(i + 1) * bt]) for i in range(n_batches)]  # async dispatch
    out = np.concatenate([np.asarray(o) for o in outs])[:n_tiles, ..., 0]

    lo, hi = plan.halo, plan.halo + core
    cores = out[:, lo:hi, lo:hi].reshape(plan.ny, plan.nx, core, core)
    stitched = cores.transpose(0, 2, 1, 3).reshape(plan.ny * core, plan.nx * core)
    return np.ascontiguousarray(stitched[:h, :w], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Images larger than memory: horizontal strips with real context rows
# --------------------------------------------------------------------------------------------
def strip_plan(height: int, width: int, num_layers: int, tile_size: int | None = None,
               halo: int | None = None) -> tuple[int, int, int]:
    """``(band, context, tile)`` for :func:`predict_strips`.

    ``context`` real rows above and below each band give every kept pixel its whole receptive
    field; ``context`` and ``band`` are multiples of ``2**num_layers`` so every strip's tiles sit on
    the same pooling grid as the whole image's: strips stitch to exactly the whole-image result.
    """
    m = 2 ** int(num_layers)
    plan = tile_plan((min(height, 4 * DEFAULT_CORE), width), num_layers, tile_size, halo)
    context = _round_up(receptive_field(num_layers) if halo is None else int(halo), m)
    band = max(m, 2 * plan.core - 2 * context)  # band + 2 * context = two tile cores
    return band, context, plan.tile


def predict_strips(variables, read_rows: Callable[[int, int], np.ndarray], height: int, width: int, *,
                   apply_fn: Callable | None = None, num_layers: int | None = None,
                   tile_size: int | None = None, halo: int | None = None, batch_tiles: int = 8,
                   tta: bool = False):
    """Yield ``(row0, rows)`` of the prediction of an ``(height, width)`` normalised plane, strip
    by strip. ``read_rows(a, b)`` returns rows ``[a, b)`` as float32; memory is bounded by one strip
    (``band + 2 * context`` rows) and its tiles, not by the image."""
    if num_layers is None:
        num_layers = architecture(variables)[1]
    band, context, tile = strip_plan(height, width, num_layers, tile_size, halo)
    if height <= band + 2 * context:
        # A plane no taller than one strip (e.g. each plane of a stack): one pass, and a batch no
        # larger than its tile count, so no forward is spent on padding tiles (all planes of a
        # file share the shape: still one compile per file).
        plan = tile_plan((height, width), num_layers, tile, halo)
        yield 0, predict_image(variables, read_rows(0, height), apply_fn=apply_fn, num_layers=num_layers,
                               tile_size=tile, halo=halo, batch_tiles=min(batch_tiles, plan.ny * plan.nx), tta=tta)
        return
    for r0 in range(0, height, band):
        r1 = min(height, r0 + band)
        a, b = max(0, r0 - context), min(height, r1 + context)
        out = predict_image(variables, read_rows(a, b), apply_fn=apply_fn, num_layers=num_layers,
                            tile_size=tile, halo=halo, batch_tiles=batch_tiles, tta=tta)
        yield r0, out[r0 - a:r1 - a]
