"""What is inside the lungs, for both views: pulmonary vessel trees and COVID-19-like
opacities."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pxsgate.tools.synth.draw import F32, Canvas, dome, smooth, smooth_field

Segment = tuple[float, float, float, float, float, float]


def vessel_tree(rng: np.random.Generator, hx: float, hy: float, depth: int = 5) -> list[Segment]:
    """Segments (a0, y0, a1, y1, w0, w1) of pulmonary vessels branching from a hilum.

    ``a`` is the distance from the midline (lateral is positive), ``y`` the image height.
    """
    segments: list[Segment] = []
    stack: list[tuple[float, float, float, float, float, int]] = []
    for ang in (-1.5, -1.05, -0.6, -0.15, 0.3, 0.75, 1.15, 1.55):
        ang += rng.normal(0.0, 0.08)
        ox = hx + 0.03 * math.cos(ang) + rng.normal(0.0, 0.01)
        oy = hy + 0.09 * math.sin(ang) + rng.normal(0.0, 0.015)
        stack.append((ox, oy, ang, 0.09 * rng.uniform(0.85, 1.15), 0.015, 0))
    while stack:
        a0, y0, ang, length, w, level = stack.pop()
        a1 = a0 + length * math.cos(ang)
        y1 = y0 + length * math.sin(ang)
        w1 = w * 0.8
        segments.append((a0, y0, a1, y1, w, w1))
        if level < depth:
            spread = rng.uniform(0.25, 0.5)
            both = rng.random() < 0.75
            for sign in (-1.0, 1.0) if both else (rng.choice((-0.4, 0.4)),):
                child = ang + sign * spread * rng.uniform(0.6, 1.0) + rng.normal(0.0, 0.05)
                shrink = 0.82 if both else 0.92
                stack.append(
                    (a1, y1, child, length * rng.uniform(0.72, 0.9), w1 * shrink, level + 1)
                )
    return segments


def vessel_layer(
    cv: Canvas, win: tuple[slice, slice], tree: Sequence[Segment], side: float
) -> F32:
    """Render vessel segments (capsules, density ~ their thickness) over a window."""
    f32 = np.float32
    rows = win[0].stop - win[0].start
    cols = win[1].stop - win[1].start
    out = np.zeros((rows, cols), dtype=np.float32)
    if not tree or rows == 0 or cols == 0:
        return out
    seg = np.asarray(tree, dtype=np.float64)
    seg[:, 4:] = np.maximum(seg[:, 4:], 0.5 * cv.edge)
    # pixel bounding boxes of all segments at once (the frame is affine)
    (col_a, row_a), (col_b, row_b) = (cv.pixel(seg[:, ka] * side, seg[:, ky])
                                      for ka, ky in ((0, 1), (2, 3)))
    pad = seg[:, 4:].max(axis=1) * cv.scale * max(cv.rows, cv.cols) / 2.0 + 2.0
    c0s = np.maximum(np.floor(np.minimum(col_a, col_b) - pad).astype(int), win[1].start)
    c1s = np.minimum(np.ceil(np.maximum(col_a, col_b) + pad).astype(int), win[1].stop)
    r0s = np.maximum(np.floor(np.minimum(row_a, row_b) - pad).astype(int), win[0].start)
    r1s = np.minimum(np.ceil(np.maximum(row_a, row_b) + pad).astype(int), win[0].stop)
    for (a0, y0, a1, y1, w0, w1), r0, r1, c0, c1 in zip(
        seg.tolist(), r0s.tolist(), r1s.tolist(), c0s.tolist(), c1s.tolist(), strict=True
    ):
        if r1 <= r0 or c1 <= c0:
            continue
        x: F32 = cv.X[r0:r1, c0:c1]
        y: F32 = cv.Y[r0:r1, c0:c1]
        px = x * f32(side) - f32(a0)
        py = y - f32(y0)
        dx, dy = a1 - a0, y1 - y0
        t: F32 = (px * f32(dx) + py * f32(dy)) * f32(1.0 / max(dx * dx + dy * dy, 1e-9))
        np.clip(t, 0.0, 1.0, out=t)
        px -= t * f32(dx)
        py -= t * f32(dy)
        wt: F32 = f32(w0) + f32(w1 - w0) * t
        d2: F32 = (px * px + py * py) / (wt * wt)
        val = dome(d2) * wt * f32(7.0)
        dst = out[r0 - win[0].start : r1 - win[0].start, c0 - win[1].start : c1 - win[1].start]
        np.maximum(dst, val, out=dst)
    return out


def opacities(rng: np.random.Generator, severity: float, lungs: F32, weight: F32,
               gain: float) -> F32:
    """COVID-19-like opacities over ``lungs`` (full size): smooth random patches, more and
    denser with ``severity``, scaled by ``weight``; the density to add."""
    f32 = np.float32
    rows, cols = lungs.shape
    sev = float(min(max(severity, 0.0), 1.0))
    field = f32(0.75) * smooth_field(rng, rows, cols, 9)
    field += f32(0.5) * smooth_field(rng, rows, cols, 22)
    patches = smooth(field - f32(1.4 - 2.4 * sev), 0.9)
    return lungs * (f32(0.08 * sev) + f32(gain * sev**0.6) * patches * weight)
