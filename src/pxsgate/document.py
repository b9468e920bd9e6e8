"""The result document as a type: frozen dataclasses that mirror its JSON Schema
(``schemas/result-document.schema.json``, still the contract), with ``to_json()`` giving the
document exactly as pxsgate has always written it (same keys, same order) and
``from_json()`` reading a stored one back.

The shape is the paper's Listing 3 plus pxsgate's additions under ``model`` and
``pxsgate``; :mod:`pxsgate.results` builds one, :mod:`pxsgate.change` adds the change entry,
the store keeps its JSON, the exporters read it (the HTTP exporter posts ``to_json()``, which
is the stored JSON of every document the store can hold). The HTTP API serves the stored
JSON as it is.

Documents written by earlier releases lack ``pxsgate.senders`` and ``pxsgate.inference``
(``None`` here, and left out again by ``to_json()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pxsgate.records import Status

DOCUMENT_VERSION = "0.2.4"  # Listing 3's version field
PXS_CODE = "partners.clara.pxs.score"
CHANGE_CODE = "pxs.change"  # the distance to the patient's prior scored image

Json = dict[str, Any]


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

    def to_json(self) -> Json:
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

    block = to_json  # the name the pipeline and the CLI have always used

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        runtime = data.get("runtime") or {}
        return cls(name=str(data.get("name", "")), version=str(data.get("version", "")),
                   author=str(data.get("author", "")),
                   description=str(data.get("description", "")),
                   created_at=str(data.get("createdAt", "")),
                   weights_sha256=str(data.get("weightsSha256", "")),
                   anchors_sha256=str(data.get("anchorsSha256", "")),
                   anchor_count=int(data.get("anchorCount", 0)),
                   device=str(runtime.get("device", "cpu")),
                   precision=str(runtime.get("precision", "fp32")))


@dataclass(frozen=True)
class Reference:
    """One image as Listing 3 references it (``derivedFrom``, ``presentOn``)."""

    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]

    def to_json(self) -> Json:
        return {"refSeriesInstanceUid": self.series_instance_uid,
                "refSopInstanceUid": list(self.sop_instance_uids)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        return cls(str(data.get("refSeriesInstanceUid", "")),
                   tuple(str(u) for u in data.get("refSopInstanceUid") or ()))


def reference(series_instance_uid: str, sop_instance_uid: str) -> Reference:
    return Reference(series_instance_uid, (sop_instance_uid,))


@dataclass(frozen=True)
class Change:
    """A ``pxs.change`` entry's ``change``: this headline image against the prior's."""

    distance: float
    score_difference: float
    prior_score: float
    prior_study_instance_uid: str
    prior_sop_instance_uid: str
    prior_study_date: str
    interval_days: float
    # Where the prior came from: "pxsgate" (a result it stored) or "pacs" (fetched from
    # the PACS); None in documents of releases before it was said.
    prior_source: str | None = None

    def to_json(self) -> Json:
        out: Json = {
            "distance": self.distance,
            "scoreDifference": self.score_difference,
            "priorScore": self.prior_score,
            "priorStudyInstanceUid": self.prior_study_instance_uid,
            "priorSopInstanceUid": self.prior_sop_instance_uid,
            "priorStudyDate": self.prior_study_date,
            "intervalDays": self.interval_days,
        }
        if self.prior_source is not None:
            out["priorSource"] = self.prior_source
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Change:
        return cls(distance=float(data["distance"]),
                   score_difference=float(data["scoreDifference"]),
                   prior_score=float(data["priorScore"]),
                   prior_study_instance_uid=str(data["priorStudyInstanceUid"]),
                   prior_sop_instance_uid=str(data["priorSopInstanceUid"]),
                   prior_study_date=str(data["priorStudyDate"]),
                   interval_days=float(data["intervalDays"]),
                   prior_source=(None if data.get("priorSource") is None
                                 else str(data["priorSource"])))


@dataclass(frozen=True)
class ResultEntry:
    """One entry of ``results``: a PXS score of one image, or the change since the prior."""

    code: str
    value: str  # a decimal string, as Listing 3 carries it
    description: str
    derived_from: tuple[Reference, ...]
    present_on: tuple[Reference, ...]
    ref_entities: tuple[str, ...] = ()
    change: Change | None = None

    @property
    def is_score(self) -> bool:
        return self.code == PXS_CODE

    @property
    def source_uids(self) -> list[str]:
        return [uid for ref in self.derived_from for uid in ref.sop_instance_uids]

    def to_json(self) -> Json:
        out: Json = {
            "code": self.code,
            "value": self.value,
            "description": self.description,
            "derivedFrom": [r.to_json() for r in self.derived_from],
            "presentOn": [r.to_json() for r in self.present_on],
            "refEntities": list(self.ref_entities),
        }
        if self.change is not None:
            out["change"] = self.change.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultEntry:
        # An entry without a code counts as a score, as in the reference deployment's.
        change = data.get("change")
        return cls(code=str(data.get("code", PXS_CODE)), value=str(data.get("value", "")),
                   description=str(data.get("description", "")),
                   derived_from=tuple(Reference.from_json(r)
                                      for r in data.get("derivedFrom") or ()),
                   present_on=tuple(Reference.from_json(r) for r in data.get("presentOn") or ()),
                   ref_entities=tuple(str(e) for e in data.get("refEntities") or ()),
                   change=Change.from_json(change) if isinstance(change, Mapping) else None)


@dataclass(frozen=True)
class Headline:
    """The score a reader sees first: the latest acquired image's."""

    sop_instance_uid: str
    value: str

    def to_json(self) -> Json:
        return {"sopInstanceUid": self.sop_instance_uid, "value": self.value}


@dataclass(frozen=True)
class ImageChoice:
    """The selection rules' decision on one instance, as the document records it."""

    sop_instance_uid: str
    selected: bool
    rule: str
    reason: str
    acquired: str

    def to_json(self) -> Json:
        return {"sopInstanceUid": self.sop_instance_uid, "selected": self.selected,
                "rule": self.rule, "reason": self.reason, "acquired": self.acquired}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageChoice:
        return cls(str(data.get("sopInstanceUid", "")), bool(data.get("selected")),
                   str(data.get("rule", "")), str(data.get("reason", "")),
                   str(data.get("acquired", "")))


@dataclass(frozen=True)
class Selection:
    """The study rule's decision and each instance's."""

    candidate: bool
    rule: str
    reason: str
    images: tuple[ImageChoice, ...]

    def to_json(self) -> Json:
        return {"candidate": self.candidate, "rule": self.rule, "reason": self.reason,
                "images": [i.to_json() for i in self.images]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        return cls(bool(data.get("candidate")), str(data.get("rule", "")),
                   str(data.get("reason", "")),
                   tuple(ImageChoice.from_json(i) for i in data.get("images") or ()))


@dataclass(frozen=True)
class Inference:
    """Tries to score the study and the batch size each scored image was in."""

    attempts: int
    batch_sizes: tuple[int, ...]

    def to_json(self) -> Json:
        return {"attempts": self.attempts, "batchSizes": list(self.batch_sizes)}


@dataclass(frozen=True)
class PriorLookup:
    """``pxsgate.priorLookup``: the PACS was asked for the patient's prior (no usable one
    was in the store) and what came of it within priors.wait-seconds."""

    outcome: str  # found | none-found | timeout | refused | failed
    source: str  # the PACS, as priors.source names it
    seconds: float  # how long the result waited for it
    detail: str = ""  # why, for refused and failed (pxsgate's words, no PHI)

    def to_json(self) -> Json:
        out: Json = {"outcome": self.outcome, "source": self.source, "seconds": self.seconds}
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriorLookup:
        return cls(outcome=str(data.get("outcome", "")), source=str(data.get("source", "")),
                   seconds=float(data.get("seconds", 0.0)), detail=str(data.get("detail", "")))


@dataclass(frozen=True)
class Pxsgate:
    """pxsgate's additions to Listing 3 (``pxsgate``)."""

    version: str
    flags: tuple[str, ...] = ()
    headline: Headline | None = None
    selection: Selection | None = None
    # Stage name -> ISO timestamp, in the order the stages ran.
    stages: tuple[tuple[str, str | None], ...] = ()
    study_datetime: str | None = None
    senders: tuple[str, ...] | None = ()  # None: a document of a release without it
    inference: Inference | None = Inference(0, ())
    prior_lookup: PriorLookup | None = None  # only when the PACS was asked

    def to_json(self) -> Json:
        out: Json = {
            "version": self.version,
            "flags": list(self.flags),
            "headline": self.headline.to_json() if self.headline else None,
            "selection": self.selection.to_json() if self.selection else None,
            "stages": dict(self.stages),
            "studyDateTime": self.study_datetime,
        }
        if self.senders is not None:
            out["senders"] = list(self.senders)
        if self.inference is not None:
            out["inference"] = self.inference.to_json()
        if self.prior_lookup is not None:
            out["priorLookup"] = self.prior_lookup.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pxsgate:
        headline, selection = data.get("headline"), data.get("selection")
        inference = data.get("inference")
        senders = data.get("senders")
        lookup = data.get("priorLookup")
        return cls(
            version=str(data.get("version", "")),
            flags=tuple(str(f) for f in data.get("flags") or ()),
            headline=(Headline(str(headline["sopInstanceUid"]), str(headline["value"]))
                      if isinstance(headline, Mapping) else None),
            selection=Selection.from_json(selection) if isinstance(selection, Mapping) else None,
            stages=tuple((str(k), None if v is None else str(v))
                         for k, v in (data.get("stages") or {}).items()),
            study_datetime=data.get("studyDateTime"),
            senders=None if senders is None else tuple(str(s) for s in senders),
            inference=(Inference(int(inference.get("attempts", 0)),
                                 tuple(int(b) for b in inference.get("batchSizes") or ()))
                       if isinstance(inference, Mapping) else None),
            prior_lookup=PriorLookup.from_json(lookup) if isinstance(lookup, Mapping) else None)


@dataclass(frozen=True)
class ResultDocument:
    """One result per study (Listing 3 and pxsgate's additions)."""

    id: str
    status: Status
    study_instance_uid: str
    patient_id: str
    accession_number: str
    site_id: str
    created_at: str
    updated_at: str
    model: ModelInfo
    pxsgate: Pxsgate
    results: tuple[ResultEntry, ...] = ()
    exit_code: int = 0
    error_message: str = ""
    entities: tuple[Mapping[str, str], ...] = ()
    version: str = DOCUMENT_VERSION
    # The model block as stored, when it was read back: kept as it was (an earlier release
    # may have written other fields).
    model_json: Json | None = field(default=None, compare=False, repr=False)

    @property
    def scores(self) -> tuple[ResultEntry, ...]:
        """The PXS score entries, headline first, without the other kinds (pxs.change)."""
        return tuple(r for r in self.results if r.is_score)

    @property
    def headline_score(self) -> float | None:
        """The headline PXS score (None: nothing scored)."""
        headline = self.pxsgate.headline
        return None if headline is None else float(headline.value)

    @property
    def change_distance(self) -> float | None:
        """The PXS change to the patient's prior (None: no change entry)."""
        for entry in self.results:
            if entry.change is not None:
                return entry.change.distance
        return None

    def with_entry(self, entry: ResultEntry) -> ResultDocument:
        """The document with ``entry`` after its results."""
        return replace(self, results=(*self.results, entry))

    def with_prior_lookup(self, lookup: PriorLookup) -> ResultDocument:
        """The document saying what asking the PACS for the prior came to."""
        return replace(self, pxsgate=replace(self.pxsgate, prior_lookup=lookup))

    def to_json(self) -> Json:
        return {
            "version": self.version,
            "id": self.id,
            "status": str(self.status),
            "studyInstanceUid": self.study_instance_uid,
            "patientId": self.patient_id,
            "accessionNumber": self.accession_number,
            "siteId": self.site_id,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "exitCode": self.exit_code,
            "errorMessage": self.error_message,
            "model": dict(self.model_json) if self.model_json is not None
            else self.model.to_json(),
            "results": [r.to_json() for r in self.results],
            "entities": [dict(e) for e in self.entities],
            "pxsgate": self.pxsgate.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultDocument:
        model = data.get("model") or {}
        return cls(
            version=str(data.get("version", DOCUMENT_VERSION)),
            id=str(data["id"]),
            status=Status(data["status"]),
            study_instance_uid=str(data.get("studyInstanceUid", "")),
            patient_id=str(data.get("patientId", "")),
            accession_number=str(data.get("accessionNumber", "")),
            site_id=str(data.get("siteId", "")),
            created_at=str(data.get("createdAt", "")),
            updated_at=str(data.get("updatedAt", "")),
            exit_code=int(data.get("exitCode", 0)),
            error_message=str(data.get("errorMessage", "")),
            model=ModelInfo.from_json(model),
            model_json=dict(model),
            results=tuple(ResultEntry.from_json(r) for r in data.get("results") or ()
                          if isinstance(r, Mapping)),
            entities=tuple({str(k): str(v) for k, v in e.items()}
                           for e in data.get("entities") or () if isinstance(e, Mapping)),
            pxsgate=Pxsgate.from_json(data.get("pxsgate") or {}),
        )

