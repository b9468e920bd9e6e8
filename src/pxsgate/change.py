"""Change over time: the PXS distance between a patient's image and their prior one.

The PXS model is Siamese: the distance that scores an image against normal anchors also
measures how far it has moved from the same patient's previous image. Every scored image's
embedding is stored with its result (float16, 2 bytes a dimension: 2 KB for the model's
1000), and keeps being stored after retention deletes the image itself.

When a study is scored, its headline image is compared with the patient's *prior*: the
headline image of the patient's most recent current SUCCEEDED result whose study time is
strictly earlier (another study at the same time, or the same study, is not a prior), made
with the same weights (embeddings of other weights are not comparable), within
``change.look-back-days``. The result then carries a second kind of entry, ``pxs.change``.

The distance is the Euclidean norm of the difference of the two embeddings *as stored*
(both rounded to float16, subtracted in float64), so anyone can reproduce it from the store;
it differs from the float32 distance by about float16's relative precision (1e-3). Unlike
the PXS score's F.pairwise_distance it adds no 1e-6 to the difference.

Study time: ``pxsgate.studyDateTime`` (StudyDate and StudyTime, local time; a date alone is
its midnight), or, for a study without a valid StudyDate, when scoring started (the
result's createdAt, in local time). Kept as ``YYYY-MM-DDTHH:MM:SS`` text, which sorts as
time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from pxsgate.document import CHANGE_CODE, Change, ResultEntry, reference
from pxsgate.records import PriorImage, ScoredImage
from pxsgate.results import format_score

VECTOR_DTYPE = np.dtype("<f2")  # float16, little-endian
_F16_MAX = float(np.finfo(np.float16).max)  # 65504: beyond it float16 is infinite
CHANGE_DESCRIPTION = "PXS change: Siamese distance to the patient's prior scored image"


def pack(embedding: npt.NDArray[np.floating[Any]]) -> bytes:
    """An embedding as stored: float16 little-endian (values beyond float16's range are
    clipped to it, so a stored vector is always finite)."""
    flat = np.asarray(embedding, dtype=np.float32).reshape(-1)
    return np.clip(flat, -_F16_MAX, _F16_MAX).astype(VECTOR_DTYPE).tobytes()


def unpack(blob: bytes, dim: int) -> npt.NDArray[np.float16]:
    """A stored embedding back as float16 values."""
    if len(blob) != dim * VECTOR_DTYPE.itemsize:
        raise ValueError(f"a stored embedding of {dim} dimensions has {len(blob)} bytes")
    return np.frombuffer(blob, dtype=VECTOR_DTYPE, count=dim)


def distance(a: bytes, b: bytes, dim: int) -> float:
    """Euclidean distance of two stored (float16) embeddings, computed in float64."""
    diff = unpack(a, dim).astype(np.float64) - unpack(b, dim).astype(np.float64)
    return float(np.linalg.norm(diff))


def study_time_key(study_datetime: str | None, created_at: str) -> str:
    """The study's time as the store compares it: ``YYYY-MM-DDTHH:MM:SS`` local time. A
    StudyDate/StudyTime that is no real date or time (month 13) counts as none."""
    if study_datetime:
        try:
            return datetime.fromisoformat(study_datetime).isoformat(timespec="seconds")
        except ValueError:
            pass
    created = datetime.fromisoformat(created_at)
    if created.tzinfo is not None:
        created = created.astimezone()  # this host's local time, as DICOM dates are
    return created.replace(tzinfo=None).isoformat(timespec="seconds")


def look_back_start(study_time: str, days: float | None) -> str:
    """The earliest study time a prior may have ("" when there is no limit)."""
    if days is None:
        return ""
    start = datetime.fromisoformat(study_time) - timedelta(days=days)
    return start.isoformat(timespec="seconds")


def interval_days(prior_time: str, study_time: str) -> float:
    seconds = (datetime.fromisoformat(study_time)
               - datetime.fromisoformat(prior_time)).total_seconds()
    return round(seconds / 86400, 2)


def change_entry(headline: ScoredImage, vector: bytes, study_time: str,
                 prior: PriorImage) -> ResultEntry:
    """The ``pxs.change`` result entry of ``headline`` (stored as ``vector``) against
    ``prior``."""
    dim = len(vector) // VECTOR_DTYPE.itemsize
    if dim != prior.dim:
        raise ValueError(f"embeddings of {dim} and {prior.dim} dimensions")
    value = distance(vector, prior.vector, dim)
    this = reference(headline.series_instance_uid, headline.sop_instance_uid)
    return ResultEntry(
        code=CHANGE_CODE,
        value=format_score(value),
        description=CHANGE_DESCRIPTION,
        derived_from=(this, reference(prior.series_instance_uid, prior.sop_instance_uid)),
        present_on=(this,),
        change=Change(
            distance=value,
            score_difference=headline.score - prior.score,
            prior_score=prior.score,
            prior_study_instance_uid=prior.study_instance_uid,
            prior_sop_instance_uid=prior.sop_instance_uid,
            prior_study_date=prior.study_datetime or prior.study_time,
            interval_days=interval_days(prior.study_time, study_time),
            prior_source=prior.source),
    )
