"""The store's one connection: opening it (WAL, migrations, the store's secret), the
``transaction`` guard every write method runs under, and the keys made with the store's
secret (patient hashes, study labels)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from pxsgate.errors import StoreError
from pxsgate.service.failpoints import Failpoints
from pxsgate.store.schema import MIGRATIONS

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
    """Async access to the SQLite file. One connection; aiosqlite serialises its use. The
    per-concern parts of :class:`pxsgate.store.Store` build on it."""

    def __init__(self, path: Path, failpoints: Failpoints | None = None) -> None:
        self.path = path
        self._failpoints = failpoints or Failpoints()
        self._write_lock = asyncio.Lock()
        self.reveal_uids = False  # study_label: the UID itself (logging.include-phi)
        self._db: aiosqlite.Connection | None = None
        self._patient_secret = b""

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """The write turn of one transaction (see :func:`transaction`): what fails inside is
        rolled back, leaving no transaction open behind it."""
        async with self._write_lock:
            try:
                yield
            except BaseException:
                # Always: after a cancellation the interrupted statement may still be
                # queued on aiosqlite's thread; the rollback runs after it (and is a no-op
                # when no transaction is open).
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await asyncio.shield(self._db.rollback())
                raise

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
            self._patient_secret = await self._secret()
            await self._backfill_patient_keys()
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

    @transaction
    async def probe_write(self, at: str) -> None:
        """Write and commit one small row: raises what any write would (a full disk, a
        database locked by another process past the busy timeout, a read-only file)."""
        await self.db.execute("INSERT OR REPLACE INTO health_probe (id, at) VALUES (1, ?)",
                              (at,))
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
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('patient-key-secret', ?)",
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
