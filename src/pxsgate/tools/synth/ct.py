"""An axial chest CT slice in stored values (HU + 1024)."""

from __future__ import annotations

import math

import numpy as np

from pxsgate.tools.synth.draw import I16, band, dome, frac, grid, pixel_noise, ramp, smooth_field


def ct_slice(
    rng: np.random.Generator,
    *,
    size: int = 512,
    level: float = 0.6,
    noise_rng: np.random.Generator | None = None,
) -> I16:
    """An axial chest CT slice: int16 stored values = HU + 1024 (RescaleIntercept -1024).

    ``level`` 0..1 goes from the lung apices to the bases (the heart appears below ~0.35).
    Anatomy is drawn from ``rng``, image noise from ``noise_rng`` (default ``rng``), so that
    a stack of slices can share one patient. Outside the reconstruction circle: 0 (-1024 HU).
    Anterior is at the top, the patient's right on the image left.
    """
    if size < 32:
        raise ValueError(f"CT slice too small: {size}")
    f32 = np.float32
    x, y = grid(size, size)
    X = np.broadcast_to(x, (size, size))
    Y = np.broadcast_to(y, (size, size))
    e = 3.0 / size
    lv = float(min(max(level, 0.0), 1.0))
    bw = 0.8 + rng.normal(0.0, 0.02)
    bh = 0.56 + rng.normal(0.0, 0.015)
    heart = max(0.0, (lv - 0.3) / 0.7)
    vessels = smooth_field(rng, size, size, 80)
    texture = smooth_field(rng, size, size, 30)

    hu = np.full((size, size), -1000.0, dtype=np.float32)
    # patient table under the body
    hu += f32(1100.0) * band(Y - f32(0.72) - f32(0.06) * X * X, 0.012, e)
    hu += f32(250.0) * band(Y - f32(0.8) - f32(0.06) * X * X, 0.03, e)
    # body: skin and subcutaneous fat, a muscle layer, then the chest cavity
    r2 = (X * f32(1 / bw)) ** 2 + ((Y - f32(0.05)) * f32(1 / bh)) ** 2
    body = ramp(f32(1.0) - r2, 0.02)
    hu += body * (f32(900.0) + f32(15.0) * texture)  # fat, about -100 HU
    hu += f32(60.0) * band(r2 - f32(0.985), 0.015, 0.01)  # skin
    hu += ramp(f32(0.86) - r2, 0.02) * f32(150.0)  # muscle, about +50 HU
    # ribs: bright ovals around the chest wall (cartilage, fainter, in front)
    ang = np.arctan2((Y - f32(0.05)) * f32(1 / bh), X * f32(1 / bw))
    _, rib_phase = frac(ang * f32(14.0 / (2 * math.pi)) + f32(0.25))
    rr = np.sqrt(r2)
    ring = band(rr - f32(0.82), 0.028, 0.015) * band(rib_phase - f32(0.5), 0.16, 0.08)
    hu += ring * (f32(250.0) + f32(550.0) * ramp(Y + f32(0.3), 0.3))

    # mediastinum: heart (larger lower down), aorta, a central column in front of the spine
    hx = (X - f32(0.07)) * f32(1 / (0.27 * heart + 0.01))
    hy = (Y + f32(0.08)) * f32(1 / (0.24 * heart + 0.01))
    heart_m = ramp(f32(1.0) - hx * hx - hy * hy, 0.06) if heart > 0 else np.zeros_like(hu)
    col = ramp(f32(1.0) - (X * f32(1 / 0.12)) ** 2 - ((Y - f32(0.05)) * f32(1 / 0.5)) ** 2, 0.1)
    medi = np.maximum(heart_m, col)
    # lungs, inside the ribs, either side of the mediastinum
    lungs = np.zeros((size, size), dtype=np.float32)
    lw, lh = 0.27 + 0.04 * math.sqrt(lv), 0.38 + 0.06 * math.sqrt(lv)
    for side in (-1.0, 1.0):
        cx = f32(side * 0.37)
        lr2 = ((X - cx) * f32(1 / lw)) ** 2 + ((Y - f32(0.03)) * f32(1 / lh)) ** 2
        lungs += ramp(f32(1.0) - lr2, 0.04)
    np.clip(lungs, 0.0, 1.0, out=lungs)
    lungs *= ramp(f32(0.7) - r2, 0.03) * (f32(1.0) - medi)
    hu = hu * (f32(1.0) - lungs) + lungs * (f32(-860.0) + f32(20.0) * texture)
    # lung vessels: small dots and branches, larger towards the hila
    near = np.exp(-(((np.abs(X) - f32(0.2)) ** 2 + Y * Y) * f32(1 / 0.03)))
    thr = f32(2.1) - f32(1.0) * near
    hu += lungs * f32(900.0) * ramp(vessels - thr, 0.25)
    hu += medi * (f32(40.0) - hu) * ramp(f32(0.86) - r2, 0.02)
    # aorta: descending beside the spine, ascending in front at the upper levels
    for ax, ay, ar in ((0.1, 0.26, 0.065), (-0.02, -0.2 + 0.1 * heart, 0.075 * (1.0 - heart))):
        if ar > 0.01:
            ao = ramp(f32(1.0) - ((X - f32(ax)) ** 2 + (Y - f32(ay)) ** 2) * f32(1 / ar**2), 0.15)
            hu += ao * (f32(45.0) - hu)
    # spine: vertebral body with a cortical rim, the canal, posterior elements
    vb = (X * f32(1 / 0.1)) ** 2 + ((Y - f32(0.36)) * f32(1 / 0.09)) ** 2
    hu += ramp(f32(1.0) - vb, 0.1) * (f32(260.0) + f32(40.0) * texture - hu)
    hu += f32(500.0) * band(vb - f32(0.9), 0.1, 0.06)
    canal = (X * f32(1 / 0.042)) ** 2 + ((Y - f32(0.5)) * f32(1 / 0.04)) ** 2
    hu += f32(500.0) * band(canal - f32(1.8), 0.6, 0.3) * ramp(Y - f32(0.47), 0.02)
    hu += ramp(f32(1.0) - canal, 0.2) * (f32(20.0) - hu)
    hu += f32(450.0) * band(X, 0.016, e) * ramp(Y - f32(0.55), e) * ramp(f32(0.64) - Y, 0.02)
    # sternum
    hu += f32(350.0) * dome((X * f32(1 / 0.06)) ** 2 + ((Y + f32(0.43)) * f32(1 / 0.03)) ** 2)

    nr = noise_rng if noise_rng is not None else rng
    hu += f32(12.0) * pixel_noise(nr, size, size)
    fov = f32(1.0) >= X * X + Y * Y
    stored = np.where(fov, hu + f32(1024.0), f32(0.0))
    return np.clip(np.rint(stored), 0, 4095).astype(np.int16)
