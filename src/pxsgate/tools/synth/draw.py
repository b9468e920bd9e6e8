"""Vectorised drawing primitives shared by the image generators.

Coordinates are normalised: x in [-1, 1] from the left to the right of the image, y in [-1, 1]
from top to bottom. Images are float32 arrays; :func:`to_stored` turns one in [0, 1] into
stored values. These names are the package's internals, not part of ``pxsgate.tools.synth``.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U16 = npt.NDArray[np.uint16]
I16 = npt.NDArray[np.int16]


def grid(rows: int, cols: int) -> tuple[F32, F32]:
    """Pixel-centre coordinates: x with shape (1, cols), y with shape (rows, 1)."""
    y = ((np.arange(rows, dtype=np.float32) + 0.5) * np.float32(2.0 / rows) - 1.0)[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) * np.float32(2.0 / cols) - 1.0)[None, :]
    return x, y


def ramp(t: F32, width: float) -> F32:
    """Linear ramp from 0 (t <= -width/2) to 1 (t >= width/2): an anti-aliased edge."""
    s = t * np.float32(1.0 / width)
    s += np.float32(0.5)
    np.clip(s, 0.0, 1.0, out=s)
    return s


def smooth(t: F32, width: float) -> F32:
    """Smooth step (zero slope at both ends), for wide transitions."""
    s = ramp(t, width)
    return s * s * (np.float32(3.0) - np.float32(2.0) * s)


def dome(r2: F32) -> F32:
    """Projected thickness of an ellipsoid, given the squared normalised radius."""
    s = np.float32(1.0) - r2
    np.maximum(s, 0.0, out=s)
    np.sqrt(s, out=s)
    return s


def bone(u: F32, cortex: float = 0.7, marrow: float = 0.55) -> F32:
    """Profile across a tubular bone (u = -1..1): bright cortical rims, a fainter marrow."""
    u2 = u * u
    return dome(u2) - np.float32(marrow * cortex) * dome(u2 * np.float32(1.0 / cortex**2))


def band(d: F32, half: float, edge: float) -> F32:
    """A band of half-width ``half`` around d == 0 with soft edges."""
    return ramp(np.float32(half) - np.abs(d), edge)


def gauss(x: F32, y: F32, cx: float, cy: float, sx: float, sy: float) -> F32:
    q = ((x - np.float32(cx)) * np.float32(1.0 / sx)) ** 2
    q += ((y - np.float32(cy)) * np.float32(1.0 / sy)) ** 2
    q *= np.float32(-0.5)
    np.exp(q, out=q)
    return q


def frac(t: F32) -> tuple[F32, F32]:
    """Integer and fractional part."""
    n = np.floor(t)
    return n, t - n


def _interp_matrix(n_out: int, n_in: int, sigma: float = 0.75) -> F32:
    """Gaussian interpolation weights from n_in coarse cells to n_out pixels (unit power)."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) * np.float32((n_in - 2.0) / n_out) + 0.5
    j = np.arange(n_in, dtype=np.float32)
    w: F32 = np.exp(-0.5 * ((pos[:, None] - j[None, :]) / np.float32(sigma)) ** 2).astype(
        np.float32
    )
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    return w


def smooth_field(rng: np.random.Generator, rows: int, cols: int, cells: int) -> F32:
    """A smooth random field with about ``cells`` blobs across the longer side, std ~1.

    Gaussian interpolation of a coarse random grid (separable matrix products) at up to
    8 pixels per cell, then a bilinear resize to the full size where that is larger.
    """
    cr = max(2, round(cells * rows / max(rows, cols)))
    cc = max(2, round(cells * cols / max(rows, cols)))
    coarse = rng.standard_normal((cr + 2, cc + 2), dtype=np.float32)
    mr, mc = min(rows, 8 * cr), min(cols, 8 * cc)
    out: F32 = (_interp_matrix(mr, cr + 2) @ coarse @ _interp_matrix(mc, cc + 2).T).astype(
        np.float32, copy=False
    )
    if (mr, mc) != (rows, cols):
        out = resize(out, rows, cols)
    return out


def pixel_noise(rng: np.random.Generator, rows: int, cols: int) -> F32:
    """Zero-mean, unit-variance pixel noise (uniform: cheap, and looks the same)."""
    u = rng.random((rows, cols), dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(math.sqrt(12.0))
    return u


def resize(img: F32, rows: int, cols: int) -> F32:
    """Bilinear resize (pixel centres aligned), separable, with gathers."""

    def axis(n_out: int, n_in: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], F32]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0.0, n_in - 1.0)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    r0, r1, wr = axis(rows, img.shape[0])
    tmp = img[r0] * (np.float32(1.0) - wr)[:, None] + img[r1] * wr[:, None]
    c0, c1, wc = axis(cols, img.shape[1])
    out: F32 = tmp[:, c0] * (np.float32(1.0) - wc)[None, :]
    out += tmp[:, c1] * wc[None, :]
    return out


def box_blur(img: F32, radius: int, axis: int) -> F32:
    """Running mean of width 2*radius+1 along one axis (edges replicated)."""
    if radius < 1:
        return img
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = img.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / (2 * radius + 1)).astype(np.float32)


def bits_max(bits_stored: int) -> int:
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be between 8 and 16, not {bits_stored}")
    return (1 << bits_stored) - 1


def to_stored(display: F32, bits_stored: int) -> U16:
    maxv = bits_max(bits_stored)
    out = np.clip(display, 0.0, 1.0) * np.float32(maxv)
    stored: U16 = np.rint(out).astype(np.uint16)
    return stored


def to_display(pixels: U16, bits_stored: int) -> F32:
    """Stored values as display values in [0, 1]: the inverse of :func:`to_stored`."""
    maxv = float(bits_max(bits_stored))
    display: F32 = pixels.astype(np.float32) * np.float32(1.0 / maxv)
    return display


def check_size(rows: int, cols: int) -> None:
    if rows < 32 or cols < 32:
        raise ValueError(f"image too small: {rows}x{cols} (at least 32x32)")


_WORKING_MAX: Final = 1280


def working_size(rows: int, cols: int) -> tuple[int, int]:
    """Anatomy is drawn at most _WORKING_MAX pixels on the long side, then resized."""
    big = max(rows, cols)
    if big <= _WORKING_MAX:
        return rows, cols
    f = _WORKING_MAX / big
    return max(32, round(rows * f)), max(32, round(cols * f))


class Canvas:
    """Patient coordinates over the image, after a small random shift, scale and rotation.

    ``X``/``Y`` are full arrays; ``D`` is the projected density drawn into. ``box`` gives the
    pixel window that covers a rectangle in patient coordinates, so that local structures are
    computed only where they are (this is what keeps a 1024x1024 film well under 0.5 s).
    """

    def __init__(self, rng: np.random.Generator, rows: int, cols: int, jitter: float = 1.0):
        self.rows, self.cols = rows, cols
        self.dx = float(rng.normal(0.0, 0.015 * jitter))
        self.dy = float(rng.normal(0.0, 0.015 * jitter))
        self.scale = float(rng.uniform(0.95, 1.03)) if jitter > 0 else 1.0
        self.rot = float(rng.normal(0.0, 0.012 * jitter))
        x, y = grid(rows, cols)
        c, s = np.float32(math.cos(self.rot)), np.float32(math.sin(self.rot))
        xs = (x - np.float32(self.dx)) * np.float32(1.0 / self.scale)
        ys = (y - np.float32(self.dy)) * np.float32(1.0 / self.scale)
        self.X: F32 = xs * c + ys * s
        self.Y: F32 = ys * c - xs * s
        self.edge = 3.0 / min(rows, cols)  # about 1.5 pixels in normalised units
        self.D: F32 = np.zeros((rows, cols), dtype=np.float32)

    def pixel(self, x: F64, y: F64) -> tuple[F64, F64]:
        """Pixel coordinates (column, row) of points in patient coordinates."""
        c, s = math.cos(self.rot), math.sin(self.rot)
        col = ((x * c - y * s) * self.scale + self.dx + 1.0) * self.cols / 2.0
        row = ((x * s + y * c) * self.scale + self.dy + 1.0) * self.rows / 2.0
        return col, row

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        cs, rs = self.pixel(np.array([x0, x0, x1, x1]), np.array([y0, y1, y0, y1]))
        r0 = min(self.rows, max(0, math.floor(rs.min()) - 2))
        r1 = max(r0, min(self.rows, math.ceil(rs.max()) + 2))
        c0 = min(self.cols, max(0, math.floor(cs.min()) - 2))
        c1 = max(c0, min(self.cols, math.ceil(cs.max()) + 2))
        return slice(r0, r1), slice(c0, c1)

    def side_box(
        self, side: float, a0: float, a1: float, y0: float, y1: float
    ) -> tuple[slice, slice]:
        """``box`` on one side: ``a`` is the distance from the midline, ``side`` -1 or +1."""
        xa, xb = sorted((side * a0, side * a1))
        return self.box(xa, xb, y0, y1)

    def xy(self, win: tuple[slice, slice]) -> tuple[F32, F32]:
        return self.X[win], self.Y[win]


def exposure(
    rng: np.random.Generator, density: F32, *, gain: float = 2.0, noise: float = 1.0
) -> F32:
    """From projected density to a processed radiograph in [0, 1] (bright = dense).

    A film-like compression curve, a smooth detector background (heel effect, gain
    variation) and signal-dependent quantum noise.
    """
    rows, cols = density.shape
    img = np.maximum(density, 0.0)
    img *= np.float32(-gain)
    np.exp(img, out=img)
    img *= np.float32(-1.0 / (1.0 - math.exp(-gain * 1.1)))
    img += np.float32(1.0 / (1.0 - math.exp(-gain * 1.1)))
    background = smooth_field(rng, rows, cols, 5)
    _, y = grid(rows, cols)
    img += np.float32(0.012) * background
    img += np.float32(0.04) + np.float32(0.015) * y
    sigma = img * np.float32(0.012 * noise)
    sigma += np.float32(0.006 * noise)
    sigma *= pixel_noise(rng, rows, cols)
    img += sigma
    img *= np.float32(0.93)
    img += np.float32(0.01)
    np.clip(img, 0.0, 1.0, out=img)
    return img


def film(rng: np.random.Generator, density: F32, rows: int, cols: int, *,
         gain: float = 2.0) -> F32:
    """The radiograph of a density drawn at the working size (:func:`working_size`):
    resized to ``rows`` x ``cols`` where it was drawn smaller, then exposed."""
    if density.shape != (rows, cols):
        density = resize(density, rows, cols)
    return exposure(rng, density, gain=gain)
