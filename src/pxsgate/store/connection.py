"""The store's one connection: opening it (SQLite's file or a PostgreSQL database, the
migrations, the store's secret), the ``transaction`` guard every write method runs under,
the node this gateway is (which instances and study jobs are its own), and the keys made
with the store's secret (patient hashes, study labels)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from pxsgate.errors import StoreError
from pxsgate.service.failpoints import Failpoints
from pxsgate.store.db import (
    Database,
    DatabaseError,
    PostgresDatabase,
    SqliteDatabase,
    is_postgres_url,
)
from pxsgate.store.schema import MIGRATIONS

# The migration that gave instances and studies their node.
NODE_COLUMNS_VERSION = 10
# Serialises the migrations of nodes starting together on one PostgreSQL database.
_MIGRATION_LOCK = 0x70787367  # "pxsg"

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def sql_in(words: Iterable[str]) -> str:
    """The SQL list of fixed words (states, statuses) for ``IN (...)``: 'a', 'b'. Only for
    the store's own constants, never for outside input."""
    return ", ".join(f"'{w}'" for w in words)


def transaction(method: F) -> F:
    """A write method is one transaction. Writers take turns (the service's coroutines
    share one connection: without this, one's COMMIT would commit another's half-done
    statements), and a write that fails (the database locked by another process past the
    busy timeout, a full disk) is rolled back, leaving no transaction open behind it."""

    @functools.wraps(method)
    async def guarded(self: StoreBase, *args: Any, **kwargs: Any) -> Any:
        async with self.writing():
            return await method(self, *args, **kwargs)

    return cast(F, guarded)


class StoreBase:
    """Async access to the store: SQLite's file at ``path`` (the default), or the
    PostgreSQL database at ``url`` (``postgresql://user@host:5432/db``: the password from
    ``password``, or libpq's environment and ``.pgpass``). One connection; writers take
    turns on it. ``node``: this gateway's name (storage.node-name): on PostgreSQL, where
    several gateways share the store, it resumes and purges only its own studies and files.
    The per-concern parts of :class:`pxsgate.store.Store` build on it."""

    def __init__(self, path: Path, failpoints: Failpoints | None = None, *,
                 url: str | None = None, password: str | None = None,
                 node: str = "") -> None:
        if url is not None and not is_postgres_url(url):
            raise StoreError("the store's database URL must start with postgresql://")
        self.path = path
        self.url = url
        self._password = password
        self.node = node
        self.delivery_lease_seconds = 120.0  # storage.delivery-lease-seconds
        self._failpoints = failpoints or Failpoints()
        self._write_lock = asyncio.Lock()
        self.reveal_uids = False  # study_label: the UID itself (logging.include-phi)
        self._db: Database | None = None
        self._patient_secret = b""

    @property
    def where(self) -> str:
        """The store, as messages name it (never with a password)."""
        if self.url is None:
            return str(self.path)
        from pxsgate.config import redact_url

        return redact_url(self.url)

    @property
    def shared(self) -> bool:
        """Whether other gateways may use this store too (PostgreSQL)."""
        return self.url is not None

    def mine(self, column: str) -> str:
        """The SQL condition that a row of ``column`` (a node column) is this node's: always
        true on SQLite, which one gateway has to itself."""
        if not self.shared:
            return "1 = 1"
        return f"{column} = '{self.node.replace(chr(39), chr(39) * 2)}'"

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """The write turn of one transaction (see :func:`transaction`): what fails inside is
        rolled back, leaving no transaction open behind it; what it leaves uncommitted is
        committed at its end."""
        async with self._write_lock:
            try:
                await self.db.begin()
                yield
                await self.db.commit()
            except BaseException:
                # Always: after a cancellation the interrupted statement may still be
                # queued on aiosqlite's thread; the rollback runs after it (and is a no-op
                # when no transaction is open).
                if self._db is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._db.rollback())
                raise

    def document(self, text: str) -> dict[str, Any]:
        """A stored result document, as its JSON object with its fields in the document's
        own order. PostgreSQL's JSONB keeps an order of its own: the document is read back
        through its model (which writes the fields in order, as stored on SQLite)."""
        data: dict[str, Any] = json.loads(text)
        if self.shared:
            import dataclasses

            from pxsgate.document import ResultDocument

            document = ResultDocument.from_json(data)
            # The model block is kept as stored (model_json), in JSONB's order here: its
            # fields go in the order this release writes them, any others after.
            order = dataclasses.replace(document, model_json=None).to_json()
            data = _in_order(document.to_json(), order)
        return data

    @property
    def db(self) -> Database:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def open(self) -> None:
        try:
            if self.url is None:
                self._db = await SqliteDatabase.open(self.path)
            else:
                self._db = await PostgresDatabase.open(self.url, self._password)
            found = await self._migrate()
            self._patient_secret = await self._secret()
            await self._backfill_patient_keys()
            if 0 < found < NODE_COLUMNS_VERSION:
                await self._adopt_rows()
        except (OSError, DatabaseError) as exc:
            await self.close()
            raise StoreError(f"cannot open the store {self.where}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None

    async def _migrate(self) -> int:
        """Bring the schema up to date; the version it was at (0: a new store)."""
        db = self.db
        if isinstance(db, PostgresDatabase):
            return await self._migrate_postgres(db)
        assert isinstance(db, SqliteDatabase)
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        self._check_version(version)
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.executescript(
                f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;"
            )
        return version

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.where} has schema version {version}, newer than this pxsgate "
                f"({len(MIGRATIONS)}): upgrade pxsgate"
            )

    async def _migrate_postgres(self, db: PostgresDatabase) -> int:
        """The same numbered steps as SQLite's, from the baseline (schema_pg.py), in one
        transaction under an advisory lock: nodes starting together take turns."""
        from pxsgate.store.schema_pg import (
            PG_BASELINE,
            PG_BASELINE_VERSION,
            PG_FUNCTIONS,
            PG_MIGRATIONS,
        )

        await db.begin()
        try:
            await db.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            async with db.execute("SELECT to_regclass('meta') IS NOT NULL") as cur:
                row = await cur.fetchone()
            version = 0
            if row is not None and row[0]:
                async with db.execute(
                        "SELECT value FROM meta WHERE key = 'schema-version'") as cur:
                    found = await cur.fetchone()
                version = int(found[0]) if found else 0
            self._check_version(version)
            before = version
            if version < len(MIGRATIONS):
                await db.executescript(PG_FUNCTIONS)
            if version == 0:
                await db.executescript(PG_BASELINE)
                version = PG_BASELINE_VERSION
            for number in range(version + 1, len(MIGRATIONS) + 1):
                await db.executescript(PG_MIGRATIONS[number])
                version = number
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema-version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        return before

    async def schema_version(self) -> int:
        """The store's schema version (as SQLite's ``PRAGMA user_version`` counts it)."""
        if self.db.dialect == "sqlite":
            sql = "PRAGMA user_version"
        else:
            sql = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema-version'"
        async with self.db.execute(sql) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _adopt_rows(self) -> None:
        """Instances and studies from before nodes were named (a store migrated past
        NODE_COLUMNS_VERSION just now) become this node's: once, not at every open."""
        if not self.node:
            return
        for table in ("instances", "studies"):
            await self.db.execute(f"UPDATE {table} SET node = ? WHERE node = ''",
                                  (self.node,))
        await self.db.commit()

    @transaction
    async def probe_write(self, at: str) -> None:
        """Write and commit one small row: raises what any write would (a full disk, a
        database locked by another process past the busy timeout, a read-only file)."""
        await self.db.execute(
            "INSERT INTO health_probe (id, at) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET at = excluded.at", (at,))
        await self.db.commit()

    async def _dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async with self.db.execute(sql, params) as cur:
            names = [c[0] for c in cur.description]
            rows = await cur.fetchall()
        return [dict(zip(names, r, strict=True)) for r in rows]

    async def _one_dict(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self._dicts(sql, params)
        return rows[0] if rows else None

    # --- keys made with the store's secret ----------------------------------------------

    async def _secret(self) -> bytes:
        """The store's key for patient hashes, made once at its creation."""
        await self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('patient-key-secret', ?) "
            "ON CONFLICT (key) DO NOTHING",
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


def _in_order(value: Any, template: Any) -> Any:
    """``value`` with the keys of its objects in ``template``'s order (recursively), keys
    the template lacks after them."""
    if not isinstance(value, dict) or not isinstance(template, dict):
        return value
    keys = [k for k in template if k in value] + [k for k in value if k not in template]
    return {k: _in_order(value[k], template.get(k)) for k in keys}
