"""The result document: one per study, in the shape of the paper's Listing 3.

Listing 3's fields are kept exactly (names, nesting, ``value`` as a string); pxsgate's
additions live under ``pxsgate`` (its version, review flags, the headline score, the
selection decisions, stage timestamps), so a consumer written for the reference
deployment reads these documents unchanged.

``results`` holds one ``partners.clara.pxs.score`` entry per scored image, headline first;
a SUCCEEDED result of a patient with a prior scored image (see :mod:`pxsgate.change`) has one
more, ``pxs.change``, after them. Readers that want scores take only the PXS score entries
(:func:`pxs_entries`).

Status: SUCCEEDED (scored), FAILED (``exitCode`` non-zero, ``errorMessage`` says why) or
SKIPPED (the study is not a candidate; ``errorMessage`` gives the rule's reason), so every
received study has a traceable outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pxsgate import __version__
from pxsgate.records import ScoredImage, StudyDecision

DOCUMENT_VERSION = "0.2.4"  # Listing 3's version field
PXS_CODE = "partners.clara.pxs.score"
CHANGE_CODE = "pxs.change"  # the distance to the patient's prior scored image


@dataclass(frozen=True)
class ModelInfo:
    """What every result says about the model that made it (Listing 3 ``model``)."""

    name: str
    version: str
    author: str
    description: str
    created_at: str
    weights_sha256: str
    # The anchor pool is part of what a score means: same weights, other anchors, other
    # scores. Device and precision say how the forward pass ran.
    anchors_sha256: str = ""
    anchor_count: int = 0
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def id(self) -> str:
        return f"{self.name}-{self.version}"

    def block(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "displayName": self.name,
            "version": self.version,
            "author": self.author,
            "description": self.description,
            "createdAt": self.created_at,
            "weightsSha256": self.weights_sha256,
            "anchorsSha256": self.anchors_sha256,
            "anchorCount": self.anchor_count,
            "runtime": {"device": self.device, "precision": self.precision},
        }


@dataclass(frozen=True)
class StudyIdentity:
    """The study-level tags a result carries (PHI: stored, never logged)."""

    study_instance_uid: str
    patient_id: str
    accession_number: str
    # StudyDate/StudyTime as ISO 8601 local time (DICOM carries no offset), or None.
    study_datetime: str | None = None


def dicom_datetime(date: str, time: str) -> str | None:
    """StudyDate (YYYYMMDD) and StudyTime (HHMMSS.FFFFFF, parts optional) as ISO 8601
    without offset, or None when the date is not a valid DICOM DA."""
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    iso = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    digits = time.strip().split(".")[0].replace(":", "")
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return iso
    parts = [digits[i : i + 2] for i in range(0, len(digits), 2)] + ["00"] * (3 - len(digits) // 2)
    return f"{iso}T{':'.join(parts)}"


def format_score(score: float) -> str:
    """Listing 3 carries the value as a string; six decimals, trailing zeros dropped."""
    return f"{score:.6f}".rstrip("0").rstrip(".")


def reference(series_instance_uid: str, sop_instance_uid: str) -> dict[str, Any]:
    """One image as Listing 3 references it (derivedFrom, presentOn)."""
    return {"refSeriesInstanceUid": series_instance_uid,
            "refSopInstanceUid": [sop_instance_uid]}


def _derived_from(images: Sequence[ScoredImage]) -> list[dict[str, Any]]:
    return [reference(img.series_instance_uid, img.sop_instance_uid) for img in images]


def pxs_entries(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The document's PXS score entries (one per scored image, headline first), without
    the other kinds (``pxs.change``). An entry without a code counts as a score, as in the
    documents of the reference deployment."""
    return [r for r in document.get("results") or ()
            if isinstance(r, dict) and r.get("code", PXS_CODE) == PXS_CODE]


def _selection(decision: StudyDecision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "candidate": decision.candidate,
        "rule": decision.rule,
        "reason": decision.reason,
        "images": [
            {"sopInstanceUid": d.sop_instance_uid, "selected": d.selected, "rule": d.rule,
             "reason": d.reason, "acquired": d.acquired}
            for d in decision.images
        ],
    }


def build_document(
    *,
    status: str,
    identity: StudyIdentity,
    site_id: str,
    model: ModelInfo,
    created_at: str,
    updated_at: str,
    scores: Sequence[ScoredImage] = (),
    decision: StudyDecision | None = None,
    exit_code: int = 0,
    error_message: str = "",
    stages: Mapping[str, str | None] | None = None,
    flags: Sequence[str] = (),
    senders: Sequence[str] = (),
    attempts: int = 0,
    batch_sizes: Sequence[int] = (),
) -> dict[str, Any]:
    """One Listing-3 document. ``createdAt`` is when inference started, ``updatedAt`` when it
    finished (the paper's definitions). ``scores`` come headline first (the latest acquired
    image); ``pxsgate.headline`` names it and ``pxsgate.flags`` lists the review flags."""
    results = [
        {
            "code": PXS_CODE,
            "value": format_score(img.score),
            "description": "PXS Score",
            "derivedFrom": _derived_from([img]),
            "presentOn": _derived_from([img]),
            "refEntities": [],
        }
        for img in scores
    ]
    return {
        "version": DOCUMENT_VERSION,
        "id": str(uuid.uuid4()),
        "status": status,
        "studyInstanceUid": identity.study_instance_uid,
        "patientId": identity.patient_id,
        "accessionNumber": identity.accession_number,
        "siteId": site_id,
        "createdAt": created_at,
        "updatedAt": updated_at,
        "exitCode": exit_code,
        "errorMessage": error_message,
        "model": model.block(),
        "results": results,
        "entities": [],
        "pxsgate": {
            "version": __version__,
            "flags": list(flags),
            "headline": ({"sopInstanceUid": scores[0].sop_instance_uid,
                          "value": format_score(scores[0].score)} if scores else None),
            "selection": _selection(decision),
            "stages": dict(stages or {}),
            "studyDateTime": identity.study_datetime,
            "senders": list(senders),
            "inference": {"attempts": attempts, "batchSizes": list(batch_sizes)},
        },
    }
