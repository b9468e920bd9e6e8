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

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from pxsgate.errors import StoreError
from pxsgate.messages import ImageDecision, ReceivedInstance, StoredInstance, StudyDecision

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
)

InstanceOutcome = Literal["new", "changed", "duplicate"]


@dataclass(frozen=True)
class ResultFilter:
    study_uid: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    status: str | None = None
    flagged: bool = False
    history: bool = False  # every result, not only each study's current one
    limit: int | None = None


@dataclass(frozen=True)
class PendingStudy:
    """A study not yet handed on when the service stopped, and when it should be."""

    study_instance_uid: str
    state: str  # receiving | ready
    deadline: float | None  # Unix time
    settle_seconds: float | None


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    state: str
    reason: str
    released_at: str | None
    ready_at: str | None


class Store:
    """Async access to the SQLite file. One connection; aiosqlite serialises its use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

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

    # --- instances (receive -> store) ----------------------------------------------------

    async def record_instance(self, inst: ReceivedInstance, deadline: float,
                              settle_seconds: float) -> InstanceOutcome:
        """Index a durable instance. A re-send is stored once and counted: ``duplicate`` when
        its bytes are the ones already held (the study is left as it is), else ``changed``.
        ``deadline`` (Unix time) is when its study is ready if nothing more arrives."""
        async with self.db.execute(
            "SELECT sha256, study_instance_uid FROM instances WHERE sop_instance_uid = ?",
            (inst.sop_instance_uid,),
        ) as cur:
            row = await cur.fetchone()
        if row is not None and tuple(row) == (inst.sha256, inst.study_instance_uid):
            await self.db.execute(
                """UPDATE instances SET receive_count = receive_count + 1, calling_ae = ?,
                       called_ae = ?, peer_address = ?, association_id = ?, received_at = ?
                   WHERE sop_instance_uid = ?""",
                (inst.calling_ae, inst.called_ae, inst.peer_address, inst.association_id,
                 inst.received_at,
                 inst.sop_instance_uid),
            )
            await self.db.commit()
            return "duplicate"
        await self.db.execute(
            """
            INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid,
                sop_class_uid, transfer_syntax_uid, path, size, sha256, calling_ae,
                called_ae, peer_address, association_id, received_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (sop_instance_uid) DO UPDATE SET
                study_instance_uid = excluded.study_instance_uid,
                series_instance_uid = excluded.series_instance_uid,
                sop_class_uid = excluded.sop_class_uid,
                transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path,
                size = excluded.size, sha256 = excluded.sha256,
                calling_ae = excluded.calling_ae, called_ae = excluded.called_ae,
                peer_address = excluded.peer_address,
                association_id = excluded.association_id, received_at = excluded.received_at,
                receive_count = receive_count + 1
            """,
            (
                inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid,
                inst.sop_class_uid, inst.transfer_syntax_uid, str(inst.path), inst.size,
                inst.sha256, inst.calling_ae, inst.called_ae, inst.peer_address,
                inst.association_id, inst.received_at,
            ),
        )
        await self.db.execute(
            """
            INSERT INTO studies (study_instance_uid, state, first_received_at,
                last_received_at, updated_at, deadline, settle_seconds)
            VALUES (?, 'receiving', ?, ?, ?, ?, ?)
            ON CONFLICT (study_instance_uid) DO UPDATE SET
                state = 'receiving', reason = '', last_received_at = excluded.last_received_at,
                updated_at = excluded.updated_at, deadline = excluded.deadline,
                settle_seconds = excluded.settle_seconds
            """,
            (inst.study_instance_uid, inst.received_at, inst.received_at, inst.received_at,
             deadline, settle_seconds),
        )
        await self.db.commit()
        return "new" if row is None else "changed"

    async def instances_for_study(self, study_uid: str) -> list[StoredInstance]:
        async with self.db.execute(
            """SELECT sop_instance_uid, series_instance_uid, sop_class_uid, path
               FROM instances WHERE study_instance_uid = ? ORDER BY received_at""",
            (study_uid,),
        ) as cur:
            rows = await cur.fetchall()
        return [StoredInstance(r[0], r[1], r[2], Path(r[3])) for r in rows]

    # --- studies (assemble) -----------------------------------------------------------------

    async def mark_study(self, study_uid: str, state: str, at: str, reason: str = "",
                         column: str | None = None) -> None:
        """Set a study's state; ``column`` (released_at or ready_at) also gets ``at``."""
        extra = ""
        if column is not None:
            if column not in ("released_at", "ready_at"):
                raise ValueError(column)
            extra = f", {column} = :at"
        if state != "receiving":
            extra += ", deadline = NULL"
        await self.db.execute(
            f"""UPDATE studies SET state = :state, reason = :reason, updated_at = :at{extra}
                WHERE study_instance_uid = :uid""",
            {"state": state, "reason": reason, "at": at, "uid": study_uid},
        )
        await self.db.commit()

    async def set_released(self, deadlines: Iterable[tuple[str, float]], at: str) -> None:
        """Note the association release of studies, each with its new deadline."""
        await self.db.executemany(
            """UPDATE studies SET released_at = ?, updated_at = ?, deadline = ?
               WHERE study_instance_uid = ? AND state = 'receiving'""",
            [(at, at, deadline, uid) for uid, deadline in deadlines],
        )
        await self.db.commit()

    async def pending_studies(self) -> list[PendingStudy]:
        """Studies still receiving or ready-but-unfinished: what a restart must resume."""
        async with self.db.execute(
            """SELECT study_instance_uid, state, deadline, settle_seconds FROM studies
               WHERE state IN ('receiving', 'ready') ORDER BY deadline"""
        ) as cur:
            rows = await cur.fetchall()
        return [PendingStudy(r[0], r[1], r[2], r[3]) for r in rows]

    async def study(self, study_uid: str) -> StudyRow | None:
        async with self.db.execute(
            """SELECT study_instance_uid, state, reason, released_at, ready_at
               FROM studies WHERE study_instance_uid = ?""",
            (study_uid,),
        ) as cur:
            row = await cur.fetchone()
        return StudyRow(*row) if row else None

    # --- selection decisions (select) ---------------------------------------------------------

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

    async def store_result(self, document: dict[str, Any], state: str, reason: str = "") -> None:
        """Insert one result document as its study's current one (earlier ones stay, as
        history) and move the study to ``state``, in one transaction."""
        await self.db.execute(
            "UPDATE results SET current = 0 WHERE study_instance_uid = ? AND current = 1",
            (document["studyInstanceUid"],),
        )
        await self.db.execute(
            """INSERT INTO results (id, study_instance_uid, patient_id, accession_number,
                   model_id, status, created_at, document, flags, current)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)""",
            (
                document["id"], document["studyInstanceUid"], document["patientId"],
                document["accessionNumber"], document["model"]["id"], document["status"],
                document["createdAt"], json.dumps(document, separators=(",", ":")),
                " ".join(document["pxsgate"].get("flags", [])),
            ),
        )
        await self.db.execute(
            # A study re-opened by a late instance meanwhile stays 'receiving' (and keeps
            # its deadline): it is processed again.
            """UPDATE studies SET state = ?, reason = ?, updated_at = ?, deadline = NULL
               WHERE study_instance_uid = ? AND state = 'ready'""",
            (state, reason, document["updatedAt"], document["studyInstanceUid"]),
        )
        await self.db.commit()

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
        sql = f"SELECT document FROM results {where} ORDER BY created_at, rowid"
        if flt.limit is not None:
            sql += f" LIMIT {int(flt.limit)}"
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [json.loads(r[0]) for r in rows]


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
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if flt.flagged:
        clauses.append("flags != ''")
    if not flt.history:
        clauses.append("current = 1")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
