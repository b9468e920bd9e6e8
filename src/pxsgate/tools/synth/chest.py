"""Chest radiographs (frontal AP and PA, left lateral) with optional opacities and support
devices, and the demo's pool of normal anchor radiographs."""

from __future__ import annotations

from typing import Literal

import numpy as np

from pxsgate.tools.synth.derived import catheter_enhance
from pxsgate.tools.synth.draw import U16, bits_max, check_size, film, to_stored, working_size
from pxsgate.tools.synth.frontal import frontal_chest
from pxsgate.tools.synth.lateral import lateral_chest
from pxsgate.tools.synth.text import burn_text

View = Literal["AP", "PA", "LATERAL"]


def chest_radiograph(
    rng: np.random.Generator,
    *,
    rows: int = 1024,
    cols: int = 1024,
    view: View = "AP",
    severity: float = 0.0,
    bits_stored: int = 12,
    catheter_enhanced: bool = False,
    lines: bool = False,
    marker: bool = True,
) -> U16:
    """A synthetic chest radiograph: uint16 stored values in the MONOCHROME2 sense.

    ``view``: AP (portable: larger heart, scapulae over the lungs, burned-in "AP PORTABLE"),
    PA, or LATERAL (one lung field, spine at the back, anterior on the image left).
    ``severity`` 0..1 adds patchy, peripheral and basal opacities. ``lines`` adds an
    endotracheal tube, a central line and ECG leads (frontal views). ``catheter_enhanced``
    implies ``lines`` and post-processes the film like a CATH copy (:func:`catheter_enhance`).
    ``marker`` burns in the side marker and view label. For one generator state the patient
    (anatomy, position) is the same whatever ``severity``, ``lines`` and ``marker`` are.
    """
    check_size(rows, cols)
    bits_max(bits_stored)
    if view not in ("AP", "PA", "LATERAL"):
        raise ValueError(f"view must be AP, PA or LATERAL, not {view!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be within 0..1, not {severity}")
    lines = lines or catheter_enhanced
    wr, wc = working_size(rows, cols)
    if view == "LATERAL":
        density = lateral_chest(rng, wr, wc, severity)
    else:
        density = frontal_chest(rng, wr, wc, ap=view == "AP", severity=severity, lines=lines)
    img = film(rng, density, rows, cols)
    if marker:
        scale = max(1, min(rows, cols) // 200)
        pad = max(2, min(rows, cols) // 40)
        burn_text(img, "L", pad, cols - pad - 12 * scale, 2 * scale, 0.97)
        if view == "AP":
            burn_text(img, "AP PORTABLE", pad, pad, scale, 0.95)
            burn_text(img, "SUPINE", pad + 9 * scale, pad, scale, 0.95)
        elif view == "LATERAL":
            burn_text(img, "LAT", pad, pad, scale, 0.95)
    out = to_stored(img, bits_stored)
    if catheter_enhanced:
        out = catheter_enhance(out, bits_stored=bits_stored)
    return out


def normal_chest_anchors(
    seed: int, count: int, *, rows: int = 512, cols: int = 512, bits_stored: int = 12
) -> list[U16]:
    """``count`` normal (severity 0) AP and PA chest radiographs with varied anatomy.

    The demo's anchor pool of normal radiographs. Deterministic in ``seed``; anchor ``i``
    does not depend on ``count``. No burned-in labels, no tubes or lines.
    """
    out: list[U16] = []
    for i in range(count):
        rng = np.random.default_rng([seed, 0xA4C407, i])
        view: View = "AP" if rng.random() < 0.5 else "PA"
        out.append(
            chest_radiograph(
                rng, rows=rows, cols=cols, view=view, bits_stored=bits_stored, marker=False
            )
        )
    return out
