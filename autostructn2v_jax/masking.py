"""Blind-spot masks, masked-pixel replacement and the masked loss (pure, jittable).

Everything here is written for one ``(H, W)`` patch and ``jax.vmap``-ed over a batch; random
numbers come from explicit PRNG keys. Kernels, patch shapes, mask percentages and replacement
strategies are *static* (concrete Python / numpy values): they decide array shapes and are read at
trace time, so close over them (e.g. ``functools.partial``) rather than passing them as traced
arguments.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from autostructn2v_jax import randbits
from autostructn2v_jax.errors import ConfigError

Strategy = Union[int, str]
#: Replacement strategies by id: 0 = mean of the unmasked 3x3 neighbours, 1 = zero, 2 = a random
#: unmasked value of the patch, 3 = median of the unmasked 3x3 neighbours (N2V2).
STRATEGIES = ("local_mean", "zero", "random", "median")
_STRATEGIES = {name: i for i, name in enumerate(STRATEGIES)}


def check_center_size(center_size, key: str) -> None:
    """Raise ``ConfigError(key, ...)`` unless ``center_size`` is an odd integer >= 1 (a blind-spot
    block needs a centre pixel)."""
    if isinstance(center_size, bool) or not isinstance(center_size, (int, np.integer)):
        raise ConfigError(key, f"must be an integer, got {center_size!r}")
    if center_size < 1:
        raise ConfigError(key, f"must be >= 1, got {center_size}")
    if center_size % 2 == 0:
        raise ConfigError(key, f"must be odd so the kernel has a centre pixel, got {center_size}")


def stage1_kernel(center_size: int) -> np.ndarray:
    """Stage-1 (plain N2V) kernel: a True ``center_size``-square block with a False 1-px border.

    The border keeps the array odd-sided with the blind-spot block centred on the centre pixel.
    """
    check_center_size(center_size, "stage1.mask_center_size")
    k = np.zeros((center_size + 2, center_size + 2), dtype=bool)
    k[1:-1, 1:-1] = True
    return k


def crop_kernel(kernel) -> np.ndarray:
    """The smallest odd-sided, centred crop of a valid kernel that keeps all its True pixels.

    Tiling depends only on the True pixels around the centre (:func:`mask_layout` trims the kernel
    itself), so a kernel and its crop draw identical masks; a canonical form lets kernels that
    differ only in their False border (an extracted 11x11 mask and a 1x9 file) share one compiled
    train step.
    """
    k = np.asarray(kernel).astype(bool)
    _trim_kernel(k)  # validate
    cy, cx = k.shape[0] // 2, k.shape[1] // 2
    rows, cols = np.nonzero(k)
    ry, rx = int(np.abs(rows - cy).max()), int(np.abs(cols - cx).max())
    return k[cy - ry:cy + ry + 1, cx - rx:cx + rx + 1].copy()


class MaskLayout(NamedTuple):
    """Host-side (static) description of how ``tile_mask`` places kernel copies.

    ``box``: (kh, kw) bounding box of the kernel's True pixels; ``center``: centre offset inside
    the box; ``offsets``: (|K|, 2) int offsets of the True pixels inside the box; ``cell``: (cy, cx)
    cell size; ``phases``: (Py, Px) number of random grid phases per axis; ``grid``: (my, mx)
    static number of (possibly clipped) cells; ``n``: copies per patch; ``percentage``: achieved
    mask percentage ``100 * n * |K| / (H * W)``; ``capped``: whether ``n`` hit the capacity.
    """

    box: tuple[int, int]
    center: tuple[int, int]
    offsets: np.ndarray
    cell: tuple[int, int]
    phases: tuple[int, int]
    grid: tuple[int, int]
    n: int
    percentage: float
    capped: bool
    centres: np.ndarray


def cluster_kernel(kernel) -> np.ndarray:
    """``K (+) K``: the kernel dilated by itself (odd-sided, centred). Hiding it hides the whole
    kernel around *every* pixel of ``K``, so each copy gives ``|K|`` loss pixels instead of one
    (for a 9-pixel line: 9 of 17 hidden pixels instead of 1 of 9). Used for lines
    (``use_cluster``)."""
    k = crop_kernel(kernel)
    ry, rx = k.shape[0] // 2, k.shape[1] // 2
    out = np.zeros((4 * ry + 1, 4 * rx + 1), bool)
    for dy, dx in zip(*np.nonzero(k)):
        out[dy:dy + k.shape[0], dx:dx + k.shape[1]] |= k
    return out


def use_cluster(kernel, patch_shape: tuple[int, int], mask_percentage: float) -> bool:
    """Whether clustered copies (``cluster_kernel``) apply to ``kernel`` on ``patch_shape``.

    Only for a *line*: evenly spaced collinear pixels, the sets whose sum with themselves is as
    small as possible, ``|K (+) K| = 2|K| - 1`` (Freiman). A line's cluster is a line twice as
    long, so every hidden pixel keeps its visible neighbours across the line; a 2-D kernel's
    cluster is a hole about 3.5x its size, and on the quality tests' 2-D and 3x9 masks it lost
    0.2-1.7 dB. Also ``K (+) K`` must tile the patch at the full percentage (or as much of it as
    the kernel itself allows): a diagonal's cluster fills a box twice as wide, and where fewer
    copies fit (a 9-pixel diagonal on a 32-pixel patch: 1.7 % hidden instead of 7.9 %) stage 2 lost
    1.1 dB, as many loss pixels as before but from few places. A single pixel is its own cluster
    (nothing would change)."""
    small = crop_kernel(kernel)
    n = int(small.sum())
    big = cluster_kernel(small)
    if n <= 1 or int(big.sum()) != 2 * n - 1:
        return False
    try:
        room = mask_capacity(big, patch_shape)
    except ValueError:  # K (+) K does not fit the patch
        return False
    return room >= min(float(mask_percentage), mask_capacity(small, patch_shape))


def _trim_kernel(kernel) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
    """Validate ``kernel`` and trim it to its True bounding box: (box, centre, True offsets)."""
    k = np.asarray(kernel)
    if k.ndim != 2:
        raise ValueError(f"mask kernel must be 2D, got shape {k.shape}")
    if k.dtype != bool:
        if not np.all((k == 0) | (k == 1)):
            raise ValueError("mask kernel must be boolean (or 0/1)")
        k = k.astype(bool)
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"mask kernel must have odd sides, got shape {k.shape}")
    cy, cx = k.shape[0] // 2, k.shape[1] // 2
    if not k[cy, cx]:
        raise ValueError("mask kernel must be True at its centre pixel")
    rows, cols = np.nonzero(k)
    r0, c0 = int(rows.min()), int(cols.min())
    box = (int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1)
    offsets = np.stack([rows - r0, cols - c0], axis=1).astype(np.int32)
    return box, (cy - r0, cx - c0), offsets


# One axis of length L, box length k, cell length c >= k+1, phase p in [0, P) with P <= c.
# Cell i covers [p + (i-1)c, p + ic) clipped to [0, L+1) (L is a virtual always-empty pixel);
# a box may start in [s, e-1-k], so it ends at least one pixel before the cell does: boxes of
# different cells never touch. The same formula runs on the host (numpy) and in jax.


def _axis_cells(xp, p, length: int, k: int, c: int, m: int):
    i = xp.arange(m)
    s = xp.clip(p[..., None] + (i - 1) * c, 0, length + 1)
    e = xp.clip(p[..., None] + i * c, 0, length + 1)
    hi = e - 1 - k
    return s, hi, hi >= s


def _n_cells(length: int, c: int) -> int:
    return (length + c) // c + 1


@functools.lru_cache(maxsize=256)
def _axis_options(length: int, k: int) -> np.ndarray:
    """Rows (c, P, cap, full): usable / full-size cells guaranteed for every phase < P.

    Only the largest P is kept for each distinct (cap, full) pair.
    """
    rows = []
    for c in range(k + 1, length + 2):
        s, hi, ok = _axis_cells(np, np.arange(c), length, k, c, _n_cells(length, c))
        cap = np.minimum.accumulate(ok.sum(axis=1))
        full = np.minimum.accumulate((hi - s + 1 == c - k).sum(axis=1))
        for pair in set(zip(cap.tolist(), full.tolist())):
            if pair[0] > 0:
                big_p = int(np.nonzero((cap == pair[0]) & (full == pair[1]))[0].max()) + 1
                rows.append((c, big_p, *pair))
    return np.array(sorted(rows), dtype=np.int64).reshape(-1, 4)


def _options(kernel, patch_shape):
    box, center, offsets = _trim_kernel(kernel)
    h, w = (int(s) for s in patch_shape)
    oy, ox = _axis_options(h, box[0]), _axis_options(w, box[1])
    if len(oy) == 0 or len(ox) == 0:
        raise ValueError(f"mask kernel's bounding box {box} does not fit in patch {(h, w)}")
    return box, center, offsets, (h, w), oy, ox


def mask_capacity(kernel, patch_shape: tuple[int, int]) -> float:
    """Largest mask percentage ``tile_mask`` can achieve for ``kernel`` on ``patch_shape``.

    Each copy needs its own cell of >= (kh+1) x (kw+1) pixels, so this is about
    ``100 * |K| / ((kh+1)(kw+1))``, a little less for small patches.
    """
    _, _, offsets, (h, w), oy, ox = _options(kernel, patch_shape)
    return 100.0 * len(offsets) * int(oy[:, 2].max()) * int(ox[:, 2].max()) / (h * w)


def mask_layout(kernel, patch_shape: tuple[int, int], mask_percentage: float,
                cluster: bool = False) -> MaskLayout:
    """Static layout for ``tile_mask`` (host-side numpy at trace time; cached).

    ``n = max(1, round(pct/100 * H*W / |K|))`` copies. Among cell sizes and phase ranges whose
    grid has room for ``n`` copies for every phase, prefer (in order): room in full-size cells
    (cells clipped by the patch border are then only slack, which keeps the per-pixel masking
    probability near uniform), a full-period phase (uniform over positions), phases + in-cell
    offsets reaching every position (no fixed lattice), the most in-cell offset positions
    ``(cy-kh)(cx-kw)``, more cells, more phases, squarer cells. If ``n`` exceeds the capacity,
    all usable cells are filled (percentage = ``mask_capacity``) and a warning is issued.
    ``cluster``: tile ``cluster_kernel(kernel)`` and predict at every pixel of ``kernel`` in each
    copy (the percentage still counts hidden pixels).
    """
    _trim_kernel(kernel)  # validate before hashing
    k = np.asarray(kernel).astype(bool)
    shape = tuple(int(v) for v in patch_shape)
    lay = _mask_layout(k.tobytes(), k.shape, shape, float(mask_percentage), bool(cluster))
    if lay.capped:
        warnings.warn(
            f"mask_percentage {float(mask_percentage):g}% is above what kernel box {lay.box} "
            f"allows on patch {shape}; using {lay.percentage:.3g}% ({lay.n} copies)",
            stacklevel=2,
        )
    return lay


@functools.lru_cache(maxsize=256)
def _mask_layout(kbytes: bytes, kshape, patch_shape, mask_percentage: float,
                 cluster: bool = False) -> MaskLayout:
    kernel = np.frombuffer(kbytes, bool).reshape(kshape)
    if cluster:
        small = crop_kernel(kernel)
        kernel = cluster_kernel(small)
    pct = float(mask_percentage)
    if not (0.0 < pct <= 100.0):
        raise ValueError(f"mask_percentage must be in (0, 100], got {mask_percentage!r}")
    box, center, offsets, (h, w), oy, ox = _options(kernel, patch_shape)
    (kh, kw), nk = box, len(offsets)
    n = max(1, int(round(pct / 100.0 * h * w / nk)))
    cy, py, capy, fully = (a[:, None] for a in oy.T)
    cx, px, capx, fullx = (a[None, :] for a in ox.T)
    cap = capy * capx
    capped = n > int(cap.max())
    if capped:
        n = int(cap.max())
    # reachable positions modulo the cell size, per axis (full when P >= k+1)
    cover = np.minimum(cy, py + cy - kh - 1) * np.minimum(cx, px + cx - kw - 1) / (cy * cx)
    uniform = (py == cy) & (px == cx)
    keys = (-np.abs(cy - cx), py * px, cap, (cy - kh) * (cx - kw), cover, uniform,
            fully * fullx >= n, cap >= n)
    order = np.lexsort(tuple(np.broadcast_to(k, cap.shape).ravel() for k in keys))
    iy, ix = np.unravel_index(int(order[-1]), cap.shape)
    cell = (int(oy[iy, 0]), int(ox[ix, 0]))
    phases = (int(oy[iy, 1]), int(ox[ix, 1]))
    grid = (_n_cells(h, cell[0]), _n_cells(w, cell[1]))
    centres = np.array([center], np.int32)
    if cluster:  # every pixel of the small kernel, around the copy's centre
        rows, cols = np.nonzero(small)
        rows, cols = rows - small.shape[0] // 2 + center[0], cols - small.shape[1] // 2 + center[1]
        centres = np.stack([rows, cols], axis=1).astype(np.int32)
    return MaskLayout(
        box, center, offsets, cell, phases, grid, n, 100.0 * n * nk / (h * w), capped, centres
    )


def tile_mask(
    key: jax.Array, kernel, patch_shape: tuple[int, int], mask_percentage: float,
    cluster: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Draw a blind-spot mask: ``(input_mask, prediction_mask)``, both bool ``patch_shape``.

    ``n`` copies of ``kernel`` (static numpy bool/0-1 array, odd sides, True centre) are placed at
    random, at most one per cell of a static grid (see ``mask_layout``) with a random vertical
    phase and an independent random horizontal phase per row of cells; inside its cell each
    copy's bounding box sits at a random offset leaving >= 1 empty pixel before the next cell, so
    no two copies overlap or touch (8-adjacency). The ``n`` cells are drawn at random (without
    replacement) among the usable ones, weighted by their number of positions (Gumbel top-k), so
    cells clipped by the border are not over-used. ``input_mask`` = union of the copies, ``prediction_mask`` = centres
    (with ``cluster``: copies of ``cluster_kernel(kernel)``, every pixel of ``kernel`` in each).

    Achieved percentage: exactly ``100 * n * |K| / (H*W)`` with ``n = round(pct/100*H*W/|K|)``,
    i.e. within ``|K|/2`` pixels of the target, unless capped at ``mask_capacity`` (max density
    about ``|K| / ((kh+1)(kw+1))``; a warning is emitted at trace time). No scans, static shapes:
    one sort over the cells and two scatters, cheap enough for every patch at every step.
    """
    lay = mask_layout(kernel, patch_shape, mask_percentage, cluster)
    return _tile_mask_from_bits(randbits.draw(key, (_tile_mask_bits(lay),)), lay, patch_shape)


def _tile_mask_bits(lay: MaskLayout) -> int:
    """Random numbers one :func:`tile_mask` draw uses: phases, cell scores, in-cell offsets."""
    my, mx = lay.grid
    return 1 + my + my * mx + 2 * lay.n


def _tile_mask_from_bits(bits: jax.Array, lay: MaskLayout, patch_shape: tuple[int, int]):
    """:func:`tile_mask` from ``_tile_mask_bits(lay)`` uint32 random bits (one random call)."""
    h, w = (int(s) for s in patch_shape)
    (kh, kw), (cy, cx), (py, px), (my, mx), n = lay.box, lay.cell, lay.phases, lay.grid, lay.n
    cuts = np.cumsum([1, my, my * mx, n])
    b_py, b_px, b_cells, b_oy, b_ox = jnp.split(bits, cuts)
    phase_y = randbits.randint(b_py[0], 0, py)
    phase_x = randbits.randint(b_px, 0, px)  # one phase per row of cells
    sy, hiy, oky = _axis_cells(jnp, phase_y, h, kh, cy, my)  # (my,)
    sx, hix, okx = _axis_cells(jnp, phase_x, w, kw, cx, mx)  # (my, mx)
    usable = (oky[:, None] & okx).ravel()
    n_pos = ((hiy - sy + 1)[:, None] * (hix - sx + 1)).ravel()
    score = jnp.log(jnp.maximum(n_pos, 1)) + randbits.gumbel(b_cells)
    pick = jnp.argsort(jnp.where(usable, -score, jnp.inf))[:n]  # n <= usable cells
    ci, cj = pick // mx, pick % mx
    y0 = randbits.randint(b_oy, sy[ci], hiy[ci] + 1)
    x0 = randbits.randint(b_ox, sx[ci, cj], hix[ci, cj] + 1)
    dy = jnp.asarray(lay.offsets[:, 0])
    dx = jnp.asarray(lay.offsets[:, 1])
    input_mask = jnp.zeros((h, w), bool).at[y0[:, None] + dy, x0[:, None] + dx].set(True)
    cy_, cx_ = jnp.asarray(lay.centres[:, 0]), jnp.asarray(lay.centres[:, 1])
    pred_mask = jnp.zeros((h, w), bool).at[y0[:, None] + cy_, x0[:, None] + cx_].set(True)
    return input_mask, pred_mask


def draw_mask(seed: int, kernel, patch_shape: tuple[int, int], mask_percentage: float,
              cluster: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One draw of a training patch's masks on the host, ``(input_mask, prediction_mask)`` as
    numpy: for figures and the API. ``cluster`` as in training (applied where ``use_cluster``).
    Compiled as one function (run op by op it compiles ~40 small ones)."""
    shape = tuple(int(s) for s in patch_shape)
    cluster = bool(cluster) and use_cluster(kernel, shape, mask_percentage)
    fn = jax.jit(lambda k: tile_mask(k, kernel, shape, float(mask_percentage), cluster))
    input_mask, pred_mask = fn(jax.random.key(int(seed)))
    return np.asarray(input_mask), np.asarray(pred_mask)


def strategy_id(strategy: Strategy) -> int:
    """Map a replacement strategy (0/"local_mean", 1/"zero", 2/"random", 3/"median") to its id."""
    if isinstance(strategy, str):
        key = strategy.strip().lower()
        if key in _STRATEGIES:
            return _STRATEGIES[key]
    elif isinstance(strategy, (int, np.integer)) and not isinstance(strategy, bool):
        if int(strategy) in _STRATEGIES.values():
            return int(strategy)
    raise ConfigError(
        "replacement_strategy",
        f"unknown strategy {strategy!r}; use 0/'local_mean', 1/'zero', 2/'random' or 3/'median'",
    )


def _box3(x: jax.Array) -> jax.Array:
    """3x3 box sum with zero padding (nothing from outside the patch contributes)."""
    h, w = x.shape
    p = jnp.pad(x, 1)
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _median3(patch: jax.Array, unmasked: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per pixel, (median of the unmasked pixels among its 8 neighbours inside the patch, count).

    The 8 shifted copies are sorted with masked / outside entries set to +inf, so the ``c`` valid
    values come first; the median is the mean of the two middle ones (``c`` even) or the middle one.
    """
    h, w = patch.shape
    p = jnp.pad(patch, 1)
    u = jnp.pad(unmasked, 1)  # outside the patch counts as masked
    offs = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    ok = jnp.stack([u[i : i + h, j : j + w] for i, j in offs])
    vals = jnp.stack([p[i : i + h, j : j + w] for i, j in offs])
    ranked = jnp.sort(jnp.where(ok, vals, jnp.inf), axis=0)
    count = jnp.sum(ok, axis=0, dtype=jnp.int32)
    lo = jnp.take_along_axis(ranked, jnp.maximum(count - 1, 0)[None] // 2, axis=0)[0]
    hi = jnp.take_along_axis(ranked, (count // 2)[None], axis=0)[0]
    both = jnp.where(count > 0, lo + jnp.where(count > 1, hi, lo), 0.0)
    return both / 2, count


def _random_unmasked(bits: jax.Array, patch: jax.Array, unmasked: jax.Array) -> jax.Array:
    """Per pixel, an independent uniformly random unmasked value of the patch (0 if none), from
    ``(H, W)`` uint32 random bits."""
    h, w = patch.shape
    flat = unmasked.ravel()
    idx = jnp.nonzero(flat, size=h * w, fill_value=0)[0]
    count = jnp.sum(flat, dtype=jnp.int32)
    r = randbits.randint(bits, 0, jnp.maximum(count, 1))
    vals = patch.ravel()[idx[r]]
    return jnp.where(count > 0, vals, jnp.zeros_like(vals))


def replace_masked(
    key: jax.Array, patch: jax.Array, input_mask: jax.Array, strategy: Strategy
) -> jax.Array:
    """Replace the masked pixels of a float ``(H, W)`` patch; unmasked pixels are unchanged.

    ``local_mean`` (0): mean of the unmasked pixels of the 3x3 neighbourhood (inside the patch);
    a masked pixel with no unmasked neighbour (interior of a large structural kernel) gets a random
    unmasked value of the patch. ``zero`` (1): 0. ``random`` (2): an independent uniformly random
    unmasked value of the patch. ``median`` (3, N2V2): median of the unmasked pixels of the 3x3
    neighbourhood without the centre (every pixel of the blind-spot/structural kernel is masked,
    so none of them counts); the same random fallback as ``local_mean``. The new values never
    depend on any masked pixel's value, so the network cannot see what it has to predict.
    ``strategy`` is static.
    """
    bits = None if strategy_id(strategy) == 1 else randbits.draw(key, patch.shape)
    return _replace_from_bits(bits, patch, input_mask, strategy)


def _replace_from_bits(bits: jax.Array | None, patch: jax.Array, input_mask: jax.Array,
                       strategy: Strategy) -> jax.Array:
    """:func:`replace_masked` from ``patch.shape`` uint32 random bits (``None`` for ``zero``)."""
    sid = strategy_id(strategy)
    mask = jnp.asarray(input_mask, bool)
    if sid == 1:
        return jnp.where(mask, jnp.zeros_like(patch), patch)
    unmasked = ~mask
    rand = _random_unmasked(bits, patch, unmasked)
    if sid == 2:
        return jnp.where(mask, rand, patch)
    if sid == 3:
        med, c = _median3(patch, unmasked)
        return jnp.where(mask, jnp.where(c > 0, med.astype(patch.dtype), rand), patch)
    f = unmasked.astype(patch.dtype)
    s = _box3(patch * f)
    c = _box3(f)
    mean = s / jnp.maximum(c, 1.0)
    return jnp.where(mask, jnp.where(c > 0, mean, rand), patch)


def masked_mse(pred: jax.Array, target: jax.Array, prediction_mask: jax.Array) -> jax.Array:
    """``sum(m * (pred - target)^2) / max(sum(m), 1)`` over the drawn prediction pixels.

    ``prediction_mask`` is broadcast to ``pred``'s shape (trailing singleton axes are added, e.g.
    ``(B, H, W)`` mask for ``(B, H, W, 1)`` predictions).
    """
    m = jnp.asarray(prediction_mask)
    while m.ndim < pred.ndim:
        m = m[..., None]
    m = jnp.broadcast_to(m, pred.shape).astype(jnp.float32)
    d = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    return jnp.sum(m * d) / jnp.maximum(jnp.sum(m), 1.0)


def make_blind_spot_batch(
    key: jax.Array, patches: jax.Array, kernel, mask_percentage: float, strategy: Strategy,
    cluster: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mask and replace a ``(B, H, W)`` batch with an independent mask per patch.

    Returns ``(inputs, prediction_masks, input_masks)``; the loss target is the original batch.
    """
    b, h, w = patches.shape
    sid = strategy_id(strategy)
    lay = mask_layout(kernel, (h, w), mask_percentage, cluster)
    n_mask = _tile_mask_bits(lay)
    # All the batch's random numbers in one call (see randbits: each call costs compile time).
    bits = randbits.draw(key, (b, n_mask + (0 if sid == 1 else h * w)))

    def one(bits: jax.Array, patch: jax.Array):
        im, pm = _tile_mask_from_bits(bits[:n_mask], lay, (h, w))
        repl = None if sid == 1 else bits[n_mask:].reshape(h, w)
        return _replace_from_bits(repl, patch, im, strategy), pm, im

    return jax.vmap(one)(bits, patches)
