"""The projected density of a frontal (AP or PA) chest, with its optional support devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from pxsgate.tools.synth.draw import (
    F32,
    Canvas,
    band,
    bone,
    dome,
    frac,
    gauss,
    ramp,
    smooth,
    smooth_field,
)
from pxsgate.tools.synth.lung import Segment, opacities, vessel_layer, vessel_tree

_A_APEX: Final = 0.3  # distance of the lung apices from the midline


@dataclass(frozen=True, eq=False)
class _Frontal:
    """The patient of a frontal (AP or PA) chest film.

    Every random choice is made here, first and in this order: severity and lines leave the
    patient unchanged.
    """

    ap: bool
    sh_y: float
    trunk_w: float
    heart_k: float
    apex: float
    cpa: float
    lat: list[float]
    dome_h: float
    rib_first: float
    rib_gap: float
    trees: list[list[Segment]]
    texture: F32
    bowel: F32
    opacity_rng: np.random.Generator  # its own generator: the same patient at any severity
    head_y: float

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: int, cols: int, ap: bool) -> _Frontal:
        sh_y = -0.99 + rng.normal(0.0, 0.015)
        trunk_w = float(rng.uniform(0.8, 0.87))
        heart_k = float(rng.uniform(0.93, 1.07)) * (1.1 if ap else 1.0)
        apex = -0.74 + rng.normal(0.0, 0.015) + (0.03 if ap else 0.0)
        cpa = (0.44 if ap else 0.52) + rng.normal(0.0, 0.02)
        lat = [trunk_w - 0.05 + rng.normal(0.0, 0.01) for _ in range(2)]
        dome_h = float(rng.uniform(0.19, 0.25))
        rib_first = apex - 0.06 + rng.normal(0.0, 0.01)
        rib_gap = 0.098 + rng.normal(0.0, 0.003)
        trees = [vessel_tree(rng, 0.19, 0.02), vessel_tree(rng, 0.19, -0.04)]
        texture = smooth_field(rng, rows, cols, 64)
        bowel = smooth_field(rng, rows, cols, 24)
        opacity_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
        head_y = -0.58 + rng.normal(0.0, 0.02)
        return cls(ap, sh_y, trunk_w, heart_k, apex, cpa, lat, dome_h, rib_first, rib_gap,
                   trees, texture, bowel, opacity_rng, head_y)

    def heart(self, x: F32, y: F32) -> F32:
        """An asymmetric ellipse, the apex to the patient's left (image right)."""
        f32 = np.float32
        hcx, hcy = 0.1, 0.33 + (0.02 if self.ap else 0.0)
        rxl, rxr, ry = 0.42 * self.heart_k, 0.29 * self.heart_k, 0.44 * self.heart_k
        hx = x - f32(hcx)
        inv = np.where(hx > 0, f32(1.0 / rxl), f32(1.0 / rxr))
        hy = np.minimum(y - f32(hcy), 0.0)  # flat-bottomed: it sits on the diaphragm
        r2 = (hx * inv) ** 2 + (hy * f32(1.0 / ry)) ** 2
        return ramp(f32(1.0) - r2, 0.04)


@dataclass(frozen=True)
class _Lung:
    """One lung of a frontal chest: ``side`` -1 is the patient's right, on the image's left."""

    index: int
    side: float
    cpa: float  # the costophrenic angle
    top: float
    lat: float
    dome_h: float

    @classmethod
    def of(cls, patient: _Frontal, index: int, side: float) -> _Lung:
        right = side < 0
        return cls(index, side, patient.cpa - (0.035 if right else 0.0),
                   patient.apex + (0.0 if right else 0.01), patient.lat[index], patient.dome_h)

    def outline(self, a: F32, y: F32) -> tuple[F32, F32, F32]:
        """Lateral border L(y), medial border M(y) and the diaphragm's height at a."""
        f32 = np.float32
        tl = np.clip((y - f32(self.top)) * f32(1.0 / (self.cpa - self.top)), 0.0, 1.0)
        L = f32(_A_APEX) + f32(self.lat - _A_APEX) * np.sqrt(tl * (f32(2.0) - tl))
        tm = np.clip((y - f32(self.top)) * f32(1.0 / 0.42), 0.0, 1.0)
        M = f32(_A_APEX) - f32(_A_APEX - 0.095) * np.sqrt(tm * (f32(2.0) - tm))
        if self.side > 0:  # the aortic knob bulges into the left lung
            M += f32(0.04) * np.exp(((y + f32(0.33)) * f32(1 / 0.07)) ** 2 * f32(-0.5))
        M += f32(0.06) * smooth(y + f32(0.12), 0.3)  # wider mediastinum at the hila
        ud = (a - f32(0.44)) * f32(1.0 / 0.42)
        diaphragm = f32(self.cpa) - f32(self.dome_h) * dome(ud * ud)
        return L, M, diaphragm


def frontal_chest(
    rng: np.random.Generator, rows: int, cols: int, *, ap: bool, severity: float, lines: bool
) -> F32:
    """Projected density of a frontal (AP or PA) chest; the patient's right on the image left."""
    cv = Canvas(rng, rows, cols)
    patient = _Frontal.draw(rng, rows, cols, ap)
    trunk = _trunk_and_arms(cv, patient)
    # lungs, their vessels and hila, posterior and anterior ribs, clavicles, scapulae
    lungs = np.zeros_like(cv.D)
    periphery = np.zeros_like(cv.D)
    for i, side in enumerate((-1.0, 1.0)):
        lung = _Lung.of(patient, i, side)
        _lung_field(cv, patient, lung, lungs, periphery)
        _posterior_ribs(cv, patient, lung)
        _clavicle(cv, ap, side)
        _scapula(cv, ap, side, trunk)
    _mediastinum(cv, ap)
    _upper_abdomen(cv, patient, trunk)
    if severity > 0:  # COVID-19-like opacities, peripheral and basal
        f32 = np.float32
        weight = f32(0.45) + f32(0.35) * periphery + f32(0.3) * np.clip(cv.Y + f32(0.2), 0.0, 1.0)
        cv.D += opacities(patient.opacity_rng, severity, np.clip(lungs, 0.0, 1.0), weight, 0.32)
    if lines:
        _support_devices(cv)
    return cv.D


def _trunk_and_arms(cv: Canvas, patient: _Frontal) -> F32:
    """The neck, sloping shoulders and trunk (an elliptical cross-section), and the arms
    hanging at the sides with the humerus. Returns where the trunk is."""
    X, Y, D, e = cv.X, cv.Y, cv.D, cv.edge
    f32 = np.float32
    trunk_w, head_y = patient.trunk_w, patient.head_y
    t = np.clip((Y - f32(patient.sh_y)) * f32(1.0 / 0.4), 0.0, 1.0)
    W = f32(0.17) + f32(trunk_w - 0.17) * (f32(1.0) - (f32(1.0) - t) ** 2)
    trunk = ramp(W - np.abs(X), e)
    thick = dome((X / W) ** 2)
    D += trunk * (f32(0.3) + f32(0.25) * thick) * (f32(0.7) + f32(0.3) * t)

    arm_c = trunk_w + (0.15 if patient.ap else 0.2)
    for side in (-1.0, 1.0):
        win = cv.side_box(side, trunk_w - 0.08, 1.4, head_y - 0.3, 1.2)
        x, y = cv.xy(win)
        a = x * f32(side)
        ua = (a - f32(arm_c)) * f32(1.0 / 0.13)
        va = np.minimum(y - f32(head_y), 0.0) * f32(1.0 / 0.2)
        arm = ramp(f32(1.0) - ua * ua - va * va, 0.08)
        D[win] += f32(0.3) * arm * (f32(0.4) + f32(0.6) * dome(ua * ua)) * (f32(1.0) - trunk[win])
        hr2 = ((a - f32(arm_c - 0.035)) * f32(1 / 0.085)) ** 2 + (
            (y - f32(head_y + 0.01)) * f32(1 / 0.09)
        ) ** 2
        D[win] += f32(0.16) * dome(hr2) + f32(0.06) * band(hr2 - f32(0.9), 0.1, 0.08)
        su = np.clip((a - f32(arm_c + 0.005)) * f32(1 / 0.048), -1.0, 1.0)
        D[win] += f32(0.22) * bone(su, 0.65, 0.5) * smooth(y - f32(head_y + 0.04), 0.08)
    return trunk


def _lung_field(cv: Canvas, patient: _Frontal, lung: _Lung, lungs: F32, periphery: F32) -> None:
    """Lung air, darker in the depth of the lung and partly hidden behind the heart, its
    vessels and the anterior ribs. Adds the lung to ``lungs`` and how peripheral each of its
    points is to ``periphery``."""
    D, e = cv.D, cv.edge
    f32 = np.float32
    side, top = lung.side, lung.top
    win = cv.side_box(side, 0.05, 1.0, top - 0.02, lung.cpa + 0.02)
    x, y = cv.xy(win)
    a = x * f32(side)
    L, M, diaphragm = lung.outline(a, y)
    heart = patient.heart(x, y)
    inside = ramp(L - a, e) * ramp(a - M, e)
    inside *= ramp(diaphragm - y, e) * ramp(y - f32(top), e)
    deep = np.clip((L - a) * f32(1 / 0.2), 0.0, 1.0)
    deep *= np.clip((diaphragm - y) * f32(4.0), 0.0, 1.0)
    deep *= np.clip((y - f32(top)) * f32(1 / 0.3), 0.0, 1.0)
    deep *= f32(0.4)
    deep += f32(0.6)
    air = inside * (f32(1.0) - f32(0.9) * heart)
    D[win] -= f32(0.43) * air * deep
    D[win] += f32(0.04) * heart * inside
    lungs[win] += air
    periphery[win] += inside * np.clip(
        f32(1.0) - (L - a) / np.maximum(L - M, f32(0.05)), 0.0, 1.0
    )
    # pulmonary vessels: branching trees from the hilum, thinner and fainter outwards
    hx_, hy_ = 0.19, (0.02 if side < 0 else -0.04)
    vessels = vessel_layer(cv, win, patient.trees[lung.index], side)
    vessels += f32(0.08) * gauss(a, y, hx_ - 0.01, hy_, 0.04, 0.08)
    vessels += f32(0.009) * patient.texture[win]
    D[win] += vessels * air
    # anterior ribs: faint, sloping down towards the sternum, ending at the cartilage
    d = f32(0.82) - a
    na, fa = frac(
        (y - (f32(patient.rib_first + 0.13) + f32(0.3) * d + f32(0.2) * d * d)) * f32(1 / 0.13)
    )
    band_a = ramp(fa, e / 0.13) * ramp(f32(0.3) - fa, e / 0.13)
    on_a = ramp(na + f32(0.5), 1.0) * ramp(f32(5.5) - na, 1.0) * ramp(a - f32(0.3), 0.14)
    D[win] += f32(0.035) * band_a * on_a * inside


def _posterior_ribs(cv: Canvas, patient: _Frontal, lung: _Lung) -> None:
    """The posterior ribs of one side: one warped periodic band pattern for all of them."""
    e = cv.edge
    f32 = np.float32
    rib_first, rib_gap = patient.rib_first, patient.rib_gap
    win = cv.side_box(lung.side, 0.05, 0.97, rib_first - 0.03, lung.cpa + 0.3)
    x, y = cv.xy(win)
    a = x * f32(lung.side)
    L, _, diaphragm = lung.outline(a, y)
    shape = f32(0.45) * (a - f32(0.2)) ** 2 - f32(0.02)
    shape += f32(0.6) * np.maximum(a - f32(0.55), 0.0) ** 2
    yy = y - shape - f32(rib_first)
    n, fr = frac(yy * f32(1.0 / rib_gap) * (f32(1.0) - f32(0.08) * yy))
    w = e / rib_gap
    rib = ramp(fr, w) * ramp(f32(0.42) - fr, w)
    rim = fr * f32(2.0 / 0.42) - f32(1.0)
    rim *= rim
    rim *= rim
    np.minimum(rim, 1.0, out=rim)
    rib *= f32(0.45) + f32(0.55) * rim
    rib *= ramp(n + f32(0.5), 1.0) * ramp(f32(10.5) - n, 1.0)
    rib *= ramp(a - f32(0.075), 0.03) * ramp(np.maximum(L, f32(0.62)) + f32(0.05) - a, 0.04)
    rib *= f32(0.35) + f32(0.65) * ramp(diaphragm + f32(0.04) - y, 0.1)
    cv.D[win] += f32(0.07) * rib


def _clavicle(cv: Canvas, ap: bool, side: float) -> None:
    """An S-shaped bone from the sternum to the acromion."""
    f32 = np.float32
    win = cv.side_box(side, 0.03, 0.72, -0.9, -0.45)
    x, y = cv.xy(win)
    u = x * f32(side) - f32(0.05)
    c0, slope = (-0.68, -0.03) if ap else (-0.6, -0.12)
    cy = f32(c0) + f32(slope) * u + f32(0.022) * np.sin(u * f32(9.0))
    half = f32(0.034) - f32(0.012) * np.clip(u * f32(1 / 0.6), 0.0, 1.0)
    v = np.clip((y - cy) / half, -1.0, 1.0)
    span = ramp(u, 0.02) * smooth(f32(0.63) - u, 0.06)
    cv.D[win] += f32(0.2) * bone(v, 0.65, 0.45) * span


def _scapula(cv: Canvas, ap: bool, side: float, trunk: F32) -> None:
    """Over the upper lung on AP films, rotated out of the lungs on PA films."""
    e = cv.edge
    f32 = np.float32
    win = cv.side_box(side, 0.45 if ap else 0.7, 1.0, -0.76, 0.05)
    x, y = cv.xy(win)
    a = x * f32(side)
    sm = f32(0.5 if ap else 0.74) + f32(0.16) * (y + f32(0.72)) * f32(1 / 0.62)
    tip_y = -0.08 if ap else -0.2
    low = f32(tip_y) - f32(1.1) * np.maximum(a - f32(0.66 if ap else 0.86), 0.0)
    scap = ramp(a - sm, 2 * e) * ramp(y + f32(0.72), 0.05) * ramp(low - y, 0.03)
    cv.D[win] += (f32(0.05) + f32(0.04) * band(a - sm, 0.007, e)) * scap * trunk[win]


def _mediastinum(cv: Canvas, ap: bool) -> None:
    """The spine, the trachea and main bronchi, and the aortic knob."""
    D, e = cv.D, cv.edge
    f32 = np.float32
    # spine: vertebral bodies, discs, pedicles, spinous processes (faint behind the heart)
    win = cv.box(-0.12, 0.12, -1.2, 1.2)
    x, y = cv.xy(win)
    _, phase = frac((y + f32(1.0)) * f32(1 / 0.088))
    disc = ramp(np.abs(phase - f32(0.5)) - f32(0.41), 0.05)
    D[win] += f32(0.05) * ramp(f32(0.06) - np.abs(x), 2 * e) * (f32(1.0) - f32(0.5) * disc)
    ped = ((np.abs(x) - f32(0.045)) * f32(1 / 0.013)) ** 2 + ((phase - f32(0.35)) * f32(6.0)) ** 2
    D[win] += f32(0.035) * dome(ped)
    spin = (x * f32(1 / 0.013)) ** 2 + ((phase - f32(0.68)) * f32(5.0)) ** 2
    D[win] += f32(0.025) * dome(spin)

    # trachea and main bronchi (air over the mediastinum)
    carina = -0.22 if ap else -0.2
    win = cv.box(-0.3, 0.3, -1.2, carina + 0.2)
    x, y = cv.xy(win)
    D[win] -= f32(0.12) * band(x - f32(0.005), 0.03, 0.012) * ramp(f32(carina) - y, 0.03)
    for side, k in ((-1.0, 0.6), (1.0, 0.95)):
        bx = x - f32(0.005) - f32(side * k) * (y - f32(carina))
        span = ramp(y - f32(carina), 0.02) * smooth(f32(carina + 0.12) - y, 0.08)
        D[win] -= f32(0.09) * band(bx, 0.02, 0.012) * span

    # aortic knob: a little denser than the rest of the mediastinum
    win = cv.box(-0.05, 0.3, -0.5, -0.15)
    x, y = cv.xy(win)
    D[win] += f32(0.04) * gauss(x, y, 0.1, -0.33, 0.05, 0.05)


def _upper_abdomen(cv: Canvas, patient: _Frontal, trunk: F32) -> None:
    """Bowel gas (faint mottled lucencies) and the gastric air bubble under the left
    hemidiaphragm."""
    D = cv.D
    f32 = np.float32
    cpa = patient.cpa
    win = cv.box(-0.85, 0.85, cpa + 0.05, 1.2)
    x, y = cv.xy(win)
    gas = smooth(patient.bowel[win] - f32(1.0), 0.8) * smooth(y - f32(cpa + 0.25), 0.3)
    D[win] -= f32(0.06) * gas * trunk[win]

    win = cv.box(0.15, 0.65, cpa - 0.1, cpa + 0.35)
    x, y = cv.xy(win)
    bub = ((x - f32(0.4)) * f32(1 / 0.1)) ** 2 + ((y - f32(cpa + 0.1)) * f32(1 / 0.05)) ** 2
    D[win] -= f32(0.05 if patient.ap else 0.12) * dome(bub)


def _support_devices(cv: Canvas) -> None:
    """Endotracheal tube, a right internal jugular central line and ECG leads (dense wires)."""
    f32 = np.float32
    e = cv.edge
    # ET tube: two radiopaque walls, tip above the carina
    win = cv.box(-0.1, 0.1, -1.2, -0.3)
    x, y = cv.xy(win)
    ett = ramp(f32(-0.36) - y, 0.02)
    for off in (-0.02, 0.02):
        cv.D[win] += f32(0.1) * band(x - f32(0.005 + off), 0.004, e) * ett
    # central venous catheter from the right neck to the cavo-atrial junction
    win = cv.box(-0.3, 0.05, -1.2, 0.1)
    x, y = cv.xy(win)
    path_x = f32(-0.2) + f32(0.14) * np.sqrt(np.clip((y + f32(0.95)) * f32(1 / 0.7), 0.0, 1.0))
    cvc = ramp(y + f32(0.98), 0.02) * ramp(f32(0.02) - y, 0.02)
    cv.D[win] += f32(0.2) * band(x - path_x, 0.0045, e) * cvc
    # ECG electrodes with short wires
    for ex, ey in ((-0.55, -0.62), (0.6, -0.6), (0.55, 0.55)):
        win = cv.box(ex - 0.05, ex + 0.05, -1.2, ey + 0.05)
        x, y = cv.xy(win)
        r2 = ((x - f32(ex)) * f32(1 / 0.035)) ** 2 + ((y - f32(ey)) * f32(1 / 0.035)) ** 2
        cv.D[win] += f32(0.25) * ramp(f32(1.0) - r2, 0.2) * ramp(r2 - f32(0.4), 0.2)
        wire_x = f32(ex) + f32(0.03) * np.sin((y - f32(ey)) * f32(6.0))
        cv.D[win] += f32(0.12) * band(x - wire_x, 0.003, e) * ramp(f32(ey - 0.03) - y, 0.02)
