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
from pxsgate.config import ExporterConfig
from pxsgate.document import (
    CHANGE_CODE,
    DOCUMENT_VERSION,
    PXS_CODE,
    Headline,
    ImageChoice,
    Inference,
    ModelInfo,
    Pxsgate,
    Reference,
    ResultDocument,
    ResultEntry,
    Selection,
    reference,
)
from pxsgate.records import ScoredImage, Status, StudyDecision

__all__ = ["CHANGE_CODE", "DOCUMENT_VERSION", "PXS_CODE", "ModelInfo", "ResultDocument",
           "StudyIdentity", "build_document", "dicom_datetime", "format_score", "pxs_entries",
           "reference"]

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


def _derived_from(image: ScoredImage) -> tuple[Reference, ...]:
    return (reference(image.series_instance_uid, image.sop_instance_uid),)


def pxs_entries(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The document's PXS score entries (one per scored image, headline first), without
    the other kinds (``pxs.change``). An entry without a code counts as a score, as in the
    documents of the reference deployment."""
    return [r for r in document.get("results") or ()
            if isinstance(r, dict) and r.get("code", PXS_CODE) == PXS_CODE]


def _selection(decision: StudyDecision | None) -> Selection | None:
    if decision is None:
        return None
    return Selection(decision.candidate, decision.rule, decision.reason, tuple(
        ImageChoice(d.sop_instance_uid, d.selected, d.rule, d.reason, d.acquired)
        for d in decision.images))


def build_document(
    *,
    status: Status,
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
) -> ResultDocument:
    """One Listing-3 document. ``createdAt`` is when inference started, ``updatedAt`` when it
    finished (the paper's definitions). ``scores`` come headline first (the latest acquired
    image); ``pxsgate.headline`` names it and ``pxsgate.flags`` lists the review flags."""
    results = tuple(
        ResultEntry(code=PXS_CODE, value=format_score(img.score), description="PXS Score",
                    derived_from=_derived_from(img), present_on=_derived_from(img))
        for img in scores)
    headline = (Headline(scores[0].sop_instance_uid, format_score(scores[0].score))
                if scores else None)
    return ResultDocument(
        id=str(uuid.uuid4()),
        status=Status(status),
        study_instance_uid=identity.study_instance_uid,
        patient_id=identity.patient_id,
        accession_number=identity.accession_number,
        site_id=site_id,
        created_at=created_at,
        updated_at=updated_at,
        exit_code=exit_code,
        error_message=error_message,
        model=model,
        results=results,
        pxsgate=Pxsgate(
            version=__version__, flags=tuple(flags), headline=headline,
            selection=_selection(decision), stages=tuple((stages or {}).items()),
            study_datetime=identity.study_datetime, senders=tuple(senders),
            inference=Inference(attempts, tuple(batch_sizes))),
    )


def exporters_for(exporters: Sequence[ExporterConfig], document: ResultDocument) -> list[str]:
    """The exporters a stored result goes to: its status is among theirs and it meets
    their ``when:`` (an exporter it does not meet gets no delivery row at all)."""
    score, change = document.headline_score, document.change_distance
    flags = document.pxsgate.flags
    return [e.name for e in exporters
            if e.wants(str(document.status), score, change, flags)]
