"""The small frozen records that stages hand to each other, in data-flow order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


def now_iso() -> str:
    """Now as ISO 8601 with offset (the result document's timestamp format)."""
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ReceivedInstance:
    """receive -> store: one instance, durable in the spool, with who sent it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    sha256: str
    calling_ae: str
    peer_address: str
    association_id: str
    received_at: str


@dataclass(frozen=True)
class StoredInstance:
    """store -> select: an indexed instance of a study."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True)
class ImageDecision:
    """select: whether one instance is model input, and the rule that decided it."""

    sop_instance_uid: str
    series_instance_uid: str
    selected: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class StudyDecision:
    """select -> pipeline: whether the study is a candidate, and the per-image decisions."""

    candidate: bool
    rule: str
    reason: str
    images: tuple[ImageDecision, ...]

    @property
    def inputs(self) -> tuple[ImageDecision, ...]:
        return tuple(d for d in self.images if d.selected)


@dataclass(frozen=True)
class ScoredImage:
    """infer -> results: the PXS score of one selected image."""

    sop_instance_uid: str
    series_instance_uid: str
    score: float
