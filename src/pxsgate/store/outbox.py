"""The transactional outbox (export): one delivery per result and exporter, written in the
result's own transaction and delivered at least once under an id the receiver can
de-duplicate on; and the DICOM objects pxsgate made for an exporter (its SRs), numbered
so that a rescore's object supersedes the earlier one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pxsgate.records import DeliveryState, StudyState
from pxsgate.store.connection import StoreBase, sql_in, transaction
from pxsgate.store.db import Database
from pxsgate.store.jobs import SETTLING_STATES, moves_to

_PENDING = DeliveryState.PENDING
_DELIVERED = DeliveryState.DELIVERED
_DELIVERY_COLUMNS = """id, result_id, exporter, state, attempts, next_attempt_at, last_error,
    created_at, updated_at, delivered_at"""
_MADE_COLUMNS = ("sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, "
                 "result_id, exporter, instance_number")


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


def _delivery(row: Iterable[Any]) -> Delivery:
    """A Delivery from a row of _DELIVERY_COLUMNS."""
    (id_, result_id, exporter, state, attempts, next_attempt_at, last_error, created_at,
     updated_at, delivered_at) = row
    return Delivery(id_, result_id, exporter, DeliveryState(state), attempts,
                    next_attempt_at, last_error, created_at, updated_at, delivered_at)


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


def delivery_id(result_id: str, exporter: str) -> str:
    """The delivery's id: derived, so the same result for the same exporter is always the
    same delivery."""
    return str(uuid.uuid5(uuid.UUID(result_id), exporter))


async def queue_deliveries(db: Database, result_id: str,
                           exporters: Sequence[str], due: float, at: str) -> list[str]:
    """Queue one pending delivery of the result per exporter, due at ``due`` (Unix time),
    in the caller's transaction (Store.store_result's); their ids."""
    ids = [delivery_id(result_id, name) for name in exporters]
    await db.executemany(
        """INSERT INTO deliveries (id, result_id, exporter, next_attempt_at, created_at,
               updated_at) VALUES (?, ?, ?, ?, ?, ?)""",
        [(i, result_id, name, due, at, at) for i, name in zip(ids, exporters, strict=True)],
    )
    return ids


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


class OutboxMixin(StoreBase):
    """Deliveries, and the objects made for exporters."""

    @transaction
    async def due_deliveries(self, now: float, exporters: Sequence[str], limit: int,
                             skip: Iterable[str] = ()) -> list[Delivery]:
        """Claim the pending deliveries for these exporters whose next attempt is due,
        oldest first, and that no node holds a lease on: each is leased to this node for
        ``delivery_lease_seconds``. On PostgreSQL the rows another node is claiming at
        the same moment are skipped (``FOR UPDATE SKIP LOCKED``), so N nodes send each
        delivery once; a node that dies mid-delivery loses it when its lease runs out."""
        if not exporters:
            return []
        skipped = list(skip)
        names = ",".join("?" * len(exporters))
        not_in = f"AND id NOT IN ({','.join('?' * len(skipped))})" if skipped else ""
        lock = " FOR UPDATE SKIP LOCKED" if self.shared else ""
        async with self.db.execute(
            f"""UPDATE deliveries SET lease_node = ?, lease_until = ?
                WHERE id IN (SELECT id FROM deliveries
                             WHERE state = '{_PENDING}' AND next_attempt_at <= ?
                               AND lease_until <= ? AND exporter IN ({names})
                             {not_in} ORDER BY next_attempt_at, created_at LIMIT ?{lock})
                RETURNING {_DELIVERY_COLUMNS}""",
            (self.node, now + self.delivery_lease_seconds, now, now, *exporters, *skipped,
             limit),
        ) as cur:
            rows = list(await cur.fetchall())
        await self.db.commit()
        return sorted((_delivery(r) for r in rows),
                      key=lambda d: (d.next_attempt_at, d.created_at))

    @transaction
    async def release_leases(self) -> int:
        """Give up this node's delivery leases: at the outbox's start nothing is in flight,
        so what a killed predecessor had leased is due again at once (not when its lease
        runs out)."""
        cur = await self.db.execute(
            f"""UPDATE deliveries SET lease_until = 0
                WHERE lease_node = ? AND lease_until > 0 AND state = '{_PENDING}'""",
            (self.node,))
        await self.db.commit()
        return cur.rowcount

    async def next_delivery_time(self, exporters: Sequence[str]) -> float | None:
        if not exporters:
            return None
        names = ",".join("?" * len(exporters))
        async with self.db.execute(
            f"""SELECT min(CASE WHEN lease_until > next_attempt_at THEN lease_until
                                ELSE next_attempt_at END) FROM deliveries
                WHERE state = '{_PENDING}' AND exporter IN ({names})""", exporters) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    @transaction
    async def delivery_done(self, delivery: str, at: str) -> None:
        await self.db.execute(
            f"""UPDATE deliveries SET state = '{_DELIVERED}', attempts = attempts + 1,
                   last_error = '', updated_at = ?, delivered_at = ?, lease_until = 0
               WHERE id = ? AND state = '{_PENDING}'""", (at, at, delivery))
        await self._settle_study(delivery)
        await self.db.commit()

    async def _settle_study(self, delivery: str) -> None:
        """When a study's last pending delivery settles: ``exported`` if every delivery of
        its current result arrived (a FAILED study stays ``failed``), and its retention
        starts counting now."""
        await self.db.execute(
            f"""UPDATE studies SET finished_at = ?,
                   state = CASE WHEN {moves_to(StudyState.EXPORTED)} AND NOT EXISTS (
                       SELECT 1 FROM deliveries o JOIN results r ON r.id = o.result_id
                        WHERE r.study_instance_uid = studies.study_instance_uid
                          AND r.current = 1 AND o.state != '{_DELIVERED}')
                       THEN '{StudyState.EXPORTED}' ELSE state END
               WHERE study_instance_uid = (SELECT r.study_instance_uid FROM deliveries o
                                           JOIN results r ON r.id = o.result_id
                                           WHERE o.id = ?)
                 AND state IN ({sql_in(SETTLING_STATES)})
                 AND NOT EXISTS (SELECT 1 FROM deliveries o JOIN results r
                                   ON r.id = o.result_id
                                 WHERE r.study_instance_uid = studies.study_instance_uid
                                   AND o.state = '{_PENDING}')""", (time.time(), delivery))

    @transaction
    async def delivery_failed(self, delivery: str, error: str, at: str,
                              next_attempt_at: float | None) -> None:
        """Count a failed try: again at ``next_attempt_at``, or dead-lettered (None)."""
        state = DeliveryState.PENDING if next_attempt_at is not None else DeliveryState.DEAD
        await self.db.execute(
            f"""UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?,
                   updated_at = ?, next_attempt_at = coalesce(?, next_attempt_at),
                   lease_until = 0
               WHERE id = ? AND state = '{_PENDING}'""",
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
        return [_delivery(r) for r in rows]

    @transaction
    async def retry_deliveries(self, at: str, now: float, state: str | None = None,
                               exporter: str | None = None, ids: Sequence[str] = ()) -> int:
        """Make deliveries due now with a fresh count of tries (`pxsgate outbox retry`).
        Delivered ones are sent again only when named by id."""
        clauses, params = _delivery_where(state, exporter, ids)
        if not ids:
            clauses += (" AND " if clauses else "WHERE ") + f"state != '{_DELIVERED}'"
        cur = await self.db.execute(
            f"""UPDATE deliveries SET state = '{_PENDING}', attempts = 0, next_attempt_at = ?,
                    updated_at = ?, lease_until = 0 {clauses}""", (now, at, *params))
        await self.db.commit()
        return int(cur.rowcount)

    async def delivery_counts(self) -> dict[str, int]:
        async with self.db.execute(
                "SELECT state, count(*) FROM deliveries GROUP BY state") as cur:
            rows = await cur.fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # --- objects pxsgate made (export -> receive) ---------------------------------------

    @transaction
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

    @transaction
    async def forget_made_instance(self, sop_instance_uid: str) -> None:
        """Unregister an object that could not be made after all (never sent)."""
        await self.db.execute("DELETE FROM made_instances WHERE sop_instance_uid = ?",
                              (sop_instance_uid,))
        await self.db.commit()
