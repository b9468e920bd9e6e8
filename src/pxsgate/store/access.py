"""Who may see what (the web UI, issue 22): users and their roles, login sessions, the
append-only audit trail, and reviewers' verdicts on results. The policy (roles, password
hashing, expiry, what is audited) is pxsgate.ui's; this holds the rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pxsgate.store.connection import StoreBase, transaction
from pxsgate.store.jsonpaths import (
    ENTRY_CODE,
    ENTRY_VALUE,
    PXS_SCORE,
    RESULTS,
    STUDY_DATETIME,
    doc,
)

VERDICTS = ("confirmed", "wrong-image-used", "wrong-patient", "not-a-valid-exam")
AUDIT_OUTCOMES = (0, 4, 8, 12)  # PS3.15 EventOutcomeIndicator
# Verdicts that reject a result: `evaluate` and `export-dataset --exclude-rejected` leave
# out the studies whose latest review says one of them.
REJECTING_VERDICTS = ("wrong-image-used", "wrong-patient", "not-a-valid-exam")
# The StudyInstanceUIDs whose latest review (of any of their results) rejects them.
REJECTED_STUDIES_SQL = f"""
    SELECT v.study_instance_uid FROM reviews v
    WHERE v.id = (SELECT max(w.id) FROM reviews w
                  WHERE w.study_instance_uid = v.study_instance_uid)
      AND v.verdict IN ({", ".join(f"'{v}'" for v in REJECTING_VERDICTS)})"""


def audit_time(moment: datetime | None = None) -> str:
    """An audit entry's time: UTC with milliseconds, comparable as text."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str
    created_at: str
    disabled: bool


@dataclass(frozen=True)
class Session:
    """A login (its id: the hash of the cookie's token), with its user's current role."""

    id: str
    user_name: str
    role: str
    disabled: bool
    created_at: str
    expires: float  # Unix time
    last_seen: float  # Unix time
    csrf: str


@dataclass(frozen=True)
class AuditEntry:
    event_time: str  # audit_time()
    user_name: str
    role: str
    action: str
    outcome: int  # AUDIT_OUTCOMES
    study_key: str = ""
    peer_address: str = ""
    detail: str = ""
    id: int | None = None  # set once stored


@dataclass(frozen=True)
class Review:
    id: int
    result_id: str
    study_instance_uid: str
    reviewer: str
    verdict: str
    comment: str
    created_at: str


@dataclass(frozen=True)
class WorklistRow:
    """A study's current result as the worklist lists it; identifiers included: the page
    decides what a role is shown."""

    result_id: str
    study_instance_uid: str
    patient_id: str
    accession_number: str
    study_time: str | None
    status: str
    score: float | None
    flags: str
    created_at: str
    verdict: str | None  # the latest review's
    change: float | None = None  # the pxs.change entry's value: the distance to the prior


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters (pxsgate.ui.pages validates the query string into one).
    Dates compare with created_utc (``YYYY-MM-DD`` prefixes: ``until`` is inclusive)."""

    status: str | None = None
    flagged: bool = False
    since: str | None = None  # a UTC date, YYYY-MM-DD
    until: str | None = None
    score_min: float | None = None
    score_max: float | None = None
    accession: str | None = None
    pinned: bool = True  # flagged studies first


_CHANGE_VALUE = (f"(SELECT CAST(json_extract(e.value, '{ENTRY_VALUE}') AS REAL)"
                 f" FROM json_each(r.document, '{RESULTS}') e"
                 f" WHERE json_extract(e.value, '{ENTRY_CODE}') = 'pxs.change')")
_WORKLIST_COLUMNS = f"""r.id, r.study_instance_uid, r.patient_id, r.accession_number,
                        {doc(STUDY_DATETIME)}, r.status, {PXS_SCORE}, r.flags,
                        r.created_at,
                        (SELECT v.verdict FROM reviews v WHERE v.result_id = r.id
                         ORDER BY v.id DESC LIMIT 1),
                        {_CHANGE_VALUE}"""


def _worklist_row(r: Sequence[Any]) -> WorklistRow:
    return WorklistRow(r[0], r[1], r[2], r[3], r[4], r[5],
                       None if r[6] is None else float(r[6]), r[7], r[8], r[9],
                       None if r[10] is None else float(r[10]))


def worklist_sql(flt: WorklistFilter) -> tuple[str, list[Any]]:
    """The worklist's query (``LIMIT ? OFFSET ?`` left to bind): served by results_worklist
    (migration 9) when pinned, by results_created_utc when not; the status is filtered on
    that scan (``+``: its index would be a sort of nearly every row)."""
    clauses = ["r.current = 1"]
    params: list[Any] = []
    if flt.status is not None:
        clauses.append("+r.status = ?")
        params.append(flt.status)
    if flt.flagged:
        clauses.append("r.flags != ''")
    if flt.since is not None:
        clauses.append("r.created_utc >= ?")
        params.append(flt.since)
    if flt.until is not None:
        clauses.append("r.created_utc < ?")
        params.append(flt.until + "~")  # after every time of that day
    if flt.score_min is not None:
        clauses.append(f"{PXS_SCORE} >= ?")
        params.append(flt.score_min)
    if flt.score_max is not None:
        clauses.append(f"{PXS_SCORE} <= ?")
        params.append(flt.score_max)
    if flt.accession is not None:
        clauses.append("r.accession_number = ?")
        params.append(flt.accession)
    order = "r.created_utc DESC, r.rowid DESC"
    if flt.pinned:
        order = "r.flags != '' DESC, " + order
    return (f"SELECT {_WORKLIST_COLUMNS} FROM results r WHERE {' AND '.join(clauses)} "
            f"ORDER BY {order} LIMIT ? OFFSET ?"), params


_AUDIT_COLUMNS = ("event_time, user_name, role, action, outcome, study_key, peer_address, "
                  "detail")
_SESSION_SQL = """SELECT s.id, s.user_name, u.role, u.disabled, s.created_at, s.expires,
                         s.last_seen, s.csrf
                  FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.id = ?"""


class AccessMixin(StoreBase):
    """Users, sessions, audit entries and reviews."""

    # --- users ------------------------------------------------------------------------

    @transaction
    async def add_user(self, name: str, role: str, password_hash: str, at: str) -> bool:
        """Add a user; False when the name is taken."""
        cur = await self.db.execute(
            "INSERT INTO users (name, role, password_hash, created_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, role, password_hash, at))
        await self.db.commit()
        return cur.rowcount == 1

    @transaction
    async def remove_user(self, name: str) -> bool:
        """Remove a user and end its sessions; its audit entries and reviews keep its name."""
        await self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
        cur = await self.db.execute("DELETE FROM users WHERE name = ?", (name,))
        await self.db.commit()
        return cur.rowcount == 1

    @transaction
    async def set_user_disabled(self, name: str, disabled: bool) -> bool:
        """Disable (ending its sessions) or enable a user; False when there is none."""
        if disabled:
            await self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
        cur = await self.db.execute("UPDATE users SET disabled = ? WHERE name = ?",
                                    (int(disabled), name))
        await self.db.commit()
        return cur.rowcount == 1

    async def user(self, name: str) -> User | None:
        async with self.db.execute(
                "SELECT name, role, password_hash, created_at, disabled FROM users "
                "WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return User(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    async def users(self) -> list[User]:
        async with self.db.execute(
                "SELECT name, role, password_hash, created_at, disabled FROM users "
                "ORDER BY name") as cur:
            return [User(r[0], r[1], r[2], r[3], bool(r[4])) for r in await cur.fetchall()]

    # --- sessions ---------------------------------------------------------------------

    @transaction
    async def create_session(self, session_id: str, user_name: str, at: str, now: float,
                             expires: float, csrf: str) -> None:
        await self.db.execute(
            "INSERT INTO sessions (id, user_name, created_at, expires, last_seen, csrf) "
            "VALUES (?, ?, ?, ?, ?, ?)", (session_id, user_name, at, expires, now, csrf))
        await self.db.commit()

    async def session(self, session_id: str) -> Session | None:
        async with self.db.execute(_SESSION_SQL, (session_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return Session(row[0], row[1], row[2], bool(row[3]), row[4], float(row[5]),
                       float(row[6]), row[7])

    @transaction
    async def touch_session(self, session_id: str, now: float) -> None:
        await self.db.execute("UPDATE sessions SET last_seen = ? WHERE id = ?",
                              (now, session_id))
        await self.db.commit()

    @transaction
    async def end_session(self, session_id: str) -> None:
        await self.db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        await self.db.commit()

    @transaction
    async def purge_sessions(self, now: float, idle_seconds: float) -> int:
        """Delete sessions past their expiry or idle past ``idle_seconds``."""
        cur = await self.db.execute(
            "DELETE FROM sessions WHERE expires <= ? OR last_seen <= ?",
            (now, now - idle_seconds))
        await self.db.commit()
        return cur.rowcount

    # --- the audit trail --------------------------------------------------------------

    @transaction
    async def record_audit(self, entry: AuditEntry) -> int:
        """Append one entry; its id."""
        async with self.db.execute(
                f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (entry.event_time, entry.user_name, entry.role, entry.action, entry.outcome,
                 entry.study_key, entry.peer_address, entry.detail)) as cur:
            row = await cur.fetchone()
        await self.db.commit()
        return int(row[0])

    async def audit_entries(self, since_utc: str | None = None, user: str | None = None,
                            limit: int | None = None) -> list[AuditEntry]:
        """Entries oldest first (the latest ``limit`` of them), at or after ``since_utc``
        (audit_time's format), of one user."""
        where: list[str] = []
        params: list[Any] = []
        if since_utc is not None:
            where.append("event_time >= ?")
            params.append(since_utc)
        if user is not None:
            where.append("user_name = ?")
            params.append(user)
        sql = f"SELECT id, {_AUDIT_COLUMNS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [AuditEntry(r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7], r[8], id=int(r[0]))
                for r in reversed(list(rows))]

    # --- reviews ----------------------------------------------------------------------

    async def current_result_id(self, study_uid: str) -> str | None:
        async with self.db.execute(
                "SELECT id FROM results WHERE study_instance_uid = ? AND current = 1 "
                "ORDER BY rowid DESC LIMIT 1", (study_uid,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def result_study(self, result_id: str) -> str | None:
        """The StudyInstanceUID of a result (any, current or not)."""
        async with self.db.execute(
                "SELECT study_instance_uid FROM results WHERE id = ?", (result_id,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    @transaction
    async def add_review(self, result_id: str, study_uid: str, reviewer: str, verdict: str,
                         comment: str, at: str) -> int:
        async with self.db.execute(
                "INSERT INTO reviews (result_id, study_instance_uid, reviewer, verdict, "
                "comment, created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (result_id, study_uid, reviewer, verdict, comment, at)) as cur:
            row = await cur.fetchone()
        await self.db.commit()
        return int(row[0])

    async def reviews(self, study_uid: str) -> list[Review]:
        """A study's reviews (of any of its results), oldest first."""
        async with self.db.execute(
                "SELECT id, result_id, study_instance_uid, reviewer, verdict, comment, "
                "created_at FROM reviews WHERE study_instance_uid = ? ORDER BY id",
                (study_uid,)) as cur:
            return [Review(*r) for r in await cur.fetchall()]

    # --- the worklist -----------------------------------------------------------------

    async def worklist(self, limit: int = 50) -> list[WorklistRow]:
        """The newest current results, newest first, with each one's latest verdict."""
        rows, _ = await self.worklist_page(WorklistFilter(pinned=False), limit)
        return rows

    async def worklist_page(self, flt: WorklistFilter, limit: int = 50, offset: int = 0
                            ) -> tuple[list[WorklistRow], bool]:
        """One page of current results as ``flt`` orders them, and whether more follow."""
        sql, params = worklist_sql(flt)
        async with self.db.execute(sql, (*params, limit + 1, offset)) as cur:
            rows = list(await cur.fetchall())
        return [_worklist_row(r) for r in rows[:limit]], len(rows) > limit

    async def latest_verdicts(self, study_uids: Sequence[str] = ()) -> dict[str, str]:
        """Each study's latest review verdict (of any of its results)."""
        async with self.db.execute(
                "SELECT study_instance_uid, verdict FROM reviews ORDER BY id") as cur:
            rows = await cur.fetchall()
        wanted = set(study_uids)
        return {str(r[0]): str(r[1]) for r in rows if not wanted or r[0] in wanted}
