"""The reports' reads: what ``pxsgate status`` shows (tools/report.py) and the scored
studies ``pxsgate evaluate`` joins with outcomes (tools/evaluate.py). Read-only; the
tools that call them hold no SQL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from pxsgate.errors import PxsgateError
from pxsgate.records import UNFINISHED_STATES, DeliveryState, Status
from pxsgate.store.access import REJECTED_STUDIES_SQL
from pxsgate.store.connection import StoreBase, sql_in
from pxsgate.store.jsonpaths import (
    ANCHORS_SHA256,
    ERROR_MESSAGE,
    EXIT_CODE,
    HEADLINE_VALUE,
    PXS_SCORE,
    SELECTION_RULE,
    STUDY_DATETIME,
    WEIGHTS_SHA256,
    doc,
    stage,
)
from pxsgate.store.results import UTC_FORMAT

Row = tuple[Any, ...]


class QueriesMixin(StoreBase):
    """The reads of ``pxsgate status``. Times are compared in the store's created_utc
    format (UTC_FORMAT: comparable as text)."""

    async def results_by_status(self, since_utc: str) -> dict[str, int]:
        """Results created at or after ``since_utc``, counted by status."""
        async with self.db.execute(
                "SELECT status, count(*) FROM results WHERE created_utc >= ? GROUP BY status",
                (since_utc,)) as cur:
            return {str(r[0]): int(r[1]) for r in await cur.fetchall()}

    async def last_results(self, limit: int = 5) -> list[Row]:
        """The latest results, newest first: (created_at, study UID, status, headline
        score, study rule, flags, exitCode)."""
        async with self.db.execute(
                f"""SELECT r.created_at, r.study_instance_uid, r.status,
                          {doc(HEADLINE_VALUE)}, {doc(SELECTION_RULE)}, r.flags,
                          {doc(EXIT_CODE)}
                   FROM results r ORDER BY r.created_utc DESC, r.rowid DESC LIMIT ?""",
                (limit,)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def failed_results(self, since_utc: str) -> list[Row]:
        """FAILED results created at or after ``since_utc``, newest first: (created_at,
        study UID, exitCode, errorMessage)."""
        async with self.db.execute(
                f"""SELECT r.created_at, r.study_instance_uid, {doc(EXIT_CODE)},
                          {doc(ERROR_MESSAGE)}
                   FROM results r WHERE r.status = '{Status.FAILED}' AND r.created_utc >= ?
                   ORDER BY r.created_utc DESC, r.rowid DESC""", (since_utc,)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def dead_deliveries(self, since_utc: str, limit: int = 5) -> list[Row]:
        """The latest dead-lettered deliveries: (id, exporter, attempts, last error,
        updated_at, study UID, whether it died at or after ``since_utc``)."""
        async with self.db.execute(
                f"""SELECT o.id, o.exporter, o.attempts, o.last_error, o.updated_at,
                           r.study_instance_uid,
                           strftime('{UTC_FORMAT}', o.updated_at) >= ?
                    FROM deliveries o JOIN results r ON r.id = o.result_id
                    WHERE o.state = '{DeliveryState.DEAD}'
                    ORDER BY o.updated_at DESC, o.id LIMIT ?""",
                (since_utc, limit)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def dead_deliveries_since(self, since_utc: str) -> int:
        """Deliveries dead-lettered at or after ``since_utc``."""
        async with self.db.execute(
                f"""SELECT count(*) FROM deliveries
                   WHERE state = '{DeliveryState.DEAD}'
                     AND strftime('{UTC_FORMAT}', updated_at) >= ?""",
                (since_utc,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def unfinished_counts(self) -> dict[str, int]:
        """Studies with unfinished jobs, by state (every one of UNFINISHED_STATES)."""
        async with self.db.execute(
                f"""SELECT state, count(*) FROM studies
                    WHERE state IN ({sql_in(UNFINISHED_STATES)}) GROUP BY state""") as cur:
            found = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
        return {str(state): found.get(state, 0) for state in UNFINISHED_STATES}

    async def unfinished_studies(self, limit: int = 100) -> list[Row]:
        """Studies with unfinished jobs, the latest received first: (study UID, state,
        first_received_at, last_received_at, released_at, ready_at)."""
        async with self.db.execute(
                f"""SELECT study_instance_uid, state, first_received_at, last_received_at,
                           released_at, ready_at FROM studies
                    WHERE state IN ({sql_in(UNFINISHED_STATES)})
                    ORDER BY last_received_at DESC LIMIT ?""", (limit,)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def trend_rows(self, since_utc: str) -> list[Row]:
        """Each study's current result created at or after ``since_utc``, oldest first:
        (created_utc, status, headline score or None, seconds from its last instance
        received to its result stored or None). Aggregates only: no identifiers."""
        async with self.db.execute(_TREND_SQL, (since_utc,)) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def headline_scores(self, since_utc: str) -> list[tuple[str, float]]:
        """The headline scores of the current SUCCEEDED results created at or after
        ``since_utc``: (created_utc, score), oldest first (the drift alarm's samples)."""
        async with self.db.execute(_SCORES_SQL, (since_utc,)) as cur:
            return [(str(r[0]), float(r[1])) for r in await cur.fetchall()]


# The Trends page's one read (results_created_utc: a range scan of the window).
_TREND_SQL = f"""
    SELECT r.created_utc, r.status, {PXS_SCORE},
           (julianday({doc(stage('stored'))}) - julianday({doc(stage('received'))})) * 86400
    FROM results r
    WHERE r.created_utc >= ? AND r.current = 1
    ORDER BY r.created_utc"""

_SCORES_SQL = f"""
    SELECT r.created_utc, {PXS_SCORE}
    FROM results r
    WHERE r.created_utc >= ? AND r.current = 1 AND r.status = '{Status.SUCCEEDED}'
      AND {doc(HEADLINE_VALUE)} IS NOT NULL
    ORDER BY r.created_utc"""

# Each study's current SUCCEEDED result with a score: (study UID, accession number, score,
# studyDateTime, model id, weights SHA-256, anchors SHA-256), oldest first.
_SCORED_STUDIES_SQL = f"""
    SELECT r.study_instance_uid, r.accession_number, {PXS_SCORE},
           {doc(STUDY_DATETIME)}, r.model_id,
           coalesce({doc(WEIGHTS_SHA256)}, ''), coalesce({doc(ANCHORS_SHA256)}, '')
    FROM results r
    WHERE r.current = 1 AND r.status = '{Status.SUCCEEDED}'
      AND {doc(HEADLINE_VALUE)} IS NOT NULL
    ORDER BY r.created_utc, r.rowid"""


def _scored_sql(exclude_rejected: bool) -> str:
    if not exclude_rejected:
        return _SCORED_STUDIES_SQL
    return _SCORED_STUDIES_SQL.replace("ORDER BY", f"AND r.study_instance_uid NOT IN "
                                       f"({REJECTED_STUDIES_SQL})\n    ORDER BY")


async def _read_shared(store: QueriesMixin, exclude_rejected: bool) -> list[Row]:
    await store.open()
    try:
        async with store.db.execute(_scored_sql(exclude_rejected)) as cur:
            return [tuple(r) for r in await cur.fetchall()]
    finally:
        await store.close()


def read_scored_studies(db: Path | QueriesMixin, exclude_rejected: bool = False
                        ) -> list[Row]:
    """Each study's current SUCCEEDED result (rows of :data:`_SCORED_STUDIES_SQL`), read
    from the store's file without writing: no migration, and ``query_only`` refuses any
    change (WAL readers never block the running service).

    Not ``mode=ro``: a read-only connection to a WAL store whose service is stopped
    creates the -wal and -shm files and cannot remove them, so run as root it would leave
    files that the service's user cannot open at its next start. This connection, like the
    other one-shot commands', removes them when it closes; ``mode=rw`` never creates the
    store, and falls back to reading only where the file is not writable.

    ``exclude_rejected``: without the studies whose latest review rejects them
    (access.REJECTED_STUDIES_SQL)."""
    if not isinstance(db, Path):  # a PostgreSQL store (not open): its own connection
        return asyncio.run(_read_shared(db, exclude_rejected))
    uri = f"{db.resolve().as_uri()}?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise PxsgateError(f"cannot open the store {db}: {exc}") from exc
    try:
        conn.execute("PRAGMA query_only = ON")
        return [tuple(r) for r in conn.execute(_scored_sql(exclude_rejected)).fetchall()]
    except sqlite3.Error as exc:
        raise PxsgateError(f"cannot read results from the store {db}: {exc}") from exc
    finally:
        conn.close()
