"""The small frozen records that stages hand to each other, in data-flow order, and the
words they share: a result's Status, a study job's StudyState with the transitions allowed
between states (the store enforces them), a delivery's DeliveryState."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # numpy only for the annotation: this module stays light to import
    import numpy as np
    import numpy.typing as npt


# The review flags a result may carry (pxsgate.flags; rules.py sets them, the JSON Schema
# lists them, an exporter's when: may ask for them).
REVIEW_FLAGS = ("multiple-ap-images", "many-ap-images", "wrong-patient", "rescored",
                "instance-moved", "image-failed", "images-capped")


class Status(StrEnum):
    """A result's status (the result document's ``status``, its JSON Schema's enum)."""

    SUCCEEDED = "SUCCEEDED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


class StudyState(StrEnum):
    """A study job's state: receiving -> ready -> selected -> inferring -> stored -> exported,
    or failed. The first four are unfinished work that a start-up resumes."""

    RECEIVING = "receiving"
    READY = "ready"
    SELECTED = "selected"
    INFERRING = "inferring"
    STORED = "stored"
    EXPORTED = "exported"
    FAILED = "failed"


UNFINISHED_STATES: tuple[StudyState, ...] = (
    StudyState.RECEIVING, StudyState.READY, StudyState.SELECTED, StudyState.INFERRING)
DONE_STATES: tuple[StudyState, ...] = (StudyState.STORED, StudyState.EXPORTED, StudyState.FAILED)

# The state machine of a study job: the states each state may move to. Any state may go back
# to receiving (a late or changed instance re-opens the study); the store enforces the rest.
# Every unfinished state may move to ready: processing starts there, also for a job resumed
# at start-up. A failed study stays failed when its deliveries settle (only stored moves on
# to exported).
TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.READY}),
    StudyState.READY: frozenset({StudyState.READY, StudyState.SELECTED, StudyState.STORED,
                                 StudyState.FAILED}),
    StudyState.SELECTED: frozenset({StudyState.READY, StudyState.INFERRING, StudyState.STORED,
                                    StudyState.FAILED}),
    StudyState.INFERRING: frozenset({StudyState.READY, StudyState.INFERRING,
                                     StudyState.STORED, StudyState.FAILED}),
    StudyState.STORED: frozenset({StudyState.EXPORTED}),
    StudyState.EXPORTED: frozenset(),
    StudyState.FAILED: frozenset(),
}


def may_move(to: StudyState) -> tuple[StudyState, ...]:
    """The states from which a study may move to ``to``: every ``only_from`` guard."""
    if to == StudyState.RECEIVING:
        return tuple(StudyState)
    return tuple(s for s, targets in TRANSITIONS.items() if to in targets)


class DeliveryState(StrEnum):
    """A delivery's state in the outbox."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


def now_iso() -> str:
    """Now as ISO 8601 with offset (the result document's timestamp format)."""
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


def parse_since(value: str) -> str:
    """An ISO 8601 date or date-time; without an offset it is local time. Returns it with
    its offset, as the store compares it (``?since=`` of the API, ``--since`` of the
    command line)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"since: not an ISO 8601 date or date-time: {value!r}") from exc
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.isoformat()


# The web UI's roles (the store keeps each user's): each may do what the ones before it may.
ROLES = ("viewer", "reviewer", "operator")


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
    called_ae: str
    peer_address: str
    association_id: str
    received_at: str


# What indexing an instance did. new/changed: it (re-)opens its study; duplicate/revived:
# the bytes already held (revived: their file had been deleted by retention); attached:
# indexed, its study left as it is (a non-image object, or one pxsgate made itself).
InstanceOutcome = Literal["new", "changed", "duplicate", "revived", "attached"]
# image: may change what is scored; other: a non-image SOP class; own: made by pxsgate.
InstanceKind = Literal["image", "other", "own"]


@dataclass(frozen=True)
class Indexed:
    """store -> receive: what indexing an instance did (Store.record_instance)."""

    outcome: InstanceOutcome
    replaced: Path | None = None  # the file of the instance's earlier version, elsewhere
    kind: InstanceKind = "image"
    moved_from: str | None = None  # the study it was in before, when it changed study
    rescore_old: bool = False  # that study was re-opened, to be scored again without it


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
    # When the image was acquired, as sortable text (YYYYMMDDHHMMSS.ffffff; "" unknown).
    acquired: str = ""


@dataclass(frozen=True)
class StudyDecision:
    """select -> pipeline: whether the study is a candidate, the per-image decisions, and
    the review flags selection raised (multiple-ap-images, many-ap-images, wrong-patient)."""

    candidate: bool
    rule: str
    reason: str
    images: tuple[ImageDecision, ...]
    flags: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[ImageDecision, ...]:
        """The model-input images, latest acquired first (the study's headline image)."""
        return latest_first(d for d in self.images if d.selected)


def latest_first(images: Iterable[ImageDecision]) -> tuple[ImageDecision, ...]:
    """Images latest acquired first. Stable: images with equal (or unknown) times keep
    their arrival order, and of those the last to arrive counts as the latest."""
    return tuple(sorted(reversed(list(images)), key=lambda d: d.acquired, reverse=True))


@dataclass(frozen=True)
class ScoredImage:
    """infer -> results: the PXS score of one selected image, and its embedding (float32,
    on the CPU) when the model hands it out: the store keeps it for change over time."""

    sop_instance_uid: str
    series_instance_uid: str
    score: float
    batch_size: int = 1  # images in the forward pass that scored it
    embedding: npt.NDArray[np.float32] | None = field(default=None, compare=False,
                                                       repr=False)


@dataclass(frozen=True)
class PriorImage:
    """store -> change: the patient's most recent prior scored image (the headline image of
    a current SUCCEEDED result, same weights), with its stored float16 embedding."""

    result_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_time: str  # YYYY-MM-DDTHH:MM:SS, local (see pxsgate.change.study_time_key)
    study_datetime: str | None  # the prior result's pxsgate.studyDateTime, as it was
    score: float
    dim: int
    vector: bytes  # float16 little-endian, dim x 2 bytes
    # "pxsgate": a result pxsgate stored; "pacs": a prior fetched from the PACS (no result:
    # result_id is "").
    source: str = "pxsgate"
