"""Results (select -> infer -> store): the selection decisions, each result document with
its images' embeddings and its deliveries, the patient's prior scored image (change over
time), and the reads of results: by filter, researcher_view, one study in full.

Result documents are stored as JSON text with the fields people search on copied into
indexed columns (the paper's SQL Server design: JSON plus indexes on inference id,
PatientID and StudyInstanceUID).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pxsgate.document import ResultDocument
from pxsgate.records import ImageDecision, PriorImage, Status, StudyDecision, StudyState
from pxsgate.store.access import REJECTED_STUDIES_SQL
from pxsgate.store.connection import StoreBase
from pxsgate.store.connection import transaction as writes
from pxsgate.store.db import Database
from pxsgate.store.jobs import moves_to
from pxsgate.store.jsonpaths import STUDY_DATETIME, doc
from pxsgate.store.outbox import queue_deliveries

UTC_FORMAT = "%Y-%m-%dT%H:%M:%fZ"  # SQLite strftime: created_utc, comparable as text

# The patient's prior scored image (pxsgate.change): served by embeddings_prior, newest
# first from the top of the range, each candidate's result checked by its primary key;
# only the one found has its vector read.
PRIOR_IMAGE_SQL = f"""
    SELECT e.result_id, e.study_instance_uid, e.series_instance_uid, e.sop_instance_uid,
           e.study_time, {doc(STUDY_DATETIME)}, e.score,
           e.dim, (SELECT v.vector FROM embedding_vectors v WHERE v.id = e.vector_id)
    FROM embeddings e CROSS JOIN results r
    WHERE e.patient_key = :patient AND e.weights_sha256 = :weights AND e.headline = 1
      AND e.study_time < :before AND e.study_time >= :not_before
      AND e.study_instance_uid != :study
      AND r.id = e.result_id AND r.current = 1 AND r.status = '{Status.SUCCEEDED}'
    ORDER BY e.study_time DESC
    LIMIT 1
"""

# A prior fetched from the PACS (store/priors.py), served by fetched_priors_patient.
FETCHED_PRIOR_SQL = """
    SELECT '', f.study_instance_uid, f.series_instance_uid, f.sop_instance_uid,
           f.study_time, f.study_datetime, f.score,
           f.dim, (SELECT v.vector FROM embedding_vectors v WHERE v.id = f.vector_id)
    FROM fetched_priors f
    WHERE f.patient_key = :patient AND f.weights_sha256 = :weights
      AND f.study_time < :before AND f.study_time >= :not_before
      AND f.study_instance_uid != :study
    ORDER BY f.study_time DESC
    LIMIT 1
"""

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


async def insert_result(db: Database, document: ResultDocument,
                        patient_key: str) -> None:
    """The document as its study's current result (the caller has made the one before it
    not current, in the same transaction)."""
    await db.execute(
        f"""INSERT INTO results (id, study_instance_uid, patient_id, accession_number,
               model_id, status, created_at, document, flags, current, created_utc,
               patient_key)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, strftime('{UTC_FORMAT}', ?), ?)""",
        (document.id, document.study_instance_uid, document.patient_id,
         document.accession_number, document.model.id, str(document.status),
         document.created_at, json.dumps(document.to_json(), separators=(",", ":")),
         " ".join(document.pxsgate.flags), document.created_at, patient_key))


class ResultTransaction:
    """What a study's code does inside :meth:`ResultsMixin.transaction`: read the patient's
    prior scored image, then add the result. Nothing is committed until the block ends."""

    def __init__(self, store: ResultsMixin) -> None:
        self._store = store

    async def prior_image(self, document: ResultDocument,
                          embeddings: StudyEmbeddings | None) -> PriorImage | None:
        """The patient's prior scored image for change over time; None when nothing was
        scored, change detection is off, the patient has no ID, or there is no prior."""
        return await self._store.prior_for(document.patient_id,
                                           document.study_instance_uid, embeddings)

    async def add_result(self, document: ResultDocument, state: StudyState,
                         reason: str = "", exporters: Sequence[str] = (),
                         now: float | None = None, *,
                         embeddings: StudyEmbeddings | None = None) -> list[str]:
        """Insert one result document as its study's current one (earlier ones stay, as
        history), with its images' ``embeddings``, move the study to ``state``, and queue
        one delivery per exporter named: a result is never stored without its deliveries,
        nor a delivery without its result. Returns the delivery ids."""
        # A study re-opened by a late instance meanwhile stays 'receiving' (and keeps its
        # deadline): it is processed again.
        guard = moves_to(state)
        db = self._store.db
        patient_key = self._store.patient_key(document.patient_id)
        study_uid = document.study_instance_uid
        await db.execute(
            "UPDATE results SET current = 0 WHERE study_instance_uid = ? AND current = 1",
            (study_uid,))
        await insert_result(db, document, patient_key)
        for i, e in enumerate(embeddings.images if embeddings is not None else ()):
            assert embeddings is not None
            async with db.execute("INSERT INTO embedding_vectors (vector) VALUES (?) "
                                  "RETURNING id", (e.vector,)) as cur:
                vector_id = (await cur.fetchone())[0]
            await db.execute(
                """INSERT INTO embeddings (result_id, sop_instance_uid, series_instance_uid,
                       study_instance_uid, patient_key, study_time, headline, score,
                       weights_sha256, anchors_sha256, dim, vector_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (document.id, e.sop_instance_uid, e.series_instance_uid, study_uid,
                 patient_key, embeddings.study_time, int(i == 0), e.score,
                 embeddings.weights_sha256, embeddings.anchors_sha256, e.dim, vector_id))
        due = time.time() if now is None else now
        ids = await queue_deliveries(db, document.id, exporters, due, document.updated_at)
        await db.execute(
            f"""UPDATE studies SET state = ?, outcome = ?, reason = ?, updated_at = ?,
                   deadline = NULL, finished_at = ?
               WHERE study_instance_uid = ? AND {guard}""",
            (str(state), str(document.status), reason, document.updated_at, due, study_uid))
        return ids


class ResultsMixin(StoreBase):
    """Selection decisions, results and their embeddings."""

    @writes
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

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[ResultTransaction]:
        """One result's transaction: ``async with store.transaction() as tx:``, then read
        the patient's prior and add the result; it commits at the end of the block (and
        rolls back what a failure inside left). Writers take turns, so a prior read here
        sees a result of the same patient stored just before."""
        async with self.writing():
            yield ResultTransaction(self)
            self._failpoints.hit("before-result-commit")
            await self.db.commit()
        self._failpoints.hit("after-result-commit")

    async def store_result(self, document: ResultDocument, state: StudyState,
                           reason: str = "", exporters: Sequence[str] = (),
                           now: float | None = None, *,
                           embeddings: StudyEmbeddings | None = None) -> list[str]:
        """:meth:`ResultTransaction.add_result` in a transaction of its own."""
        async with self.transaction() as tx:
            return await tx.add_result(document, state, reason, exporters, now,
                                       embeddings=embeddings)

    async def prior_for(self, patient_id: str, study_uid: str,
                        embeddings: StudyEmbeddings | None) -> PriorImage | None:
        """The prior of a study's scored images (``embeddings``) for change over time;
        None when nothing was scored, change detection is off, the patient has no ID, or
        there is no prior."""
        patient_key = self.patient_key(patient_id)
        if (embeddings is None or not embeddings.images or embeddings.prior_from is None
                or not patient_key):
            return None
        return await self.prior_image(
            patient_key, embeddings.weights_sha256, before=embeddings.study_time,
            not_before=embeddings.prior_from, study_uid=study_uid)

    async def prior_image(self, patient_key: str, weights_sha256: str, *, before: str,
                          not_before: str = "", study_uid: str = "") -> PriorImage | None:
        """The patient's most recent prior image: the headline image of a current
        SUCCEEDED result under these weights whose study time is in [not_before, before)
        (not of ``study_uid``), or a prior fetched from the PACS in that range, whichever is
        more recent (a scored one at the same time)."""
        params = {"patient": patient_key, "weights": weights_sha256, "before": before,
                  "not_before": not_before, "study": study_uid}
        found: list[PriorImage] = []
        for sql, source in ((PRIOR_IMAGE_SQL, "pxsgate"), (FETCHED_PRIOR_SQL, "pacs")):
            async with self.db.execute(sql, params) as cur:
                row = await cur.fetchone()
            if row is not None:
                found.append(PriorImage(
                    str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                    None if row[5] is None else str(row[5]), float(row[6]), int(row[7]),
                    bytes(row[8]), source=source))
        if not found:
            return None
        return max(found, key=lambda p: (p.study_time, p.source == "pxsgate"))

    async def researcher_rows(self, since: str | None = None, model: str | None = None,
                              exclude_rejected: bool = False
                              ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """researcher_view (de-identified, each study's current result): its column names
        and rows, by patient hash then study date. ``since``: results created at or after
        it (ISO 8601 with offset); ``model``: only this model id; ``exclude_rejected``:
        without the studies whose latest review rejects them (REJECTED_STUDIES_SQL)."""
        clauses: list[str] = []
        params: list[str] = []
        if since is not None:
            clauses.append(f"scored_at_utc >= strftime('{UTC_FORMAT}', ?)")
            params.append(since)
        if model is not None:
            clauses.append("model_id = ?")
            params.append(model)
        if exclude_rejected:
            clauses.append(f"""result_id NOT IN (SELECT x.id FROM results x
                WHERE x.study_instance_uid IN ({REJECTED_STUDIES_SQL}))""")
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
            f"""SELECT 1 FROM results WHERE study_instance_uid = ?
                  AND status = '{Status.SUCCEEDED}' LIMIT 1""",
            (study_uid,),
        ) as cur:
            return await cur.fetchone() is not None

    async def results(self, flt: ResultFilter = ResultFilter()) -> list[dict[str, Any]]:
        where, params = _result_where(flt)
        sql = f"SELECT document FROM results {where} ORDER BY created_utc, rowid"
        if flt.limit is not None:  # the latest ``limit``, still oldest first
            sql = (f"SELECT document FROM (SELECT document, created_utc, rowid AS r "
                   f"FROM results {where} ORDER BY created_utc DESC, rowid DESC "
                   f"LIMIT {int(flt.limit)}) AS latest ORDER BY created_utc, r")
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [self.document(r[0]) for r in rows]

    async def is_current(self, result_id: str) -> bool:
        """Whether the result is its study's current one (not superseded by a rescore)."""
        async with self.db.execute("SELECT current FROM results WHERE id = ?",
                                   (result_id,)) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])

    async def result(self, result_id: str) -> dict[str, Any] | None:
        async with self.db.execute("SELECT document FROM results WHERE id = ?",
                                   (result_id,)) as cur:
            row = await cur.fetchone()
        return self.document(row[0]) if row else None

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
