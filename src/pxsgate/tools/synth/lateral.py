"""The projected density of a left lateral chest."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pxsgate.tools.synth.draw import (
    F32,
    Canvas,
    band,
    dome,
    frac,
    gauss,
    ramp,
    smooth,
    smooth_field,
)
from pxsgate.tools.synth.lung import Segment, opacities, vessel_layer, vessel_tree


def lateral_chest(rng: np.random.Generator, rows: int, cols: int, severity: float) -> F32:
    """Projected density of a left lateral chest: anterior on the image left, spine behind."""
    cv = Canvas(rng, rows, cols)
    f32 = np.float32
    front0 = -0.8 + rng.normal(0.0, 0.02)
    back0 = 0.88 + rng.normal(0.0, 0.02)
    cpa = 0.5 + rng.normal(0.0, 0.02)
    heart_k = float(rng.uniform(0.93, 1.07))
    texture = smooth_field(rng, rows, cols, 40)
    tree = vessel_tree(rng, 0.0, 0.0, depth=5)
    opacity_rng = np.random.default_rng(int(rng.integers(0, 2**63)))

    front = _lateral_body(cv, front0, back0)
    win, lung = _lateral_lung(cv, front, cpa, heart_k, texture, tree)
    _sternum(cv, front)
    _lateral_spine(cv)
    if severity > 0:
        weight = f32(0.5) + f32(0.5) * np.clip(cv.Y + f32(0.2), 0.0, 1.0)
        lungs = np.zeros_like(cv.D)
        lungs[win] = lung
        cv.D += opacities(opacity_rng, severity, lungs, weight, 0.3)
    return cv.D


def _lateral_body(cv: Canvas, front0: float, back0: float) -> F32:
    """The neck and raised arms above, the chest below; thick (side to side) throughout.
    Returns the anterior skin line at every pixel."""
    X, Y, D, e = cv.X, cv.Y, cv.D, cv.edge
    f32 = np.float32
    t = np.clip((Y + f32(1.0)) * f32(1 / 0.5), 0.0, 1.0)
    rise = np.sqrt(t * (f32(2.0) - t))
    front: F32 = f32(-0.35) + f32(front0 + 0.35) * rise + f32(0.05) * (Y - f32(0.1)) ** 2
    back = f32(0.45) + f32(back0 - 0.45) * rise
    body = ramp(X - front, e) * ramp(back - X, e)
    mid = (front + back) * f32(0.5)
    halfw = (back - front) * f32(0.5)
    D += body * (f32(0.36) + f32(0.2) * dome(((X - mid) / halfw) ** 2))
    # soft tissue of the raised arms and shoulders over the apices
    win = cv.box(-1.0, 1.0, -1.2, -0.1)
    x, y = cv.xy(win)
    ax = x - (f32(0.1) - f32(0.5) * (y + f32(0.5)))
    D[win] += f32(0.12) * smooth(f32(0.3) - np.abs(ax), 0.25) * smooth(f32(-0.35) - y, 0.3)
    return front


def _lateral_lung(cv: Canvas, front: F32, cpa: float, heart_k: float, texture: F32,
                  tree: Sequence[Segment]) -> tuple[tuple[slice, slice], F32]:
    """The lung field, from behind the sternum to the posterior ribs and down to the
    hemidiaphragms, with the heart, vessels, aortic arch, trachea and ribs over it. Returns
    the window drawn and the lung air in it."""
    D, e = cv.D, cv.edge
    f32 = np.float32
    win = cv.box(-0.95, 0.95, -0.9, cpa + 0.32)
    x, y = cv.xy(win)
    fl = front[win] + f32(0.08) + f32(0.25) * np.clip(y - f32(0.1), 0.0, 1.0) ** 2
    bl = f32(0.74) + f32(0.05) * y
    top = f32(-0.7) + f32(0.45) * ((x - f32(0.12)) * f32(1 / 0.75)) ** 2
    diaphragm = f32(cpa) - f32(0.2) * dome((x * f32(1 / 0.85)) ** 2)
    diaphragm += f32(0.16) * np.clip((x - f32(0.3)) * f32(1 / 0.45), 0.0, 1.0) ** 2
    inside = (
        smooth(x - fl, 0.08) * ramp(bl - x, 0.04) * smooth(y - top, 0.2) * ramp(diaphragm - y, e)
    )
    deep = np.clip((x - fl) * f32(3.0), 0.0, 1.0) * np.clip((diaphragm - y) * f32(3.0), 0.0, 1.0)
    deep *= np.clip((y - top) * f32(2.5), 0.0, 1.0) * np.clip((bl - x) * f32(3.0), 0.0, 1.0)
    # the heart: anterior and inferior, against the lower sternum, sitting on the diaphragm
    hx = (x + f32(0.36)) * f32(1 / (0.4 * heart_k))
    hy = np.minimum(y - f32(0.28), 0.0) * f32(1 / (0.36 * heart_k))
    heart = smooth(f32(1.0) - hx * hx - hy * hy, 0.15)
    lung = inside * (f32(1.0) - f32(0.4) * heart)
    D[win] -= f32(0.36) * lung * (f32(0.55) + f32(0.45) * deep)
    # the other hemidiaphragm, a little higher and more anterior
    diaphragm2 = diaphragm - f32(0.04) + f32(0.03) * x
    D[win] += f32(0.06) * inside * ramp(y - diaphragm2, e)
    D[win] += f32(0.012) * texture[win] * lung
    D[win] += vessel_layer(cv, win, tree, 1.0) * f32(0.8) * lung
    D[win] += f32(0.07) * gauss(x, y, 0.02, 0.0, 0.07, 0.09)
    # aortic arch, and the trachea sloping backwards to the carina
    arch = np.sqrt((x - f32(0.0)) ** 2 + ((y + f32(0.2)) * f32(1 / 0.8)) ** 2)
    D[win] += f32(0.04) * band(arch - f32(0.18), 0.035, 0.03) * ramp(f32(-0.15) - y, 0.1)
    tx = x - (f32(-0.1) + f32(0.13) * (y + f32(1.0)))
    D[win] -= (
        f32(0.06)
        * band(tx, 0.035, 0.01)
        * ramp(f32(-0.08) - y, 0.04)
        * smooth(y + f32(0.85), 0.2)
    )
    # ribs of both sides, one a little magnified, crossing the lungs obliquely
    for off, amp in ((0.0, 0.022), (0.05, 0.016)):
        d = f32(0.78) - x
        yr = y - f32(off) - f32(0.45) * d + f32(0.15) * d * d + f32(0.9)
        n, fr = frac(yr * f32(1 / 0.115))
        rb = ramp(fr, e / 0.115) * ramp(f32(0.32) - fr, e / 0.115) * ramp(n - f32(0.5), 1.0)
        fade = np.clip((x + f32(0.3)) * f32(1 / 0.9), 0.0, 1.0)
        D[win] += f32(amp) * rb * ramp(f32(10.5) - n, 1.0) * fade * inside
    return win, lung


def _sternum(cv: Canvas, front: F32) -> None:
    e = cv.edge
    f32 = np.float32
    win = cv.box(-1.0, -0.4, -0.7, 0.5)
    x, y = cv.xy(win)
    sx = x - (front[win] + f32(0.04))
    span = ramp(y + f32(0.6), 0.05) * ramp(f32(0.32) - y, 0.05)
    cv.D[win] += (
        f32(0.06) * band(sx, 0.026, e) * span + f32(0.05) * band(sx + f32(0.024), 0.005, e) * span
    )


def _lateral_spine(cv: Canvas) -> None:
    """Vertebral bodies (kyphotic), darker discs, cortical outlines, posterior elements."""
    f32 = np.float32
    win = cv.box(0.25, 1.05, -1.2, 1.2)
    x, y = cv.xy(win)
    spx = f32(0.5) + f32(0.07) * np.cos((y - f32(0.1)) * f32(1.3))
    u = (x - spx) * f32(1 / 0.095)
    _, phase = frac((y + f32(1.0)) * f32(1 / 0.105) + u * f32(0.05))
    vb = f32(0.5) + f32(0.5) * ramp(phase - f32(0.12), 0.04) * ramp(f32(0.93) - phase, 0.04)
    outline = band(phase - f32(0.14), 0.02, 0.02) + band(phase - f32(0.91), 0.02, 0.02)
    outline += band(np.abs(u) - f32(0.95), 0.05, 0.05)
    body_v = ramp(f32(1.0) - np.abs(u), 0.1)
    cv.D[win] += body_v * (f32(0.045) * vb + f32(0.02) * outline * vb)
    post = band(u - f32(1.9), 0.6, 0.4) * band(phase - f32(0.55), 0.3, 0.2)
    cv.D[win] += f32(0.04) * post
