"""Priors fetched from the PACS (issue 20): each one's embedded AP image, kept apart from
results (a fetched prior is never a study scored: no result, no delivery), and the results
that ``pxsgate priors backfill`` can give a change they lack."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pxsgate.document import CHANGE_CODE, ResultDocument
from pxsgate.records import Status
from pxsgate.store.connection import StoreBase
from pxsgate.store.connection import transaction as writes
from pxsgate.store.outbox import queue_deliveries
from pxsgate.store.results import ImageEmbedding, insert_result


@dataclass(frozen=True)
class FetchedPrior:
    """A prior study's AP image as fetched and embedded: what the store keeps of it."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_time: str  # pxsgate.change.study_time_key
    study_datetime: str | None  # StudyDate/StudyTime as ISO text, None without a date
    score: float
    weights_sha256: str
    anchors_sha256: str
    dim: int
    vector: bytes  # float16 little-endian (pxsgate.change.pack)
    source: str  # priors.source's label
    fetched_at: str


@dataclass(frozen=True)
class ResultWithoutChange:
    """A current SUCCEEDED result whose headline image was never compared with a prior,
    with that image's embedding as stored."""

    document: ResultDocument
    headline: ImageEmbedding
    study_time: str
    weights_sha256: str
    anchors_sha256: str


class PriorsMixin(StoreBase):
    """Fetched priors, and what backfill reads."""

    @writes
    async def add_fetched_priors(self, priors: Iterable[FetchedPrior]) -> int:
        """Keep fetched priors (one per study and weights: a study fetched again keeps its
        first embedding). Returns how many were new."""
        added = 0
        for p in priors:
            patient_key = self.patient_key(p.patient_id)
            if not patient_key:
                continue  # no PatientID: it could never be found as anyone's prior
            async with self.db.execute(
                    """SELECT 1 FROM fetched_priors
                       WHERE study_instance_uid = ? AND weights_sha256 = ?""",
                    (p.study_instance_uid, p.weights_sha256)) as cur:
                if await cur.fetchone() is not None:
                    continue
            async with self.db.execute("INSERT INTO embedding_vectors (vector) VALUES (?) "
                                       "RETURNING id", (p.vector,)) as cur:
                vector_id = (await cur.fetchone())[0]
            await self.db.execute(
                """INSERT INTO fetched_priors (study_instance_uid, weights_sha256,
                       sop_instance_uid, series_instance_uid, patient_key, study_time,
                       study_datetime, score, anchors_sha256, dim, vector_id, source,
                       fetched_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (p.study_instance_uid, p.weights_sha256, p.sop_instance_uid,
                 p.series_instance_uid, patient_key, p.study_time, p.study_datetime, p.score,
                 p.anchors_sha256, p.dim, vector_id, p.source, p.fetched_at))
            added += 1
        await self.db.commit()
        return added

    async def known_prior_studies(self, patient_id: str, weights_sha256: str) -> set[str]:
        """The patient's studies that already have an embedding under these weights
        (fetched, or scored by pxsgate): a lookup need not retrieve them again."""
        patient_key = self.patient_key(patient_id)
        async with self.db.execute(
                """SELECT study_instance_uid FROM fetched_priors
                   WHERE patient_key = :p AND weights_sha256 = :w
                   UNION
                   SELECT study_instance_uid FROM embeddings
                   WHERE patient_key = :p AND weights_sha256 = :w AND headline = 1""",
                {"p": patient_key, "w": weights_sha256}) as cur:
            return {str(r[0]) for r in await cur.fetchall()}

    async def fetched_prior_count(self) -> int:
        async with self.db.execute("SELECT count(*) FROM fetched_priors") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def results_without_change(self, weights_sha256: str, since: str | None = None
                                     ) -> list[ResultWithoutChange]:
        """Current SUCCEEDED results under these weights, with a PatientID and a headline
        embedding, that carry no change entry; oldest first. ``since``: created at or
        after it (ISO 8601 with offset)."""
        clause = "AND r.created_utc >= strftime('%Y-%m-%dT%H:%M:%fZ', :since)" if since else ""
        async with self.db.execute(
                f"""SELECT r.document, e.sop_instance_uid, e.series_instance_uid, e.score,
                           e.dim, v.vector, e.study_time, e.anchors_sha256
                    FROM results r
                    JOIN embeddings e ON e.result_id = r.id AND e.headline = 1
                    JOIN embedding_vectors v ON v.id = e.vector_id
                    WHERE r.current = 1 AND r.status = '{Status.SUCCEEDED}'
                      AND r.patient_key != '' AND e.weights_sha256 = :w {clause}
                    ORDER BY r.created_utc, r.rowid""",
                {"w": weights_sha256, "since": since}) as cur:
            rows = await cur.fetchall()
        out = []
        for text, sop, series, score, dim, vector, study_time, anchors in rows:
            data = self.document(text)
            if any(r.get("code") == CHANGE_CODE for r in data.get("results") or ()):
                continue
            out.append(ResultWithoutChange(
                ResultDocument.from_json(data),
                ImageEmbedding(str(sop), str(series), float(score), int(dim), bytes(vector)),
                str(study_time), weights_sha256, str(anchors)))
        return out

    @writes
    async def add_backfilled_result(self, previous_id: str, document: ResultDocument,
                                    exporters: Sequence[str] = ()) -> bool:
        """``document`` (a current result with the change it lacked) as its study's
        current result in place of ``previous_id``, which stays as history; its images'
        embeddings carried over, and one delivery per exporter named queued. False, with
        nothing written, when ``previous_id`` is no longer current (rescored
        meanwhile)."""
        cur = await self.db.execute(
            "UPDATE results SET current = 0 WHERE id = ? AND current = 1", (previous_id,))
        if cur.rowcount != 1:
            await self.db.rollback()
            return False
        await insert_result(self.db, document, self.patient_key(document.patient_id))
        await self.db.execute(
            """INSERT INTO embeddings (result_id, sop_instance_uid, series_instance_uid,
                   study_instance_uid, patient_key, study_time, headline, score,
                   weights_sha256, anchors_sha256, dim, vector_id)
               SELECT ?, sop_instance_uid, series_instance_uid, study_instance_uid,
                      patient_key, study_time, headline, score, weights_sha256,
                      anchors_sha256, dim, vector_id
               FROM embeddings WHERE result_id = ?""", (document.id, previous_id))
        await queue_deliveries(self.db, document.id, exporters, time.time(),
                               document.updated_at)
        await self.db.commit()
        return True
