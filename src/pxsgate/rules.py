"""Selection: is a study a candidate for the model, and which of its images are model input.

The default rules are the paper's approach ("Study Selection" and "Series Selection"),
generalised: a candidate study has CR/DX images of the chest; an image is model input when
its view is AP, it is not a CATH-enhanced copy, not a screenshot and not a DX "For
Processing" image. Every decision carries the rule that made it and a reason a sysadmin can
read, and is stored (``decisions`` table), so a skipped study is never a mystery.

Rules read only header tags (the files are read with ``stop_before_pixels``). Real CR/DX
images carry ImageType ``DERIVED\\PRIMARY``: DERIVED alone marks nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset

from pxsgate.config import SelectionConfig
from pxsgate.messages import ImageDecision, StoredInstance, StudyDecision

# Secondary Capture Image Storage and its multi-frame variants (PS3.4 Annex B.5).
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
})
DX_FOR_PROCESSING = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral - For Processing
})

# Words that name a radiographic view in a SeriesDescription, and the view they name.
VIEW_TOKENS = {
    "AP": "AP", "PA": "PA", "LAT": "LATERAL", "LATERAL": "LATERAL", "LL": "LATERAL",
    "RL": "LATERAL", "LLD": "LATERAL", "RLD": "LATERAL", "OBL": "OBLIQUE", "OBLIQUE": "OBLIQUE",
}
# ViewPosition (0018,5101) defined terms, PS3.3 C.8.11.5, mapped the same way.
VIEW_POSITIONS = {"AP": "AP", "PA": "PA", "LL": "LATERAL", "RL": "LATERAL", "LLD": "LATERAL",
                  "RLD": "LATERAL", "LATERAL": "LATERAL", "LAT": "LATERAL"}


def tokens(text: str) -> list[str]:
    """Upper-case words of ``text`` split on anything not a letter or digit ("ap_supine" ->
    AP, SUPINE), so a token match respects word boundaries ("CAPTURE" holds no AP)."""
    return re.findall(r"[A-Z0-9]+", text.upper())


@dataclass(frozen=True)
class Header:
    """An instance and the header tags the rules read."""

    instance: StoredInstance
    dataset: Dataset | None  # None: the file could not be read
    error: str = ""

    def text(self, keyword: str) -> str:
        if self.dataset is None:
            return ""
        value = self.dataset.get(keyword, "")
        return "" if value is None else str(value).strip()

    def values(self, keyword: str) -> list[str]:
        if self.dataset is None:
            return []
        value = self.dataset.get(keyword)
        if value is None:
            return []
        if isinstance(value, str):
            return [value.strip().upper()]
        return [str(v).strip().upper() for v in value]


def _is_chest(h: Header, cfg: SelectionConfig) -> tuple[bool, str]:
    body_part = h.text("BodyPartExamined").upper()
    if body_part:
        return body_part in cfg.body_parts, f"BodyPartExamined {body_part}"
    words = set(cfg.chest_words)
    for keyword in ("StudyDescription", "SeriesDescription"):
        if words.intersection(tokens(h.text(keyword))):
            return True, f"{keyword} names the chest"
    return False, "no BodyPartExamined and no chest word in the descriptions"


def _view(h: Header) -> tuple[str | None, str]:
    """The view; one named in SeriesDescription wins over ViewPosition (the paper's lesson:
    the site-standardised description is the more reliable of the two)."""
    for token in tokens(h.text("SeriesDescription")):
        if token in VIEW_TOKENS:
            return VIEW_TOKENS[token], f"SeriesDescription names {token}"
    position = h.text("ViewPosition").upper()
    if position:
        return VIEW_POSITIONS.get(position, position), f"ViewPosition {position}"
    return None, "no view in SeriesDescription or ViewPosition"


def _decide_image(h: Header, cfg: SelectionConfig) -> ImageDecision:
    inst = h.instance

    def decision(selected: bool, rule: str, reason: str) -> ImageDecision:
        return ImageDecision(inst.sop_instance_uid, inst.series_instance_uid, selected, rule,
                             reason)

    if h.dataset is None:
        return decision(False, "readable", f"header unreadable: {h.error}")
    if inst.sop_class_uid in SECONDARY_CAPTURE_CLASSES or "SECONDARY" in h.values("ImageType"):
        return decision(False, "not-screenshot", "screenshot (Secondary Capture or SECONDARY)")
    modality = h.text("Modality").upper()
    if modality not in cfg.modalities:
        return decision(False, "modality", f"Modality {modality or 'empty'}")
    if inst.sop_class_uid in DX_FOR_PROCESSING:
        return decision(False, "for-presentation", "a For Processing image")
    derivation = set(tokens(h.text("DerivationDescription")))
    if hit := derivation.intersection(cfg.exclude_derivation):
        return decision(False, "not-derived-copy", f"DerivationDescription {sorted(hit)[0]}")
    chest, why = _is_chest(h, cfg)
    if not chest:
        return decision(False, "body-part", why)
    view, why = _view(h)
    if view not in cfg.views:
        return decision(False, "view", f"view {view or 'unknown'} ({why})")
    return decision(True, "view", f"{modality} chest, view {view} ({why})")


def select(headers: Sequence[Header], cfg: SelectionConfig) -> StudyDecision:
    """Decide a whole study: the study-level verdict and one decision per instance."""
    readable = [h for h in headers if h.dataset is not None]
    modalities = sorted({h.text("Modality").upper() or "?" for h in readable})
    projection = [h for h in readable if h.text("Modality").upper() in cfg.modalities]
    if not projection:
        return StudyDecision(False, "modality",
                             f"no {'/'.join(cfg.modalities)} images (Modality "
                             f"{', '.join(modalities) or 'unknown'})", ())
    chest = [h for h in projection if _is_chest(h, cfg)[0]]
    if not chest:
        parts = sorted({h.text("BodyPartExamined").upper() or "empty" for h in projection})
        return StudyDecision(False, "body-part",
                             f"not a chest study (BodyPartExamined {', '.join(parts)})", ())
    images = tuple(_decide_image(h, cfg) for h in headers)
    chosen = [d for d in images if d.selected]
    if not chosen:
        return StudyDecision(False, "view", f"no {'/'.join(cfg.views)} image among "
                             f"{len(images)} instance(s)", images)
    return StudyDecision(True, "candidate",
                         f"chest {'/'.join(cfg.modalities)} study, {len(chosen)} model "
                         "input image(s)", images)
