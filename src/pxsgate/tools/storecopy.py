"""``pxsgate store copy``: move a site's SQLite store into a PostgreSQL database, so that
several gateways can share it (storage.database).

Both stores are opened as pxsgate opens them (the source migrated to this version, the
target created at the same version), then every table is copied in one transaction in an
order that satisfies its references, rows in their insertion order (results, receptions and
decisions keep their order through the target's ``rowid``). The store's secret is copied
too, so that patient hashes and study keys stay the same. The target must be empty: a copy
never merges into a store in use. Stop the service before copying (its file must not change
meanwhile); afterwards point ``storage.database`` at the target, keeping
``storage.node-name``, so the node owns its instances and studies as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pxsgate.errors import PxsgateError
from pxsgate.store import Store
from pxsgate.store.schema_pg import TABLES_IN_ORDER

BATCH = 500
_IDENTITIES = ("embedding_vectors", "audit", "reviews")  # ids copied: their sequences follow
_NOT_COPIED = ("health_probe",)


@dataclass(frozen=True)
class Copied:
    rows: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def copy_store(source: Path, target_url: str, *, password: str | None = None,
                     node: str = "", progress: Callable[[str, int], None] | None = None
                     ) -> Copied:
    """Copy the SQLite store at ``source`` into the empty PostgreSQL database at
    ``target_url``; rows copied per table."""
    if not source.is_file():  # noqa: ASYNC240 (once, before anything is opened)
        raise PxsgateError(f"no SQLite store at {source}")
    src = Store(source, node=node)
    dst = Store(source, url=target_url, password=password, node=node)
    await src.open()
    try:
        await dst.open()
        try:
            return await _copy(src, dst, progress)
        finally:
            await dst.close()
    finally:
        await src.close()


async def _copy(src: Store, dst: Store, progress: Callable[[str, int], None] | None
                ) -> Copied:
    for table in ("results", "instances", "studies", "audit", "users"):
        async with dst.db.execute(f"SELECT 1 FROM {table} LIMIT 1") as cur:
            if await cur.fetchone() is not None:
                raise PxsgateError(f"the target store is not empty ({table} has rows): "
                                   "store copy never merges into a store in use")
    counts: dict[str, int] = {}
    async with dst.writing():
        for table in TABLES_IN_ORDER:
            if table in _NOT_COPIED:
                continue
            async with src.db.execute(f"SELECT * FROM {table} LIMIT 0") as cur:
                columns = [c[0] for c in cur.description]
            if table == "meta":  # the target's own schema version stays; the secret moves
                await dst.db.execute("DELETE FROM meta WHERE key != 'schema-version'")
            names = ", ".join(columns)
            marks = ", ".join("?" * len(columns))
            where = " WHERE key != 'schema-version'" if table == "meta" else ""
            insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"
            count, last = 0, -1
            while True:  # in batches by SQLite's rowid: a large store is never all in memory
                clause = f"{where} AND" if where else " WHERE"
                async with src.db.execute(
                        f"SELECT rowid, {names} FROM {table}{clause} rowid > ? "
                        f"ORDER BY rowid LIMIT {BATCH}", (last,)) as cur:
                    rows = [tuple(r) for r in await cur.fetchall()]
                if not rows:
                    break
                await dst.db.executemany(insert, [r[1:] for r in rows])
                count += len(rows)
                last = int(rows[-1][0])
            counts[table] = count
            if progress is not None:
                progress(table, count)
        for table in _IDENTITIES:
            await dst.db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce(max(id), 0) + 1, false) FROM {table}")
    return Copied(counts)
