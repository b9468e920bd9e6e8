"""Instances (receive -> store): indexing each C-STORE, its sender and every reception,
the moves of an instance between studies, and the files the spool holds.

An image that is new or changed (re)opens its study to ``receiving``, from whatever state
it was in (records.TRANSITIONS: any state may go back to receiving).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from pxsgate.records import (
    Indexed,
    InstanceKind,
    InstanceOutcome,
    ReceivedInstance,
    StoredInstance,
    StudyState,
)
from pxsgate.sopclass import is_image
from pxsgate.store.connection import StoreBase, transaction


class InstancesMixin(StoreBase):
    """Instances, their receptions and moves."""


    @transaction
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
            indexed = await self._count_resend(inst, kind, revived=row[3] is not None)
        else:
            await self._upsert_instance(inst, kind)
            opened = await self._open_study(inst, deadline, settle_seconds,
                                            reopen=kind == "image")
            moved = (Path(row[2]) if row is not None and row[2] != str(inst.path)
                     and row[3] is None else None)
            moved_from = (str(row[1]) if row is not None and row[1] != inst.study_instance_uid
                          else None)
            rescore_old = (moved_from is not None and await self._record_move(
                inst, moved_from, kind, deadline, settle_seconds))
            outcome: InstanceOutcome = ("attached" if not opened
                                        else "new" if row is None else "changed")
            indexed = Indexed(outcome, moved, kind, moved_from, rescore_old)
        await self._add_reception(inst, indexed.outcome)
        await self.db.commit()
        return indexed

    async def _count_resend(self, inst: ReceivedInstance, kind: InstanceKind, *,
                            revived: bool) -> Indexed:
        """The bytes already held, sent again: counted, with the latest sender."""
        await self.db.execute(
            """UPDATE instances SET receive_count = receive_count + 1, calling_ae = ?,
                   called_ae = ?, peer_address = ?, association_id = ?, received_at = ?,
                   removed_at = NULL
               WHERE sop_instance_uid = ?""",
            (inst.calling_ae, inst.called_ae, inst.peer_address, inst.association_id,
             inst.received_at, inst.sop_instance_uid),
        )
        if revived:
            await self._purgeable_again(inst.study_instance_uid)
        return Indexed("revived" if revived else "duplicate", kind=kind)

    async def _upsert_instance(self, inst: ReceivedInstance, kind: InstanceKind) -> None:
        await self.db.execute(
            """
            INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid,
                sop_class_uid, transfer_syntax_uid, path, size, sha256, calling_ae,
                called_ae, peer_address, association_id, received_at, kind, node)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (sop_instance_uid) DO UPDATE SET
                study_instance_uid = excluded.study_instance_uid,
                series_instance_uid = excluded.series_instance_uid,
                sop_class_uid = excluded.sop_class_uid,
                transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path,
                size = excluded.size, sha256 = excluded.sha256,
                calling_ae = excluded.calling_ae, called_ae = excluded.called_ae,
                peer_address = excluded.peer_address,
                association_id = excluded.association_id, received_at = excluded.received_at,
                receive_count = instances.receive_count + 1, removed_at = NULL,
                kind = excluded.kind, node = excluded.node
            """,
            (
                inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid,
                inst.sop_class_uid, inst.transfer_syntax_uid, str(inst.path), inst.size,
                inst.sha256, inst.calling_ae, inst.called_ae, inst.peer_address,
                inst.association_id, inst.received_at, kind, self.node,
            ),
        )

    async def _record_move(self, inst: ReceivedInstance, moved_from: str, kind: InstanceKind,
                           deadline: float, settle_seconds: float) -> bool:
        """A correction, recorded with the instance (whether its PatientID changed is filled
        in by the caller, which reads the files). An image's old study is scored again, so
        that its result no longer claims it, at the deadline of the study it joined; not
        one retention has emptied (nothing left to score). True: the old study re-opened."""
        await self.db.execute(
            """INSERT INTO instance_moves (sop_instance_uid, from_study_uid, to_study_uid,
                   patient_changed, moved_at) VALUES (?, ?, ?, 0, ?)""",
            (inst.sop_instance_uid, moved_from, inst.study_instance_uid, inst.received_at))
        if kind != "image":
            return False
        cursor = await self.db.execute(
            f"""UPDATE studies SET state = '{StudyState.RECEIVING}', reason = '',
                   updated_at = ?,
                   deadline = ?, settle_seconds = ?, attempts = 0
               WHERE study_instance_uid = ? AND purged_at IS NULL""",
            (inst.received_at, deadline, settle_seconds, moved_from))
        return cursor.rowcount == 1

    @transaction
    async def set_move_patient_changed(self, sop_uid: str, to_study: str) -> None:
        """The moved instance's PatientID differs from its earlier version's."""
        await self.db.execute(
            """UPDATE instance_moves SET patient_changed = 1
               WHERE sop_instance_uid = ? AND to_study_uid = ?""", (sop_uid, to_study))
        await self.db.commit()

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
        conflict = f"""DO UPDATE SET
                state = '{StudyState.RECEIVING}', reason = '',
                last_received_at = excluded.last_received_at,
                updated_at = excluded.updated_at, deadline = excluded.deadline,
                settle_seconds = excluded.settle_seconds, attempts = 0, purged_at = NULL,
                node = excluded.node"""
        cursor = await self.db.execute(
            f"""
            INSERT INTO studies (study_instance_uid, state, first_received_at,
                last_received_at, updated_at, deadline, settle_seconds, node)
            VALUES (?, '{StudyState.RECEIVING}', ?, ?, ?, ?, ?, ?)
            ON CONFLICT (study_instance_uid) {conflict if reopen else "DO NOTHING"}
            """,
            (inst.study_instance_uid, inst.received_at, inst.received_at, inst.received_at,
             deadline, settle_seconds, self.node),
        )
        if reopen or cursor.rowcount == 1:
            return True
        # Attached to a study whose files retention had deleted: its new file must be
        # deleted in turn, so the study is purgeable again (as a revived instance makes it).
        await self._purgeable_again(inst.study_instance_uid)
        return False

    async def _purgeable_again(self, study_uid: str) -> None:
        """A study retention had emptied holds a file again: it is to be purged again,
        its retention counting from now."""
        await self.db.execute(
            """UPDATE studies SET purged_at = NULL, finished_at = ?
               WHERE study_instance_uid = ? AND purged_at IS NOT NULL""",
            (time.time(), study_uid))

    async def _add_reception(self, inst: ReceivedInstance, outcome: InstanceOutcome) -> None:
        await self.db.execute(
            """INSERT INTO receptions (sop_instance_uid, study_instance_uid, association_id,
                   calling_ae, called_ae, peer_address, received_at, outcome)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (inst.sop_instance_uid, inst.study_instance_uid, inst.association_id,
             inst.calling_ae, inst.called_ae, inst.peer_address, inst.received_at, outcome))

    async def instances_for_study(self, study_uid: str) -> list[StoredInstance]:
        async with self.db.execute(
            """SELECT sop_instance_uid, series_instance_uid, sop_class_uid, path
               FROM instances WHERE study_instance_uid = ? AND removed_at IS NULL
                 AND kind != 'own' AND """ + self.mine("node") + """
               ORDER BY received_at""",
            (study_uid,),
        ) as cur:
            rows = await cur.fetchall()
        return [StoredInstance(r[0], r[1], r[2], Path(r[3])) for r in rows]


    async def unindexed(self, paths: Iterable[Path]) -> list[Path]:
        """Those of ``paths`` (spool files) that no indexed instance points to."""
        found = [str(p) for p in paths]
        known: set[str] = set()
        for i in range(0, len(found), 500):
            chunk = found[i : i + 500]
            async with self.db.execute(
                    f"SELECT path FROM instances WHERE path IN ({','.join('?' * len(chunk))})"
                    f" AND {self.mine('node')}",
                    chunk) as cur:
                known.update(r[0] for r in await cur.fetchall())
        return [Path(p) for p in found if p not in known]

    async def instance_paths(self, sop_instance_uids: Iterable[str]) -> dict[str, Path]:
        uids = list(sop_instance_uids)
        marks = ",".join("?" * len(uids))
        async with self.db.execute(
                f"SELECT sop_instance_uid, path FROM instances "
                f"WHERE sop_instance_uid IN ({marks})", uids) as cur:
            rows = await cur.fetchall()
        return {r[0]: Path(r[1]) for r in rows}
