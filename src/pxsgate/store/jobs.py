"""Each study's job: its state machine (records.TRANSITIONS, enforced here), the
deadlines that survive a restart, the tries, and retention's purge of its files.

Every UPDATE that moves ``studies.state`` guards itself with :func:`moves_to`: the study
moves only from a state the table allows, and is otherwise left as it is (a late instance
that re-opened the study to ``receiving`` meanwhile wins). Any state may go back to
``receiving`` (instances.py: a new or changed image re-opens its study).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxsgate.records import (
    DONE_STATES,
    UNFINISHED_STATES,
    DeliveryState,
    StudyState,
    may_move,
)
from pxsgate.store.connection import StoreBase, sql_in, transaction


def moves_to(to: StudyState | str, only_from: Iterable[StudyState | str] = ()) -> str:
    """The SQL condition on ``state`` under which a study may move to ``to``: it is in one
    of the states TRANSITIONS lets move there; ``only_from``, when given, narrows those
    further, and naming a state the table does not allow is a ValueError (as is a word
    that is no state)."""
    allowed = may_move(StudyState(to))
    asked = {StudyState(s) for s in only_from}
    if asked:
        if not asked <= set(allowed):
            raise ValueError(f"a study may not move to {to} from "
                             f"{', '.join(sorted(asked - set(allowed)))}")
        allowed = tuple(s for s in allowed if s in asked)
    return f"state IN ({sql_in(allowed)})"


# A study whose deliveries settle: its result stored and not yet all delivered. A stored
# one may move on to exported; a failed one stays failed (its clock restarts all the same).
SETTLING_STATES: tuple[StudyState, ...] = (*may_move(StudyState.EXPORTED), StudyState.FAILED)


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


class JobsMixin(StoreBase):
    """Studies (assemble, select, infer) and retention."""

    @transaction
    async def mark_study(self, study_uid: str, state: str, at: str, reason: str = "",
                         column: str | None = None, only_from: Sequence[str] = ()) -> None:
        """Set a study's state, if TRANSITIONS allows the move from the one it is in;
        ``column`` (released_at or ready_at) also gets ``at``. ``only_from``: only from
        these states (a late instance re-opens a study to ``receiving``: that must not be
        overwritten)."""
        extra = ""
        if column is not None:
            if column not in ("released_at", "ready_at"):
                raise ValueError(column)
            extra = f", {column} = :at"
        if state != StudyState.RECEIVING:
            extra += ", deadline = NULL"
        await self.db.execute(
            f"""UPDATE studies SET state = :state, reason = :reason, updated_at = :at{extra}
                WHERE study_instance_uid = :uid AND {moves_to(state, only_from)}""",
            {"state": state, "reason": reason, "at": at, "uid": study_uid},
        )
        await self.db.commit()

    @transaction
    async def set_released(self, deadlines: Iterable[tuple[str, float]], at: str) -> None:
        """Note the association release of studies, each with its new deadline."""
        await self.db.executemany(
            f"""UPDATE studies SET released_at = ?, updated_at = ?, deadline = ?
               WHERE study_instance_uid = ? AND state = '{StudyState.RECEIVING}'""",
            [(at, at, deadline, uid) for uid, deadline in deadlines],
        )
        await self.db.commit()

    async def pending_studies(self) -> list[PendingStudy]:
        """Studies whose job is unfinished (receiving, ready, selected, inferring): what a
        start-up resumes. Oldest first."""
        async with self.db.execute(
            f"""SELECT study_instance_uid, state, deadline, settle_seconds, attempts
                FROM studies WHERE state IN ({sql_in(UNFINISHED_STATES)})
                  AND {self.mine("node")}
                ORDER BY last_received_at""",
        ) as cur:
            rows = await cur.fetchall()
        return [PendingStudy(*r) for r in rows]

    @transaction
    async def begin_attempt(self, study_uid: str, at: str) -> int:
        """Move a study to ``inferring`` and count the try (committed before the model is
        asked, so a crash during inference counts); return the tries so far this round."""
        await self.db.execute(
            f"""UPDATE studies SET state = ?, attempts = attempts + 1, updated_at = ?
               WHERE study_instance_uid = ? AND {moves_to(StudyState.INFERRING)}""",
            (StudyState.INFERRING, at, study_uid))
        await self.db.commit()
        async with self.db.execute("SELECT attempts FROM studies WHERE study_instance_uid = ?",
                                   (study_uid,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

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

    # --- retention ----------------------------------------------------------------------

    async def spool_bytes(self) -> int:
        """Bytes of the instances still in the spool."""
        async with self.db.execute(
                "SELECT coalesce(sum(size), 0) FROM instances WHERE removed_at IS NULL "
                f"AND {self.mine('node')}") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def purgeable_studies(self, finished_before: float | None, limit: int
                                ) -> list[tuple[str, list[Path], int]]:
        """Finished studies (result stored, no delivery pending) whose images are still
        spooled, oldest first: (study UID, files, bytes). ``finished_before``: only those
        finished before this Unix time (None: any, for the spool ceiling)."""
        cutoff = "AND s.finished_at <= ?" if finished_before is not None else ""
        params: list[Any] = [finished_before] if finished_before is not None else []
        async with self.db.execute(
            f"""SELECT s.study_instance_uid FROM studies s
                WHERE s.purged_at IS NULL AND s.finished_at IS NOT NULL
                  AND s.state IN ({sql_in(DONE_STATES)}) {cutoff}
                  AND {self.mine("s.node")}
                  AND NOT EXISTS (SELECT 1 FROM deliveries o JOIN results r
                                    ON r.id = o.result_id
                                  WHERE r.study_instance_uid = s.study_instance_uid
                                    AND o.state = '{DeliveryState.PENDING}')
                ORDER BY s.finished_at LIMIT ?""", (*params, limit)) as cur:
            studies = [r[0] for r in await cur.fetchall()]
        out = []
        for uid in studies:
            async with self.db.execute(
                    """SELECT path, size FROM instances
                       WHERE study_instance_uid = ? AND removed_at IS NULL AND """
                    + self.mine("node"), (uid,)) as cur:
                rows = await cur.fetchall()
            out.append((uid, [Path(r[0]) for r in rows], sum(int(r[1]) for r in rows)))
        return out

    @transaction
    async def mark_purged(self, study_uid: str, paths: Sequence[Path], at: str) -> bool:
        """Record that these files of a finished study were deleted (the spool keeps the
        study from being written meanwhile: :meth:`Spool.purging`); False when it was
        no longer finished, and then nothing is recorded."""
        cur = await self.db.execute(
            f"""UPDATE studies SET purged_at = ? WHERE study_instance_uid = ?
                AND state IN ({sql_in(DONE_STATES)})""", (at, study_uid))
        if cur.rowcount:
            await self.db.executemany(
                "UPDATE instances SET removed_at = ? WHERE path = ? AND removed_at IS NULL "
                f"AND {self.mine('node')}",
                [(at, str(p)) for p in paths])
        await self.db.commit()
        return bool(cur.rowcount)
