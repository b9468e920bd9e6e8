"""An AP knee radiograph: an AP view that is not a chest."""

from __future__ import annotations

import numpy as np

from pxsgate.tools.synth.draw import (
    F32,
    U16,
    Canvas,
    band,
    bits_max,
    bone,
    check_size,
    dome,
    film,
    ramp,
    smooth,
    smooth_field,
    to_stored,
    working_size,
)
from pxsgate.tools.synth.text import burn_text


def knee_radiograph(
    rng: np.random.Generator, *, rows: int = 1024, cols: int = 1024, bits_stored: int = 12
) -> U16:
    """An AP radiograph of a right knee (fibula on the image left): MONOCHROME2 sense."""
    check_size(rows, cols)
    bits_max(bits_stored)
    wr, wc = working_size(rows, cols)
    cv = Canvas(rng, wr, wc)
    X, Y, D, e = cv.X, cv.Y, cv.D, cv.edge
    f32 = np.float32
    joint = 0.04 + rng.normal(0.0, 0.015)
    trab = smooth_field(rng, wr, wc, 200)
    X = X * f32(1.0 / rng.uniform(0.95, 1.05))

    # soft tissue: thigh, knee, calf (elliptical cross-section)
    W = f32(0.5) + f32(0.1) * np.clip(-Y, 0.0, 1.0) - f32(0.08) * np.clip(Y - f32(0.3), 0.0, 1.0)
    W += f32(0.035) * smooth(f32(0.3) - np.abs(Y - f32(joint)), 0.5)
    D += f32(0.42) * ramp(W - np.abs(X), e) * (f32(0.35) + f32(0.65) * dome((X / W) ** 2))

    # femur: shaft, metaphyseal flare, two condyles and the intercondylar notch
    win = cv.box(-0.6, 0.6, -1.2, joint + 0.05)
    x, y = X[win], Y[win]
    flare = smooth(y + f32(0.28), 0.42)
    fx = f32(-0.03) * (y + f32(1.0)) + f32(0.02)
    u = (x - fx) / (f32(0.14) + f32(0.24) * flare)
    notch = f32(0.085) * np.exp(f32(-0.5) * (u * f32(1 / 0.13)) ** 2)
    bottom = f32(joint - 0.03) - f32(0.02) * u * u - f32(0.1) * u**6 - notch
    femur = ramp(f32(1.0) - np.abs(u), 0.03) * ramp(bottom - y, e)
    _long_bone(D[win], femur, flare, u, bottom - y, trab[win],
               physis=band(y + f32(0.16) + f32(0.04) * u * u, 0.005, 0.008))

    # patella, seen through the distal femur
    pr2 = ((x - f32(0.03)) * f32(1 / 0.15)) ** 2 + ((y - f32(joint - 0.19)) * f32(1 / 0.17)) ** 2
    D[win] += f32(0.07) * dome(pr2) + f32(0.03) * band(pr2 - f32(0.93), 0.07, 0.05)

    # tibia: plateau with the tibial spines, tapering to the shaft
    win = cv.box(-0.6, 0.6, joint - 0.05, 1.2)
    x, y = X[win], Y[win]
    taper = smooth(f32(joint + 0.33) - y, 0.45)
    tx = f32(0.01) + f32(0.01) * y
    v = (x - tx) / (f32(0.13) + f32(0.25) * taper)
    spines = f32(0.03) * np.exp(f32(-0.5) * (v * f32(1 / 0.1)) ** 2)
    spines += f32(0.012) * np.exp(f32(-0.5) * ((np.abs(v) - f32(0.06)) * f32(1 / 0.025)) ** 2)
    top = f32(joint + 0.04) + f32(0.015) * v * v + f32(0.06) * v**8 - spines
    tibia = ramp(f32(1.0) - np.abs(v), 0.03) * ramp(y - top, e)
    _long_bone(D[win], tibia, taper, v, y - top, trab[win])

    # fibula, lateral: the patient's right is on the image left
    fbx = f32(-0.34) + f32(0.03) * (y - f32(0.2))
    fbw = f32(0.032) + f32(0.045) * smooth(f32(0.12) - np.abs(y - f32(joint + 0.2)), 0.2)
    fb = (x - fbx) / fbw
    head_top = f32(joint + 0.1) + f32(0.06) * fb * fb
    fib = ramp(f32(1.0) - np.abs(fb), 0.15) * ramp(y - head_top, e)
    fbc = np.clip(fb, -1.0, 1.0)
    D[win] += fib * (f32(0.06) * dome(fbc * fbc) + f32(0.14) * bone(fbc, 0.65, 0.8))
    D[win] += f32(0.02) * trab[win] * fib * smooth(f32(joint + 0.3) - y, 0.1)

    img = film(rng, D, rows, cols, gain=2.2)
    scale = max(1, min(rows, cols) // 100)
    pad = max(2, min(rows, cols) // 30)
    burn_text(img, "R", pad, pad, scale, 0.97)
    return to_stored(img, bits_stored)


def _long_bone(D: F32, mask: F32, end: F32, u: F32, depth: F32, trab: F32,
               physis: F32 | None = None) -> None:
    """Add a long bone seen AP to the window ``D`` (in place): its end (where ``end`` is 1)
    dense with trabeculae, becoming a tubular shaft. ``u`` goes from -1 to 1 across the
    bone, ``depth`` is the distance into it from the joint surface, ``physis`` the faint
    band of a closed growth plate."""
    f32 = np.float32
    uc = np.clip(u, -1.0, 1.0)
    D += mask * end * f32(0.22) * dome(uc * uc)
    D += mask * (f32(1.0) - end) * f32(0.36) * bone(uc, 0.7, 0.95)
    D += f32(0.09) * band(depth - f32(0.01), 0.009, 0.008) * mask
    if physis is not None:
        D += f32(0.05) * physis * mask
    D += f32(0.05) * band(np.abs(u) - f32(0.97), 0.03, 0.03) * mask * end
    D += f32(0.022) * trab * mask * end
