"""Copies made from a radiograph: the CATH (line and tube enhanced) film and a viewer
screenshot."""

from __future__ import annotations

import numpy as np

from pxsgate.tools.synth.draw import U16, box_blur, resize, to_display, to_stored
from pxsgate.tools.synth.text import burn_box, burn_text


def catheter_enhance(pixels: U16, *, bits_stored: int = 12) -> U16:
    """Post-process a radiograph the way "CATH" (line and tube enhanced) copies are made.

    An unsharp mask with a strong gain on small structures and a steeper tone curve: tubes,
    wires and edges stand out; the image is otherwise the same.
    """
    img = to_display(pixels, bits_stored)
    rows, cols = img.shape
    radius = max(1, min(rows, cols) // 300)
    fine = img - box_blur(box_blur(img, radius, 0), radius, 1)
    # a wide blur, cheaply: block means of 16x16 pixels, resized back up
    k = 16 if min(rows, cols) >= 64 else 2
    h, w = rows // k, cols // k
    small = img[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)
    coarse = img - resize(small, rows, cols)
    out = img + np.float32(3.0) * fine + np.float32(0.5) * coarse
    out = np.float32(0.5) + (out - np.float32(0.5)) * np.float32(1.15)
    return to_stored(out, bits_stored)


def screen_capture(pixels: U16, *, bits_stored: int = 12, label: str = "DIST 42.7 MM") -> U16:
    """A viewer screenshot of an image: windowed to 8 bits, a dark frame, an annotation box.

    Returns uint16 values within ``bits_stored`` (the 8-bit screen levels scaled up), in the
    MONOCHROME2 sense, the same size as the input.
    """
    img = to_display(pixels, bits_stored)
    lo, hi = (float(v) for v in np.percentile(img[::4, ::4], [2.0, 99.5]))
    img = np.clip((img - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-3)), 0.0, 1.0)
    img = np.floor(img * np.float32(255.0)) * np.float32(1.0 / 255.0)  # 8-bit screen levels
    rows, cols = img.shape
    frame = max(2, min(rows, cols) // 32)
    img[:frame, :] = 0.0
    img[-frame:, :] = 0.0
    img[:, :frame] = 0.0
    img[:, -frame:] = 0.0
    scale = max(1, min(rows, cols) // 250)
    top, left = rows // 3, cols // 5
    h, w = rows // 4, cols // 3
    burn_box(img, top, left, h, w, scale, 1.0)
    r = top + h // 2
    img[r : r + scale, left + w // 8 : left + w - w // 8] = 1.0
    burn_text(img, label, top + h + 3 * scale, left, scale, 1.0)
    bar = max(frame, 12 * scale)
    img[-bar:, :] = 0.0
    burn_text(img, "SCREEN CAPTURE - NOT FOR DIAGNOSIS", rows - bar + 2 * scale, frame, scale, 0.9)
    return to_stored(img, bits_stored)
