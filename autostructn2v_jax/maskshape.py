"""Finishing a structural mask and describing it: shared by every extraction method.

Every mask leaving the extractor is an odd square bool array, centre True, symmetric under 180
degree rotation (an ACF is), 8-connected when ``keep_center_component_only`` is set, with at most
``max_true_pixels`` True pixels.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import scipy.ndimage

__all__ = ["crop_center", "chebyshev", "euclid", "symmetrise", "center_component", "cap_mask",
           "finish", "touches_edge", "mask_summary"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structuring element


def crop_center(acf: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` crop around the centre of an odd-shaped ACF (zero padded if smaller)."""
    h = size // 2
    cy, cx = acf.shape[0] // 2, acf.shape[1] // 2
    out = np.zeros((size, size), dtype=np.float64)
    y0, y1 = max(cy - h, 0), min(cy + h + 1, acf.shape[0])
    x0, x1 = max(cx - h, 0), min(cx + h + 1, acf.shape[1])
    out[y0 - (cy - h) : y1 - (cy - h), x0 - (cx - h) : x1 - (cx - h)] = acf[y0:y1, x0:x1]
    return out


def chebyshev(size: int) -> np.ndarray:
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return np.maximum(np.abs(yy), np.abs(xx))


def euclid(size: int) -> np.ndarray:
    h = size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return np.sqrt(yy.astype(np.float64) ** 2 + xx**2)


def symmetrise(mask: np.ndarray) -> np.ndarray:
    return mask | mask[::-1, ::-1]


def center_component(mask: np.ndarray) -> np.ndarray:
    c = mask.shape[0] // 2
    labels, _ = scipy.ndimage.label(mask, structure=_EIGHT)
    return labels == labels[c, c]


def cap_mask(mask: np.ndarray, values: np.ndarray, cap: int, connected: bool) -> np.ndarray:
    """At most ``cap`` True pixels, the centre always, symmetric under 180 degree rotation.

    ``connected``: grow from the centre over ``mask`` in order of decreasing ``values`` (8-adjacent
    frontier, a pixel and its mirror added together), so the result stays connected and symmetric.
    Otherwise keep the centre plus the highest-valued symmetric pairs.  Pairs that no longer fit
    are skipped, so the count may end one below an even cap.
    """
    size = mask.shape[0]
    c = size // 2
    if int(mask.sum()) <= cap:
        return mask
    v = 0.5 * (values + values[::-1, ::-1])  # symmetric priority: mirror pairs tie exactly
    out = np.zeros_like(mask)
    out[c, c] = True
    count = 1
    if not connected:
        ys, xs = np.nonzero(mask)
        order = sorted(zip(ys, xs), key=lambda p: (-v[p], p))
        for y, x in order:
            if count + 2 > cap:
                break
            if out[y, x]:
                continue
            out[y, x] = out[2 * c - y, 2 * c - x] = True
            count += 2
        return out
    heap: list[tuple[float, int, int]] = []
    queued = np.zeros_like(mask)
    queued[c, c] = True

    def push_neighbours(y: int, x: int) -> None:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < size and 0 <= xx < size and mask[yy, xx] and not queued[yy, xx]:
                    queued[yy, xx] = True
                    heapq.heappush(heap, (-float(v[yy, xx]), yy, xx))

    push_neighbours(c, c)
    while heap and count + 2 <= cap:
        _, y, x = heapq.heappop(heap)
        if out[y, x]:
            continue
        my, mx = 2 * c - y, 2 * c - x
        out[y, x] = out[my, mx] = True
        count += 2
        push_neighbours(y, x)
        push_neighbours(my, mx)
    return out


def finish(mask: np.ndarray, values: np.ndarray, cfg: Any) -> np.ndarray:
    """Symmetrise, set the centre, keep the centre's 8-connected part (``keep_center_component_only``)
    and cap at ``max_true_pixels`` (highest ``values`` first)."""
    c = mask.shape[0] // 2
    mask = symmetrise(mask)
    mask[c, c] = True
    if cfg.keep_center_component_only:
        mask = center_component(mask)
    return cap_mask(mask, values, cfg.max_true_pixels, cfg.keep_center_component_only)


def touches_edge(mask: np.ndarray) -> bool:
    """True when the mask holds a pixel on the outermost ring of its square (the crop was too small)."""
    m = np.asarray(mask, bool)
    return bool(m.shape[0] > 1 and (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()))


def mask_summary(mask: Any) -> str:
    """Short human description of a structural mask."""
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    cy, cx = m.shape[0] // 2, m.shape[1] // 2
    if n == 0:
        return "empty mask"
    if n == 1 and m[cy, cx]:
        return "centre pixel only (no structure found: stage 2 = plain N2V)"
    ys, xs = np.nonzero(m)
    contiguous = center_component(m).sum() == n if m[cy, cx] else False
    if contiguous and np.all(ys == cy):
        return f"horizontal line of {n} pixels"
    if contiguous and np.all(xs == cx):
        return f"vertical line of {n} pixels"
    if contiguous and m.shape[0] == m.shape[1]:
        if np.all(ys - cy == xs - cx):
            return f"diagonal line (top-left to bottom-right) of {n} pixels"
        if np.all(ys - cy == cx - xs):
            return f"diagonal line (top-right to bottom-left) of {n} pixels"
    eh, ew = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    return f"{n} pixels, extent {eh}x{ew}"
