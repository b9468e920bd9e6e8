"""The SQLite store: instances with their senders, studies, selection decisions, results.

One file under ``storage.data-dir``, in WAL mode so readers (``pxsgate results``, other
processes) never block the service's writer. The schema is versioned with
``PRAGMA user_version``; :data:`MIGRATIONS` are applied in order at open and never edited
once released (add a new one instead).

Result documents are stored as JSON text with the fields people search on copied into
indexed columns (the paper's SQL Server design: JSON plus indexes on inference id,
PatientID and StudyInstanceUID).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from pxsgate.errors import StoreError
from pxsgate.records import (
    ImageDecision,
    Indexed,
    InstanceKind,
    InstanceOutcome,
    PriorImage,
    ReceivedInstance,
    StoredInstance,
    StudyDecision,
)
from pxsgate.service.failpoints import Failpoints
from pxsgate.sopclass import is_image

MIGRATIONS: tuple[str, ...] = (
    # 1: the walking skeleton
    """
    CREATE TABLE instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        study_instance_uid  TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        sop_class_uid       TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        path                TEXT NOT NULL,
        size                INTEGER NOT NULL,
        sha256              TEXT NOT NULL,
        calling_ae          TEXT NOT NULL,
        peer_address        TEXT NOT NULL,
        association_id      TEXT NOT NULL,
        received_at         TEXT NOT NULL,
        receive_count       INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX instances_study ON instances (study_instance_uid);

    CREATE TABLE studies (
        study_instance_uid TEXT PRIMARY KEY,
        state              TEXT NOT NULL,
        reason             TEXT NOT NULL DEFAULT '',
        first_received_at  TEXT NOT NULL,
        last_received_at   TEXT NOT NULL,
        released_at        TEXT,
        ready_at           TEXT,
        updated_at         TEXT NOT NULL
    );

    CREATE TABLE decisions (
        study_instance_uid TEXT NOT NULL,
        sop_instance_uid   TEXT,          -- NULL: the study-level decision
        selected           INTEGER NOT NULL,
        rule               TEXT NOT NULL,
        reason             TEXT NOT NULL,
        decided_at         TEXT NOT NULL
    );
    CREATE INDEX decisions_study ON decisions (study_instance_uid);

    CREATE TABLE results (
        id                 TEXT PRIMARY KEY,  -- the inference id of the document
        study_instance_uid TEXT NOT NULL,
        patient_id         TEXT NOT NULL,
        accession_number   TEXT NOT NULL,
        model_id           TEXT NOT NULL,
        status             TEXT NOT NULL,
        created_at         TEXT NOT NULL,
        document           TEXT NOT NULL CHECK (json_valid(document))
    );
    CREATE INDEX results_study ON results (study_instance_uid);
    CREATE INDEX results_patient ON results (patient_id);
    CREATE INDEX results_accession ON results (accession_number);
    CREATE INDEX results_model ON results (model_id);
    CREATE INDEX results_status ON results (status);
    CREATE INDEX results_created ON results (created_at);
    """,
    # 2: review flags, result history, study deadlines that survive a restart (issue 4)
    """
    ALTER TABLE instances ADD COLUMN called_ae TEXT NOT NULL DEFAULT '';
    ALTER TABLE results ADD COLUMN flags TEXT NOT NULL DEFAULT '';  -- space-separated
    ALTER TABLE results ADD COLUMN current INTEGER NOT NULL DEFAULT 1;
    UPDATE results SET current = 0 WHERE rowid NOT IN
        (SELECT max(rowid) FROM results GROUP BY study_instance_uid);
    CREATE INDEX results_current ON results (study_instance_uid, current);
    CREATE INDEX results_flagged ON results (flags) WHERE flags != '';
    -- When the study is ready (Unix time) if nothing more arrives; NULL once handed on.
    ALTER TABLE studies ADD COLUMN deadline REAL;
    -- The settle time that applies after the study's associations are released.
    ALTER TABLE studies ADD COLUMN settle_seconds REAL;
    CREATE INDEX studies_state ON studies (state);
    """,
    # 3: results for every audience, and the outbox (issue 6)
    """
    -- createdAt in UTC (YYYY-MM-DDTHH:MM:SS.SSSZ): sortable and comparable across offsets.
    ALTER TABLE results ADD COLUMN created_utc TEXT NOT NULL DEFAULT '';
    UPDATE results SET created_utc = strftime('%Y-%m-%dT%H:%M:%fZ', created_at);
    CREATE INDEX results_created_utc ON results (created_utc);
    -- Keyed hash of PatientID (HMAC-SHA256 with the store's own secret): researchers can
    -- follow a patient over time without the MRN, which a plain hash would not hide.
    ALTER TABLE results ADD COLUMN patient_key TEXT NOT NULL DEFAULT '';
    CREATE INDEX results_patient_key ON results (patient_key);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

    -- The transactional outbox: rows written in the result's own transaction, one per
    -- exporter; delivered at least once, under an id the receiver can de-duplicate on.
    CREATE TABLE deliveries (
        id              TEXT PRIMARY KEY,
        result_id       TEXT NOT NULL REFERENCES results (id),
        exporter        TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,                    -- Unix time
        last_error      TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        delivered_at    TEXT
    );
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_result ON deliveries (result_id);

    -- Views per audience (the paper's SQL Server views), over each study's current result.
    CREATE VIEW radiologist_view AS
    SELECT r.patient_id AS patient_id,
           r.accession_number AS accession_number,
           json_extract(r.document, '$.pxsgate.studyDateTime') AS study_time,
           r.study_instance_uid AS study_instance_uid,
           r.status AS status,
           CAST(json_extract(r.document, '$.pxsgate.headline.value') AS REAL) AS pxs_score,
           r.flags AS flags,
           r.created_at AS scored_at
    FROM results r WHERE r.current = 1;

    CREATE VIEW researcher_view AS
    SELECT r.id AS result_id,
           r.patient_key AS patient_hash,
           substr(json_extract(r.document, '$.pxsgate.studyDateTime'), 1, 10) AS study_date,
           r.status AS status,
           CAST(json_extract(r.document, '$.pxsgate.headline.value') AS REAL) AS pxs_score,
           (SELECT json_group_array(CAST(json_extract(e.value, '$.value') AS REAL))
              FROM json_each(r.document, '$.results') e) AS image_scores,
           r.model_id AS model_id,
           json_extract(r.document, '$.model.version') AS model_version,
           json_extract(r.document, '$.model.weightsSha256') AS weights_sha256,
           json_extract(r.document, '$.model.anchorsSha256') AS anchors_sha256,
           r.flags AS flags,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.ready'))) * 86400,
                 3) AS ready_to_stored_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.inferred'))
                  - julianday(r.created_at)) * 86400, 3) AS inference_s,
           r.created_utc AS scored_at_utc
    FROM results r WHERE r.current = 1;

    CREATE VIEW support_view AS
    SELECT r.id AS result_id,
           r.study_instance_uid AS study_instance_uid,
           r.status AS status,
           json_extract(r.document, '$.exitCode') AS exit_code,
           json_extract(r.document, '$.errorMessage') AS error_message,
           r.flags AS flags,
           json_extract(r.document, '$.pxsgate.stages.received') AS received_at,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.ready'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.received'))) * 86400,
                 3) AS received_to_ready_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.ready'))) * 86400,
                 3) AS ready_to_stored_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.received'))) * 86400,
                 3) AS received_to_stored_s,
           (SELECT group_concat(DISTINCT i.calling_ae) FROM instances i
             WHERE i.study_instance_uid = r.study_instance_uid) AS senders,
           json_extract(r.document, '$.pxsgate.selection.rule') AS study_rule,
           json_extract(r.document, '$.pxsgate.selection.reason') AS study_reason,
           (SELECT group_concat(d.rule || ': ' || d.reason, '; ') FROM decisions d
             WHERE d.study_instance_uid = r.study_instance_uid
               AND d.sop_instance_uid IS NOT NULL) AS image_reasons,
           (SELECT count(*) FROM deliveries o WHERE o.result_id = r.id
               AND o.state = 'pending') AS deliveries_pending,
           (SELECT count(*) FROM deliveries o WHERE o.result_id = r.id
               AND o.state = 'dead') AS deliveries_dead,
           r.model_id AS model_id,
           r.created_at AS created_at
    FROM results r WHERE r.current = 1;
    """,
    # 4: each study's job state machine, and retention (issue 7)
    """
    -- state: receiving -> ready -> selected -> inferring -> stored -> exported, or failed
    -- (a study that is not a candidate goes from ready to stored with a SKIPPED result).
    ALTER TABLE studies ADD COLUMN outcome TEXT NOT NULL DEFAULT '';  -- the result's status
    ALTER TABLE studies ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;  -- tries this round
    -- Unix time the study last finished: its result stored, or its last delivery settled.
    ALTER TABLE studies ADD COLUMN finished_at REAL;
    ALTER TABLE studies ADD COLUMN purged_at TEXT;  -- its spooled images were deleted
    ALTER TABLE instances ADD COLUMN removed_at TEXT;  -- its spool file was deleted
    UPDATE studies SET
        outcome = CASE state WHEN 'scored' THEN 'SUCCEEDED' WHEN 'skipped' THEN 'SKIPPED'
                             ELSE 'FAILED' END,
        state = CASE state WHEN 'failed' THEN 'failed' ELSE 'stored' END,
        finished_at = (julianday(updated_at) - 2440587.5) * 86400
    WHERE state IN ('scored', 'skipped', 'failed');
    CREATE INDEX studies_finished ON studies (finished_at) WHERE purged_at IS NULL;

    -- support_view gains the job: its state, tries, and whether its images are still kept.
    DROP VIEW support_view;
    CREATE VIEW support_view AS
    SELECT r.id AS result_id,
           r.study_instance_uid AS study_instance_uid,
           r.status AS status,
           s.state AS job_state,
           s.attempts AS attempts,
           json_extract(r.document, '$.exitCode') AS exit_code,
           json_extract(r.document, '$.errorMessage') AS error_message,
           r.flags AS flags,
           json_extract(r.document, '$.pxsgate.stages.received') AS received_at,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.ready'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.received'))) * 86400,
                 3) AS received_to_ready_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.ready'))) * 86400,
                 3) AS ready_to_stored_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.received'))) * 86400,
                 3) AS received_to_stored_s,
           (SELECT group_concat(DISTINCT i.calling_ae) FROM instances i
             WHERE i.study_instance_uid = r.study_instance_uid) AS senders,
           json_extract(r.document, '$.pxsgate.selection.rule') AS study_rule,
           json_extract(r.document, '$.pxsgate.selection.reason') AS study_reason,
           (SELECT group_concat(d.rule || ': ' || d.reason, '; ') FROM decisions d
             WHERE d.study_instance_uid = r.study_instance_uid
               AND d.sop_instance_uid IS NOT NULL) AS image_reasons,
           (SELECT count(*) FROM deliveries o WHERE o.result_id = r.id
               AND o.state = 'pending') AS deliveries_pending,
           (SELECT count(*) FROM deliveries o WHERE o.result_id = r.id
               AND o.state = 'dead') AS deliveries_dead,
           s.purged_at AS images_deleted_at,
           r.model_id AS model_id,
           r.created_at AS created_at
    FROM results r LEFT JOIN studies s ON s.study_instance_uid = r.study_instance_uid
    WHERE r.current = 1;
    """,
    # 5: change over time: each scored image's embedding, kept with its result (issue 10)
    """
    -- One row per scored image of a SUCCEEDED result, written in the result's transaction.
    -- Stays when retention deletes the image: it is what later studies are compared with.
    -- The vectors have a table of their own: at 2 KB (1000 dimensions) two fill a 4 KB
    -- page, where a row with the columns below as well would take a page alone.
    CREATE TABLE embedding_vectors (
        id     INTEGER PRIMARY KEY,
        vector BLOB NOT NULL                   -- float16 little-endian, dim x 2 bytes
    );
    CREATE TABLE embeddings (
        result_id           TEXT NOT NULL REFERENCES results (id),
        sop_instance_uid    TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        study_instance_uid  TEXT NOT NULL,
        patient_key         TEXT NOT NULL,     -- results.patient_key ('' without PatientID)
        -- YYYY-MM-DDTHH:MM:SS local: pxsgate.studyDateTime (a date alone: its midnight),
        -- or the result's createdAt when the study has no valid StudyDate.
        study_time          TEXT NOT NULL,
        headline            INTEGER NOT NULL,  -- 1: the study's headline image
        score               REAL NOT NULL,     -- its PXS score
        weights_sha256      TEXT NOT NULL,     -- embeddings compare only under one weights
        anchors_sha256      TEXT NOT NULL,     -- what its score was measured against
        dim                 INTEGER NOT NULL,
        vector_id           INTEGER NOT NULL REFERENCES embedding_vectors (id),
        PRIMARY KEY (result_id, sop_instance_uid)
    );
    -- The prior lookup: a patient's headline images under one weights, by study time.
    CREATE INDEX embeddings_prior ON embeddings (patient_key, weights_sha256, study_time)
        WHERE headline = 1;

    -- researcher_view: image_scores takes only the PXS score entries, and the change to
    -- the patient's prior scored image is added, de-identified (no prior UIDs or dates).
    DROP VIEW researcher_view;
    CREATE VIEW researcher_view AS
    SELECT r.id AS result_id,
           r.patient_key AS patient_hash,
           substr(json_extract(r.document, '$.pxsgate.studyDateTime'), 1, 10) AS study_date,
           r.status AS status,
           CAST(json_extract(r.document, '$.pxsgate.headline.value') AS REAL) AS pxs_score,
           (SELECT json_group_array(CAST(json_extract(e.value, '$.value') AS REAL))
              FROM json_each(r.document, '$.results') e
             WHERE coalesce(json_extract(e.value, '$.code'), 'partners.clara.pxs.score')
                   = 'partners.clara.pxs.score') AS image_scores,
           r.model_id AS model_id,
           json_extract(r.document, '$.model.version') AS model_version,
           json_extract(r.document, '$.model.weightsSha256') AS weights_sha256,
           json_extract(r.document, '$.model.anchorsSha256') AS anchors_sha256,
           r.flags AS flags,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.stored'))
                  - julianday(json_extract(r.document, '$.pxsgate.stages.ready'))) * 86400,
                 3) AS ready_to_stored_s,
           round((julianday(json_extract(r.document, '$.pxsgate.stages.inferred'))
                  - julianday(r.created_at)) * 86400, 3) AS inference_s,
           r.created_utc AS scored_at_utc,
           (SELECT json_extract(e.value, '$.change.distance')
              FROM json_each(r.document, '$.results') e
             WHERE json_extract(e.value, '$.code') = 'pxs.change') AS change_distance,
           (SELECT json_extract(e.value, '$.change.scoreDifference')
              FROM json_each(r.document, '$.results') e
             WHERE json_extract(e.value, '$.code') = 'pxs.change') AS score_change,
           (SELECT json_extract(e.value, '$.change.intervalDays')
              FROM json_each(r.document, '$.results') e
             WHERE json_extract(e.value, '$.code') = 'pxs.change') AS interval_days
    FROM results r WHERE r.current = 1;
    """,
    # 6: what may re-open a study, pxsgate's own objects, every reception (issue 17)
    """
    -- Only an instance that could change what is scored re-opens a finished study:
    -- 'image' may; 'other' (a non-image SOP class: SR, KO, PR, ...) and 'own' (an object
    -- pxsgate made itself, found by its SOP Instance UID in made_instances) never do.
    ALTER TABLE instances ADD COLUMN kind TEXT NOT NULL DEFAULT 'image';

    -- Every DICOM object pxsgate made for an exporter (its SRs): recognised for certain
    -- when a router sends it back, and numbered so that a rescore's SR supersedes the
    -- earlier one (one series per study and exporter, InstanceNumber counting up, the
    -- predecessor named in PredecessorDocumentsSequence).
    CREATE TABLE made_instances (
        sop_instance_uid    TEXT PRIMARY KEY,
        sop_class_uid       TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        study_instance_uid  TEXT NOT NULL,
        result_id           TEXT NOT NULL,
        exporter            TEXT NOT NULL,
        instance_number     INTEGER NOT NULL,
        created_at          TEXT NOT NULL,
        UNIQUE (result_id, exporter),
        UNIQUE (study_instance_uid, exporter, instance_number)
    );

    -- One row per C-STORE that was indexed: the same instance sent again, on another
    -- association or by another sender, is one more row (pxsgate trace lists them all).
    CREATE TABLE receptions (
        sop_instance_uid   TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        association_id     TEXT NOT NULL,
        calling_ae         TEXT NOT NULL,
        called_ae          TEXT NOT NULL,
        peer_address       TEXT NOT NULL,
        received_at        TEXT NOT NULL,
        outcome            TEXT NOT NULL     -- new, changed, duplicate, revived, attached
    );
    CREATE INDEX receptions_study ON receptions (study_instance_uid);

    -- An instance sent again under another study (a PACS correction moving an image to
    -- the right study or patient): both studies are scored again and flagged.
    CREATE TABLE instance_moves (
        sop_instance_uid   TEXT NOT NULL,
        from_study_uid     TEXT NOT NULL,
        to_study_uid       TEXT NOT NULL,
        patient_changed    INTEGER NOT NULL,   -- 1: its PatientID differs from before
        moved_at           TEXT NOT NULL
    );
    CREATE INDEX instance_moves_from ON instance_moves (from_study_uid);
    CREATE INDEX instance_moves_to ON instance_moves (to_study_uid);

    -- One row that /healthz rewrites: the store answers reads and can still write (a
    -- full disk fails writes while reads go on).
    CREATE TABLE health_probe (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at TEXT NOT NULL
    );
    INSERT INTO receptions
    SELECT sop_instance_uid, study_instance_uid, association_id, calling_ae, called_ae,
           peer_address, received_at, 'new'
    FROM instances;
    """,
)

# The patient's prior scored image (pxsgate.change): served by embeddings_prior, newest
# first from the top of the range, each candidate's result checked by its primary key;
# only the one found has its vector read.
PRIOR_IMAGE_SQL = """
    SELECT e.result_id, e.study_instance_uid, e.series_instance_uid, e.sop_instance_uid,
           e.study_time, json_extract(r.document, '$.pxsgate.studyDateTime'), e.score,
           e.dim, (SELECT v.vector FROM embedding_vectors v WHERE v.id = e.vector_id)
    FROM embeddings e CROSS JOIN results r
    WHERE e.patient_key = :patient AND e.weights_sha256 = :weights AND e.headline = 1
      AND e.study_time < :before AND e.study_time >= :not_before
      AND e.study_instance_uid != :study
      AND r.id = e.result_id AND r.current = 1 AND r.status = 'SUCCEEDED'
    ORDER BY e.study_time DESC
    LIMIT 1
"""

# Job states; the first four are unfinished work that a start-up resumes.
UNFINISHED_STATES = ("receiving", "ready", "selected", "inferring")
DONE_STATES = ("stored", "exported", "failed")
_MADE_COLUMNS = ("sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, "
                 "result_id, exporter, instance_number")


@dataclass(frozen=True)
class MadeInstance:
    """A DICOM object pxsgate made for an exporter (an SR), as the store numbered it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    result_id: str
    exporter: str
    instance_number: int


DeliveryState = Literal["pending", "delivered", "dead"]
UTC_FORMAT = "%Y-%m-%dT%H:%M:%fZ"  # SQLite strftime: created_utc, comparable as text


@dataclass(frozen=True)
class ImageEmbedding:
    """One scored image's embedding, as the store keeps it."""

    sop_instance_uid: str
    series_instance_uid: str
    score: float
    dim: int
    vector: bytes  # float16 little-endian (pxsgate.change.pack)


@dataclass(frozen=True)
class StudyEmbeddings:
    """The embeddings of a SUCCEEDED result's images (headline first), and where the
    study stands in time, for :meth:`Store.store_result`."""

    images: tuple[ImageEmbedding, ...]
    study_time: str  # pxsgate.change.study_time_key
    weights_sha256: str
    anchors_sha256: str
    # Look for the patient's prior image from this study time on ("" = no limit); None:
    # change detection is off.
    prior_from: str | None = None


# Given the stored document and the prior image found, the document to store instead.
WithPrior = Callable[[dict[str, Any], PriorImage], dict[str, Any]]


@dataclass(frozen=True)
class ResultFilter:
    study_uid: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    status: str | None = None
    model: str | None = None  # model id, e.g. PxsScore-0.1
    since: str | None = None  # ISO 8601 with offset: results created at or after it
    flagged: bool = False
    history: bool = False  # every result, not only each study's current one
    limit: int | None = None


@dataclass(frozen=True)
class Delivery:
    """One result bound for one exporter: an outbox row."""

    id: str  # stable across retries and restarts: the receiver de-duplicates on it
    result_id: str
    exporter: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: str
    updated_at: str
    delivered_at: str | None


def delivery_id(result_id: str, exporter: str) -> str:
    """The delivery's id: derived, so the same result for the same exporter is always the
    same delivery."""
    return str(uuid.uuid5(uuid.UUID(result_id), exporter))


@dataclass(frozen=True)
class PendingStudy:
    """A study whose job was unfinished when the service stopped, and when it should be
    ready if it was still receiving."""

    study_instance_uid: str
    state: str  # one of UNFINISHED_STATES
    deadline: float | None  # Unix time
    settle_seconds: float | None
    attempts: int = 0


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    state: str
    reason: str
    received_at: str  # the last instance's
    released_at: str | None
    ready_at: str | None
    senders: tuple[str, ...]  # calling AE titles, sorted
    attempts: int = 0


F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def _transaction(method: F) -> F:
    """A write method is one transaction. Writers take turns (the service's coroutines
    share one connection: without this, one's COMMIT would commit another's half-done
    statements), and a write that fails (the database locked by another process past the
    busy timeout, a full disk) is rolled back, leaving no transaction open behind it."""

    @functools.wraps(method)
    async def guarded(self: Store, *args: Any, **kwargs: Any) -> Any:
        async with self._write_lock:
            try:
                return await method(self, *args, **kwargs)
            except BaseException:
                # Always: after a cancellation the interrupted statement may still be
                # queued on aiosqlite's thread; the rollback runs after it (and is a no-op
                # when no transaction is open).
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await asyncio.shield(self._db.rollback())
                raise

    return cast(F, guarded)


class Store:
    """Async access to the SQLite file. One connection; aiosqlite serialises its use."""

    def __init__(self, path: Path, failpoints: Failpoints | None = None) -> None:
        self.path = path
        self._failpoints = failpoints or Failpoints()
        self._write_lock = asyncio.Lock()
        self.reveal_uids = False  # study_label: the UID itself (logging.include-phi)
        self._db: aiosqlite.Connection | None = None
        self._patient_secret = b""

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, which is what Success promised.
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._migrate()
            self._patient_secret = await self._secret()
            await self._backfill_patient_keys()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this pxsgate "
                f"({len(MIGRATIONS)}): upgrade pxsgate"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.db.executescript(
                f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;"
            )

    async def _secret(self) -> bytes:
        """The store's key for patient hashes, made once at its creation."""
        await self.db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('patient-key-secret', ?)",
            (secrets.token_hex(32),))
        await self.db.commit()
        async with self.db.execute(
                "SELECT value FROM meta WHERE key = 'patient-key-secret'") as cur:
            row = await cur.fetchone()
        assert row is not None
        return bytes.fromhex(row[0])

    def study_label(self, study_uid: str) -> str:
        """How logs name a study: a keyed hash of its UID (12 hex digits; `pxsgate trace`
        takes it), or the UID itself when ``reveal_uids`` (logging.include-phi)."""
        return study_uid if self.reveal_uids else self.study_label_hashed(study_uid)

    async def find_study(self, text: str) -> str | None:
        """A StudyInstanceUID from a UID or a study key found in the logs."""
        async with self.db.execute(
                "SELECT study_instance_uid FROM studies WHERE study_instance_uid = ?",
                (text,)) as cur:
            if (row := await cur.fetchone()) is not None:
                return str(row[0])
        if len(text) != 12:
            return None
        async with self.db.execute("SELECT study_instance_uid FROM studies") as cur:
            async for (uid,) in cur:
                if hmac.compare_digest(self.study_label_hashed(uid), text):
                    return str(uid)
        # Logs written before study keys named a study by its UID's last 12 characters.
        async with self.db.execute(
                "SELECT study_instance_uid FROM studies WHERE study_instance_uid LIKE ? "
                "LIMIT 2", (f"%{text}",)) as cur:
            rows = list(await cur.fetchall())
        return str(rows[0][0]) if len(rows) == 1 else None

    def study_label_hashed(self, study_uid: str) -> str:
        digest = hmac.new(self._patient_secret, b"study:" + study_uid.encode(), hashlib.sha256)
        return digest.hexdigest()[:12]

    def patient_key(self, patient_id: str) -> str:
        """HMAC-SHA256 of a PatientID under this store's secret (hex, 32 digits)."""
        if not patient_id:
            return ""
        digest = hmac.new(self._patient_secret, patient_id.encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    async def _backfill_patient_keys(self) -> None:
        async with self.db.execute(
                "SELECT id, patient_id FROM results WHERE patient_key = '' AND patient_id != ''"
        ) as cur:
            rows = await cur.fetchall()
        if rows:
            await self.db.executemany("UPDATE results SET patient_key = ? WHERE id = ?",
                                      [(self.patient_key(r[1]), r[0]) for r in rows])
            await self.db.commit()

    # --- instances (receive -> store) ----------------------------------------------------

    @_transaction
    async def record_instance(self, inst: ReceivedInstance, deadline: float,
                              settle_seconds: float) -> Indexed:
        """Index a durable instance. A re-send is stored once and counted: ``duplicate`` when
        its bytes are the ones already held (the study is left as it is), ``revived`` when
        they are the bytes of an instance whose file retention had deleted (the file is
        kept again, for retention to delete later; the study is not re-scored). An image
        that is new or ``changed`` (re)opens its study to ``receiving``; a non-image object
        or one pxsgate made itself is ``attached``: indexed, its study left as it is (a new
        study is still opened, so that it ends with a result). ``deadline`` (Unix time) is
        when its study is ready if nothing more arrives. When a changed instance moved to
        another study, ``replaced`` is its old file, which the caller deletes. Every call
        adds a row to ``receptions``."""
        async with self.db.execute(
            """SELECT sha256, study_instance_uid, path, removed_at FROM instances
               WHERE sop_instance_uid = ?""",
            (inst.sop_instance_uid,),
        ) as cur:
            row = await cur.fetchone()
        kind = await self._instance_kind(inst)
        if row is not None and (row[0], row[1]) == (inst.sha256, inst.study_instance_uid):
            await self.db.execute(
                """UPDATE instances SET receive_count = receive_count + 1, calling_ae = ?,
                       called_ae = ?, peer_address = ?, association_id = ?, received_at = ?,
                       removed_at = NULL
                   WHERE sop_instance_uid = ?""",
                (inst.calling_ae, inst.called_ae, inst.peer_address, inst.association_id,
                 inst.received_at,
                 inst.sop_instance_uid),
            )
            if row[3] is not None:
                await self.db.execute(
                    """UPDATE studies SET purged_at = NULL, finished_at = ?
                       WHERE study_instance_uid = ? AND purged_at IS NOT NULL""",
                    (time.time(), inst.study_instance_uid))
            indexed = Indexed("duplicate" if row[3] is None else "revived", kind=kind)
            await self._add_reception(inst, indexed.outcome)
            await self.db.commit()
            return indexed
        await self.db.execute(
            """
            INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid,
                sop_class_uid, transfer_syntax_uid, path, size, sha256, calling_ae,
                called_ae, peer_address, association_id, received_at, kind)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (sop_instance_uid) DO UPDATE SET
                study_instance_uid = excluded.study_instance_uid,
                series_instance_uid = excluded.series_instance_uid,
                sop_class_uid = excluded.sop_class_uid,
                transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path,
                size = excluded.size, sha256 = excluded.sha256,
                calling_ae = excluded.calling_ae, called_ae = excluded.called_ae,
                peer_address = excluded.peer_address,
                association_id = excluded.association_id, received_at = excluded.received_at,
                receive_count = receive_count + 1, removed_at = NULL, kind = excluded.kind
            """,
            (
                inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid,
                inst.sop_class_uid, inst.transfer_syntax_uid, str(inst.path), inst.size,
                inst.sha256, inst.calling_ae, inst.called_ae, inst.peer_address,
                inst.association_id, inst.received_at, kind,
            ),
        )
        opened = await self._open_study(inst, deadline, settle_seconds,
                                        reopen=kind == "image")
        moved = (Path(row[2]) if row is not None and row[2] != str(inst.path)
                 and row[3] is None else None)
        moved_from = (str(row[1]) if row is not None and row[1] != inst.study_instance_uid
                      else None)
        rescore_old = False
        if moved_from is not None:
            # A correction, recorded with the instance (whether its PatientID changed is
            # filled in by the caller, which reads the files). An image's old study is
            # scored again, so that its result no longer claims it, at the deadline of the
            # study it joined; not one retention has emptied (nothing left to score).
            await self.db.execute(
                """INSERT INTO instance_moves (sop_instance_uid, from_study_uid, to_study_uid,
                       patient_changed, moved_at) VALUES (?, ?, ?, 0, ?)""",
                (inst.sop_instance_uid, moved_from, inst.study_instance_uid,
                 inst.received_at))
            if kind == "image":
                cursor = await self.db.execute(
                    """UPDATE studies SET state = 'receiving', reason = '', updated_at = ?,
                           deadline = ?, settle_seconds = ?, attempts = 0
                       WHERE study_instance_uid = ? AND purged_at IS NULL""",
                    (inst.received_at, deadline, settle_seconds, moved_from))
                rescore_old = cursor.rowcount == 1
        outcome: InstanceOutcome = ("attached" if not opened
                                    else "new" if row is None else "changed")
        await self._add_reception(inst, outcome)
        await self.db.commit()
        return Indexed(outcome, moved, kind, moved_from, rescore_old)

    @_transaction
    async def set_move_patient_changed(self, sop_uid: str, to_study: str) -> None:
        """The moved instance's PatientID differs from its earlier version's."""
        await self.db.execute(
            """UPDATE instance_moves SET patient_changed = 1
               WHERE sop_instance_uid = ? AND to_study_uid = ?""", (sop_uid, to_study))
        await self.db.commit()

    async def is_current(self, result_id: str) -> bool:
        """Whether the result is its study's current one (not superseded by a rescore)."""
        async with self.db.execute("SELECT current FROM results WHERE id = ?",
                                   (result_id,)) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])

    async def move_flags(self, study_uid: str) -> tuple[str, ...]:
        """Review flags from instances that moved into or out of the study: instance-moved,
        and wrong-patient when a moved instance changed PatientID."""
        async with self.db.execute(
                """SELECT max(patient_changed) FROM instance_moves
                   WHERE from_study_uid = ? OR to_study_uid = ?""",
                (study_uid, study_uid)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return ()
        return ("instance-moved", "wrong-patient") if row[0] else ("instance-moved",)

    async def _instance_kind(self, inst: ReceivedInstance) -> InstanceKind:
        async with self.db.execute(
                "SELECT 1 FROM made_instances WHERE sop_instance_uid = ?",
                (inst.sop_instance_uid,)) as cur:
            if await cur.fetchone() is not None:
                return "own"
        return "image" if is_image(inst.sop_class_uid) else "other"

    async def _open_study(self, inst: ReceivedInstance, deadline: float,
                          settle_seconds: float, *, reopen: bool) -> bool:
        """Open the instance's study, or re-open it to ``receiving`` when ``reopen``; True
        when the study is (again) receiving because of this instance."""
        conflict = """DO UPDATE SET
                state = 'receiving', reason = '', last_received_at = excluded.last_received_at,
                updated_at = excluded.updated_at, deadline = excluded.deadline,
                settle_seconds = excluded.settle_seconds, attempts = 0, purged_at = NULL"""
        cursor = await self.db.execute(
            f"""
            INSERT INTO studies (study_instance_uid, state, first_received_at,
                last_received_at, updated_at, deadline, settle_seconds)
            VALUES (?, 'receiving', ?, ?, ?, ?, ?)
            ON CONFLICT (study_instance_uid) {conflict if reopen else "DO NOTHING"}
            """,
            (inst.study_instance_uid, inst.received_at, inst.received_at, inst.received_at,
             deadline, settle_seconds),
        )
        if reopen or cursor.rowcount == 1:
            return True
        # Attached to a study whose files retention had deleted: its new file must be
        # deleted in turn, so the study is purgeable again (as a revived instance makes it).
        await self.db.execute(
            """UPDATE studies SET purged_at = NULL, finished_at = ?
               WHERE study_instance_uid = ? AND purged_at IS NOT NULL""",
            (time.time(), inst.study_instance_uid))
        return False

    async def _add_reception(self, inst: ReceivedInstance, outcome: InstanceOutcome) -> None:
        await self.db.execute(
            """INSERT INTO receptions (sop_instance_uid, study_instance_uid, association_id,
                   calling_ae, called_ae, peer_address, received_at, outcome)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (inst.sop_instance_uid, inst.study_instance_uid, inst.association_id,
             inst.calling_ae, inst.called_ae, inst.peer_address, inst.received_at, outcome))

    # --- objects pxsgate made (export -> receive) ------------------------------------------

    @_transaction
    async def made_instance(self, *, result_id: str, exporter: str, study_uid: str,
                            sop_class_uid: str, sop_instance_uid: str,
                            series_instance_uid: str, at: str
                            ) -> tuple[MadeInstance, MadeInstance | None]:
        """The object made from ``result_id`` for ``exporter`` (registered on the first
        call; a retried delivery gets the same one back) and the one it supersedes: the
        study's previous object for that exporter, or None. Registered before it is sent,
        so that it is known for pxsgate's own when a router sends it back."""
        async with self.db.execute(
                f"SELECT {_MADE_COLUMNS} FROM made_instances "
                "WHERE result_id = ? AND exporter = ?", (result_id, exporter)) as cur:
            found = await cur.fetchone()
        row: tuple[Any, ...]
        if found is not None:
            row = tuple(found)
        else:
            async with self.db.execute(
                    """SELECT coalesce(max(instance_number), 0) + 1 FROM made_instances
                       WHERE study_instance_uid = ? AND exporter = ?""",
                    (study_uid, exporter)) as cur:
                number_row = await cur.fetchone()
            assert number_row is not None
            row = (sop_instance_uid, sop_class_uid, series_instance_uid, study_uid,
                   result_id, exporter, int(number_row[0]))
            await self.db.execute(
                f"INSERT INTO made_instances ({_MADE_COLUMNS}, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*row, at))
            await self.db.commit()
        made = MadeInstance(*row)
        async with self.db.execute(
                f"""SELECT {_MADE_COLUMNS} FROM made_instances
                    WHERE study_instance_uid = ? AND exporter = ? AND instance_number < ?
                    ORDER BY instance_number DESC LIMIT 1""",
                (made.study_instance_uid, exporter, made.instance_number)) as cur:
            previous = await cur.fetchone()
        return made, MadeInstance(*tuple(previous)) if previous is not None else None

    @_transaction
    async def forget_made_instance(self, sop_instance_uid: str) -> None:
        """Unregister an object that could not be made after all (never sent)."""
        await self.db.execute("DELETE FROM made_instances WHERE sop_instance_uid = ?",
                              (sop_instance_uid,))
        await self.db.commit()

    async def instances_for_study(self, study_uid: str) -> list[StoredInstance]:
        async with self.db.execute(
            """SELECT sop_instance_uid, series_instance_uid, sop_class_uid, path
               FROM instances WHERE study_instance_uid = ? AND removed_at IS NULL
                 AND kind != 'own'
               ORDER BY received_at""",
            (study_uid,),
        ) as cur:
            rows = await cur.fetchall()
        return [StoredInstance(r[0], r[1], r[2], Path(r[3])) for r in rows]

    # --- studies (assemble) -----------------------------------------------------------------

    @_transaction
    async def mark_study(self, study_uid: str, state: str, at: str, reason: str = "",
                         column: str | None = None, only_from: Sequence[str] = ()) -> None:
        """Set a study's state; ``column`` (released_at or ready_at) also gets ``at``.
        ``only_from``: only if it is in one of these states (a late instance re-opens a
        study to ``receiving``: that must not be overwritten)."""
        extra = ""
        if column is not None:
            if column not in ("released_at", "ready_at"):
                raise ValueError(column)
            extra = f", {column} = :at"
        if state != "receiving":
            extra += ", deadline = NULL"
        guard = ""
        if only_from:
            if not set(only_from) <= set(UNFINISHED_STATES + DONE_STATES):
                raise ValueError(only_from)
            guard = f" AND state IN ({','.join(repr(s) for s in only_from)})"
        await self.db.execute(
            f"""UPDATE studies SET state = :state, reason = :reason, updated_at = :at{extra}
                WHERE study_instance_uid = :uid{guard}""",
            {"state": state, "reason": reason, "at": at, "uid": study_uid},
        )
        await self.db.commit()

    @_transaction
    async def set_released(self, deadlines: Iterable[tuple[str, float]], at: str) -> None:
        """Note the association release of studies, each with its new deadline."""
        await self.db.executemany(
            """UPDATE studies SET released_at = ?, updated_at = ?, deadline = ?
               WHERE study_instance_uid = ? AND state = 'receiving'""",
            [(at, at, deadline, uid) for uid, deadline in deadlines],
        )
        await self.db.commit()

    async def pending_studies(self) -> list[PendingStudy]:
        """Studies whose job is unfinished (receiving, ready, selected, inferring): what a
        start-up resumes. Oldest first."""
        marks = ",".join("?" * len(UNFINISHED_STATES))
        async with self.db.execute(
            f"""SELECT study_instance_uid, state, deadline, settle_seconds, attempts
                FROM studies WHERE state IN ({marks}) ORDER BY last_received_at""",
            UNFINISHED_STATES,
        ) as cur:
            rows = await cur.fetchall()
        return [PendingStudy(*r) for r in rows]

    @_transaction
    async def begin_attempt(self, study_uid: str, at: str) -> int:
        """Move a study to ``inferring`` and count the try (committed before the model is
        asked, so a crash during inference counts); return the tries so far this round."""
        await self.db.execute(
            """UPDATE studies SET state = 'inferring', attempts = attempts + 1, updated_at = ?
               WHERE study_instance_uid = ? AND state IN ('selected', 'inferring')""",
            (at, study_uid))
        await self.db.commit()
        async with self.db.execute("SELECT attempts FROM studies WHERE study_instance_uid = ?",
                                   (study_uid,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def unindexed(self, paths: Iterable[Path]) -> list[Path]:
        """Those of ``paths`` (spool files) that no indexed instance points to."""
        found = [str(p) for p in paths]
        known: set[str] = set()
        for i in range(0, len(found), 500):
            chunk = found[i : i + 500]
            async with self.db.execute(
                    f"SELECT path FROM instances WHERE path IN ({','.join('?' * len(chunk))})",
                    chunk) as cur:
                known.update(r[0] for r in await cur.fetchall())
        return [Path(p) for p in found if p not in known]

    # --- retention ----------------------------------------------------------------------------

    async def spool_bytes(self) -> int:
        """Bytes of the instances still in the spool."""
        async with self.db.execute(
                "SELECT coalesce(sum(size), 0) FROM instances WHERE removed_at IS NULL") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def purgeable_studies(self, finished_before: float | None, limit: int
                                ) -> list[tuple[str, list[Path], int]]:
        """Finished studies (result stored, no delivery pending) whose images are still
        spooled, oldest first: (study UID, files, bytes). ``finished_before``: only those
        finished before this Unix time (None: any, for the spool ceiling)."""
        done = ",".join(f"'{s}'" for s in DONE_STATES)
        cutoff = "AND s.finished_at <= ?" if finished_before is not None else ""
        params: list[Any] = [finished_before] if finished_before is not None else []
        async with self.db.execute(
            f"""SELECT s.study_instance_uid FROM studies s
                WHERE s.purged_at IS NULL AND s.finished_at IS NOT NULL
                  AND s.state IN ({done}) {cutoff}
                  AND NOT EXISTS (SELECT 1 FROM deliveries o JOIN results r
                                    ON r.id = o.result_id
                                  WHERE r.study_instance_uid = s.study_instance_uid
                                    AND o.state = 'pending')
                ORDER BY s.finished_at LIMIT ?""", (*params, limit)) as cur:
            studies = [r[0] for r in await cur.fetchall()]
        out = []
        for uid in studies:
            async with self.db.execute(
                    """SELECT path, size FROM instances
                       WHERE study_instance_uid = ? AND removed_at IS NULL""", (uid,)) as cur:
                rows = await cur.fetchall()
            out.append((uid, [Path(r[0]) for r in rows], sum(int(r[1]) for r in rows)))
        return out

    @_transaction
    async def mark_purged(self, study_uid: str, paths: Sequence[Path], at: str) -> bool:
        """Record that these files of a finished study were deleted (the spool keeps the
        study from being written meanwhile: :meth:`Spool.purging`); False when it was
        no longer finished, and then nothing is recorded."""
        cur = await self.db.execute(
            f"""UPDATE studies SET purged_at = ? WHERE study_instance_uid = ?
                AND state IN ({",".join(f"'{s}'" for s in DONE_STATES)})""", (at, study_uid))
        if cur.rowcount:
            await self.db.executemany(
                "UPDATE instances SET removed_at = ? WHERE path = ? AND removed_at IS NULL",
                [(at, str(p)) for p in paths])
        await self.db.commit()
        return bool(cur.rowcount)

    async def study(self, study_uid: str) -> StudyRow | None:
        async with self.db.execute(
            """SELECT study_instance_uid, state, reason, last_received_at, released_at,
                      ready_at,
                      (SELECT group_concat(DISTINCT calling_ae) FROM instances
                        WHERE study_instance_uid = s.study_instance_uid), attempts
               FROM studies s WHERE study_instance_uid = ?""",
            (study_uid,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        senders = tuple(sorted(set((row[6] or "").split(",")) - {""}))
        return StudyRow(row[0], row[1], row[2], row[3], row[4], row[5], senders, row[7])

    # --- selection decisions (select) ---------------------------------------------------------

    @_transaction
    async def record_decisions(self, study_uid: str, decision: StudyDecision, at: str) -> None:
        rows: list[tuple[str, str | None, int, str, str, str]] = [
            (study_uid, None, int(decision.candidate), decision.rule, decision.reason, at)
        ]
        rows += [_decision_row(study_uid, d, at) for d in decision.images]
        await self.db.execute("DELETE FROM decisions WHERE study_instance_uid = ?", (study_uid,))
        await self.db.executemany(
            """INSERT INTO decisions (study_instance_uid, sop_instance_uid, selected, rule,
                   reason, decided_at) VALUES (?, ?, ?, ?, ?, ?)""",
            rows,
        )
        await self.db.commit()

    # --- results (store) --------------------------------------------------------------------

    @_transaction
    async def store_result(self, document: dict[str, Any], state: str, reason: str = "",
                           exporters: Sequence[str] = (), now: float | None = None, *,
                           embeddings: StudyEmbeddings | None = None,
                           with_prior: WithPrior | None = None) -> list[str]:
        """Insert one result document as its study's current one (earlier ones stay, as
        history), move the study to ``state``, and queue one delivery per exporter named,
        all in one transaction: a result is never stored without its deliveries, nor a
        delivery without its result. Returns the delivery ids.

        ``embeddings``: its images' embeddings, stored with it. With ``prior_from`` set and
        ``with_prior`` given, the patient's prior scored image is looked up first, in the
        same transaction (so a result stored just before is seen), and when there is one
        the document stored is ``with_prior(document, prior)``."""
        patient_key = self.patient_key(document["patientId"])
        if (embeddings is not None and with_prior is not None and embeddings.images
                and embeddings.prior_from is not None and patient_key):
            prior = await self.prior_image(patient_key, embeddings.weights_sha256,
                                           before=embeddings.study_time,
                                           not_before=embeddings.prior_from,
                                           study_uid=document["studyInstanceUid"])
            if prior is not None:
                document = with_prior(document, prior)
        result_id = document["id"]
        await self.db.execute(
            "UPDATE results SET current = 0 WHERE study_instance_uid = ? AND current = 1",
            (document["studyInstanceUid"],),
        )
        await self.db.execute(
            f"""INSERT INTO results (id, study_instance_uid, patient_id, accession_number,
                   model_id, status, created_at, document, flags, current, created_utc,
                   patient_key)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, strftime('{UTC_FORMAT}', ?), ?)""",
            (
                result_id, document["studyInstanceUid"], document["patientId"],
                document["accessionNumber"], document["model"]["id"], document["status"],
                document["createdAt"], json.dumps(document, separators=(",", ":")),
                " ".join(document["pxsgate"].get("flags", [])), document["createdAt"],
                patient_key,
            ),
        )
        for i, e in enumerate(embeddings.images if embeddings is not None else ()):
            assert embeddings is not None
            cur = await self.db.execute(
                "INSERT INTO embedding_vectors (vector) VALUES (?)", (e.vector,))
            await self.db.execute(
                """INSERT INTO embeddings (result_id, sop_instance_uid, series_instance_uid,
                       study_instance_uid, patient_key, study_time, headline, score,
                       weights_sha256, anchors_sha256, dim, vector_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (result_id, e.sop_instance_uid, e.series_instance_uid,
                 document["studyInstanceUid"], patient_key, embeddings.study_time, int(i == 0),
                 e.score, embeddings.weights_sha256, embeddings.anchors_sha256, e.dim,
                 cur.lastrowid))
        ids = [delivery_id(result_id, name) for name in exporters]
        due = time.time() if now is None else now
        await self.db.executemany(
            """INSERT INTO deliveries (id, result_id, exporter, next_attempt_at, created_at,
                   updated_at) VALUES (?, ?, ?, ?, ?, ?)""",
            [(i, result_id, name, due, document["updatedAt"], document["updatedAt"])
             for i, name in zip(ids, exporters, strict=True)],
        )
        await self.db.execute(
            # A study re-opened by a late instance meanwhile stays 'receiving' (and keeps
            # its deadline): it is processed again.
            """UPDATE studies SET state = ?, outcome = ?, reason = ?, updated_at = ?,
                   deadline = NULL, finished_at = ?
               WHERE study_instance_uid = ? AND state IN ('ready', 'selected', 'inferring')""",
            (state, document["status"], reason, document["updatedAt"], due,
             document["studyInstanceUid"]),
        )
        self._failpoints.hit("before-result-commit")
        await self.db.commit()
        self._failpoints.hit("after-result-commit")
        return ids

    async def prior_image(self, patient_key: str, weights_sha256: str, *, before: str,
                          not_before: str = "", study_uid: str = "") -> PriorImage | None:
        """The patient's most recent prior scored image: the headline image of a current
        SUCCEEDED result under these weights whose study time is in [not_before, before)
        (not of ``study_uid``)."""
        async with self.db.execute(PRIOR_IMAGE_SQL, {
                "patient": patient_key, "weights": weights_sha256, "before": before,
                "not_before": not_before, "study": study_uid}) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return PriorImage(str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                          None if row[5] is None else str(row[5]), float(row[6]),
                          int(row[7]), bytes(row[8]))

    async def researcher_rows(self, since: str | None = None, model: str | None = None
                              ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """researcher_view (de-identified, each study's current result): its column names
        and rows, by patient hash then study date. ``since``: results created at or after
        it (ISO 8601 with offset); ``model``: only this model id."""
        clauses: list[str] = []
        params: list[str] = []
        if since is not None:
            clauses.append(f"scored_at_utc >= strftime('{UTC_FORMAT}', ?)")
            params.append(since)
        if model is not None:
            clauses.append("model_id = ?")
            params.append(model)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self.db.execute(
                f"""SELECT * FROM researcher_view {where}
                    ORDER BY patient_hash, study_date, scored_at_utc, result_id""",
                params) as cur:
            names = [c[0] for c in cur.description]
            rows = await cur.fetchall()
        return names, [tuple(r) for r in rows]

    async def scored_before(self, study_uid: str) -> bool:
        """Whether the study already has a SUCCEEDED result."""
        async with self.db.execute(
            """SELECT 1 FROM results WHERE study_instance_uid = ? AND status = 'SUCCEEDED'
               LIMIT 1""",
            (study_uid,),
        ) as cur:
            return await cur.fetchone() is not None

    async def results(self, flt: ResultFilter = ResultFilter()) -> list[dict[str, Any]]:
        where, params = _result_where(flt)
        sql = f"SELECT document FROM results {where} ORDER BY created_utc, rowid"
        if flt.limit is not None:  # the latest ``limit``, still oldest first
            sql = (f"SELECT document FROM (SELECT document, created_utc, rowid AS r "
                   f"FROM results {where} ORDER BY created_utc DESC, rowid DESC "
                   f"LIMIT {int(flt.limit)}) ORDER BY created_utc, r")
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [json.loads(r[0]) for r in rows]


    async def result(self, result_id: str) -> dict[str, Any] | None:
        async with self.db.execute("SELECT document FROM results WHERE id = ?",
                                   (result_id,)) as cur:
            row = await cur.fetchone()
        return json.loads(row[0]) if row else None

    async def instance_paths(self, sop_instance_uids: Iterable[str]) -> dict[str, Path]:
        uids = list(sop_instance_uids)
        marks = ",".join("?" * len(uids))
        async with self.db.execute(
                f"SELECT sop_instance_uid, path FROM instances "
                f"WHERE sop_instance_uid IN ({marks})", uids) as cur:
            rows = await cur.fetchall()
        return {r[0]: Path(r[1]) for r in rows}

    async def study_detail(self, study_uid: str) -> dict[str, Any] | None:
        """Everything known about one study: its state, instances with their senders,
        selection decisions, current result, earlier results and deliveries."""
        row = await self._one_dict(
            """SELECT study_instance_uid, state, outcome, reason, attempts, first_received_at,
                      last_received_at, released_at, ready_at, updated_at, purged_at
               FROM studies WHERE study_instance_uid = ?""", (study_uid,))
        if row is None:
            return None
        instances = await self._dicts(
            """SELECT sop_instance_uid, series_instance_uid, sop_class_uid,
                      transfer_syntax_uid, size, calling_ae, called_ae, peer_address,
                      association_id, received_at, receive_count, removed_at, kind
               FROM instances WHERE study_instance_uid = ? ORDER BY received_at""",
            (study_uid,))
        receptions = await self._dicts(
            """SELECT sop_instance_uid, association_id, calling_ae, called_ae, peer_address,
                      received_at, outcome
               FROM receptions WHERE study_instance_uid = ? ORDER BY received_at, rowid""",
            (study_uid,))
        decisions = await self._dicts(
            """SELECT sop_instance_uid, selected, rule, reason, decided_at FROM decisions
               WHERE study_instance_uid = ? ORDER BY rowid""", (study_uid,))
        for d in decisions:
            d["selected"] = bool(d["selected"])
        results = await self._dicts(
            """SELECT id, status, created_at, current, flags FROM results
               WHERE study_instance_uid = ? ORDER BY created_utc, rowid""", (study_uid,))
        current = next((r["id"] for r in results if r["current"]), None)
        deliveries = await self._dicts(
            """SELECT o.id, o.result_id, o.exporter, o.state, o.attempts, o.last_error,
                      o.created_at, o.updated_at, o.delivered_at
               FROM deliveries o JOIN results r ON r.id = o.result_id
               WHERE r.study_instance_uid = ? ORDER BY o.created_at, o.exporter""",
            (study_uid,))
        return {
            "study": row,
            "result": await self.result(current) if current else None,
            "history": [{k: r[k] for k in ("id", "status", "created_at", "flags")}
                        for r in results if not r["current"]],
            "instances": instances,
            "receptions": receptions,
            "decisions": decisions,
            "deliveries": deliveries,
        }

    async def _dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async with self.db.execute(sql, params) as cur:
            names = [c[0] for c in cur.description]
            rows = await cur.fetchall()
        return [dict(zip(names, r, strict=True)) for r in rows]

    async def _one_dict(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self._dicts(sql, params)
        return rows[0] if rows else None

    # --- the outbox (export) ----------------------------------------------------------------

    async def due_deliveries(self, now: float, exporters: Sequence[str], limit: int,
                             skip: Iterable[str] = ()) -> list[Delivery]:
        """Pending deliveries for these exporters whose next attempt is due, oldest first."""
        if not exporters:
            return []
        skipped = list(skip)
        names = ",".join("?" * len(exporters))
        not_in = f"AND id NOT IN ({','.join('?' * len(skipped))})" if skipped else ""
        async with self.db.execute(
            f"""SELECT {_DELIVERY_COLUMNS} FROM deliveries
                WHERE state = 'pending' AND next_attempt_at <= ? AND exporter IN ({names})
                {not_in} ORDER BY next_attempt_at, created_at LIMIT ?""",
            (now, *exporters, *skipped, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Delivery(*r) for r in rows]

    async def next_delivery_time(self, exporters: Sequence[str]) -> float | None:
        if not exporters:
            return None
        names = ",".join("?" * len(exporters))
        async with self.db.execute(
            f"""SELECT min(next_attempt_at) FROM deliveries
                WHERE state = 'pending' AND exporter IN ({names})""", exporters) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @_transaction
    async def delivery_done(self, delivery: str, at: str) -> None:
        await self.db.execute(
            """UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                   last_error = '', updated_at = ?, delivered_at = ?
               WHERE id = ? AND state = 'pending'""", (at, at, delivery))
        await self._settle_study(delivery)
        await self.db.commit()

    async def _settle_study(self, delivery: str) -> None:
        """When a study's last pending delivery settles: ``exported`` if every delivery of
        its current result arrived (a FAILED study stays ``failed``), and its retention
        starts counting now."""
        await self.db.execute(
            """UPDATE studies SET finished_at = ?,
                   state = CASE WHEN state = 'stored' AND NOT EXISTS (
                       SELECT 1 FROM deliveries o JOIN results r ON r.id = o.result_id
                        WHERE r.study_instance_uid = studies.study_instance_uid
                          AND r.current = 1 AND o.state != 'delivered')
                       THEN 'exported' ELSE state END
               WHERE study_instance_uid = (SELECT r.study_instance_uid FROM deliveries o
                                           JOIN results r ON r.id = o.result_id
                                           WHERE o.id = ?)
                 AND state IN ('stored', 'failed')
                 AND NOT EXISTS (SELECT 1 FROM deliveries o JOIN results r
                                   ON r.id = o.result_id
                                 WHERE r.study_instance_uid = studies.study_instance_uid
                                   AND o.state = 'pending')""", (time.time(), delivery))

    @_transaction
    async def delivery_failed(self, delivery: str, error: str, at: str,
                              next_attempt_at: float | None) -> None:
        """Count a failed try: again at ``next_attempt_at``, or dead-lettered (None)."""
        state = "pending" if next_attempt_at is not None else "dead"
        await self.db.execute(
            """UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?,
                   updated_at = ?, next_attempt_at = coalesce(?, next_attempt_at)
               WHERE id = ? AND state = 'pending'""",
            (state, error[:500], at, next_attempt_at, delivery))
        if next_attempt_at is None:
            await self._settle_study(delivery)
        await self.db.commit()

    async def deliveries(self, state: str | None = None, exporter: str | None = None,
                         ids: Sequence[str] = (), limit: int | None = None) -> list[Delivery]:
        clauses, params = _delivery_where(state, exporter, ids)
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries {clauses} ORDER BY created_at, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [Delivery(*r) for r in rows]

    @_transaction
    async def retry_deliveries(self, at: str, now: float, state: str | None = None,
                               exporter: str | None = None, ids: Sequence[str] = ()) -> int:
        """Make deliveries due now with a fresh count of tries (`pxsgate outbox retry`).
        Delivered ones are sent again only when named by id."""
        clauses, params = _delivery_where(state, exporter, ids)
        if not ids:
            clauses += (" AND " if clauses else "WHERE ") + "state != 'delivered'"
        cur = await self.db.execute(
            f"""UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,
                    updated_at = ? {clauses}""", (now, at, *params))
        await self.db.commit()
        return int(cur.rowcount)

    @_transaction
    async def probe_write(self, at: str) -> None:
        """Write and commit one small row: raises what any write would (a full disk, a
        database locked by another process past the busy timeout, a read-only file)."""
        await self.db.execute("INSERT OR REPLACE INTO health_probe (id, at) VALUES (1, ?)",
                              (at,))
        await self.db.commit()

    async def delivery_counts(self) -> dict[str, int]:
        async with self.db.execute(
                "SELECT state, count(*) FROM deliveries GROUP BY state") as cur:
            rows = await cur.fetchall()
        return {str(r[0]): int(r[1]) for r in rows}


_DELIVERY_COLUMNS = """id, result_id, exporter, state, attempts, next_attempt_at, last_error,
    created_at, updated_at, delivered_at"""


def _delivery_where(state: str | None, exporter: str | None, ids: Sequence[str]
                    ) -> tuple[str, list[str]]:
    clauses: list[str] = []
    params: list[str] = []
    if state is not None:
        clauses.append("state = ?")
        params.append(state)
    if exporter is not None:
        clauses.append("exporter = ?")
        params.append(exporter)
    if ids:
        clauses.append(f"id IN ({','.join('?' * len(ids))})")
        params += list(ids)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _decision_row(
    study_uid: str, d: ImageDecision, at: str
) -> tuple[str, str | None, int, str, str, str]:
    return (study_uid, d.sop_instance_uid, int(d.selected), d.rule, d.reason, at)


def _result_where(flt: ResultFilter) -> tuple[str, Sequence[str]]:
    clauses: list[str] = []
    params: list[str] = []
    for column, value in (
        ("study_instance_uid", flt.study_uid),
        ("patient_id", flt.patient_id),
        ("accession_number", flt.accession),
        ("status", flt.status),
        ("model_id", flt.model),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if flt.since is not None:
        clauses.append(f"created_utc >= strftime('{UTC_FORMAT}', ?)")
        params.append(flt.since)
    if flt.flagged:
        clauses.append("flags != ''")
    if not flt.history:
        clauses.append("current = 1")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
