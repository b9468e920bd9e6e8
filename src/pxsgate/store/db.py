"""The store's database connection, over SQLite (aiosqlite: the default, one file) or
PostgreSQL (psycopg 3: several gateways on one database).

The store's SQL is written once, in SQLite's dialect, and runs unchanged on SQLite. On
PostgreSQL :func:`translate` rewrites the few things the dialects spell differently (the
placeholders, ``CAST(... AS REAL)``, SQLite's unary ``+`` that keeps an index out of a
plan, and which JSON paths hold numbers), and the PostgreSQL schema (schema_pg.py)
defines SQLite's functions that PostgreSQL lacks (``json_extract``, ``json_each`` with a
path, ``julianday``, ``strftime`` in the store's one format, ``group_concat``,
``json_group_array``), so that the views and queries read the same on both. Every table
that is read in insertion order has a ``rowid`` column on PostgreSQL too.

Both connections have the same small surface (:class:`Database`): ``execute`` (awaited
for its cursor, or used as ``async with``), ``executemany``, ``begin``, ``commit``,
``rollback``. A database error is raised as :class:`DatabaseError` by both.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pxsgate.errors import StoreError
from pxsgate.store.jsonpaths import INTEGER_PATHS, NUMBER_PATHS

if TYPE_CHECKING:
    import aiosqlite
    import psycopg

Params = Sequence[Any] | Mapping[str, Any]
T = TypeVar("T")
# The longest a PostgreSQL statement may take, on the server (statement_timeout) and as
# the client waits for its answer.
STATEMENT_TIMEOUT_S = 30.0


class DatabaseError(StoreError):
    """A statement failed: the database refused it (a constraint, a lock held past the busy
    timeout, a full disk) or could not be reached."""


class Cursor(Protocol):
    @property
    def description(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...
    async def fetchone(self) -> Any: ...
    async def fetchall(self) -> Iterable[Any]: ...
    def __aiter__(self) -> AsyncIterator[Any]: ...


class Database(Protocol):
    """What the store asks of its connection."""

    dialect: str  # "sqlite" | "postgresql"

    def execute(self, sql: str, params: Params = ()) -> Statement: ...
    async def executemany(self, sql: str, rows: Iterable[Params]) -> None: ...
    async def begin(self) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
    async def close(self) -> None: ...


class Statement:
    """One statement, run when awaited (its cursor) or entered (``async with``)."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def __await__(self) -> Generator[Any, None, Cursor]:
        return self._run().__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Cursor:
        cursor: Cursor = await self._run()
        return cursor

    async def __aexit__(self, *exc: object) -> None:
        """Nothing to release: the cursor's rows are already fetched or let go."""


# --- SQLite -----------------------------------------------------------------------------


class SqliteDatabase:
    """One aiosqlite connection (its thread serialises every use)."""

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        import sqlite3

        import aiosqlite

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path)
            await conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, which is what Success promised.
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the store {path}: {exc}") from exc
        return cls(conn)

    def execute(self, sql: str, params: Params = ()) -> Statement:
        async def run() -> Cursor:
            import sqlite3

            try:
                return await self.conn.execute(sql, params)
            except sqlite3.Error as exc:
                raise DatabaseError(str(exc)) from exc

        return Statement(run)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        import sqlite3

        try:
            await self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    async def executescript(self, script: str) -> None:
        import sqlite3

        try:
            await self.conn.executescript(script)
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    async def begin(self) -> None:
        """Nothing: Python's sqlite3 opens the transaction at the first write."""

    async def commit(self) -> None:
        import sqlite3

        try:
            await self.conn.commit()
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc)) from exc

    async def rollback(self) -> None:
        await self.conn.rollback()

    async def close(self) -> None:
        await self.conn.close()


# --- PostgreSQL -------------------------------------------------------------------------

_NUMBER_CALL = re.compile(r"json_extract\(([\w.]+), '(\$[\w.]+)'\)")
_UNARY_PLUS = re.compile(r"(?<=[\s(])\+(?=[a-z_]+\.)")


def translate(sql: str, *, placeholders: bool = True) -> str:
    """The store's SQLite statement as PostgreSQL runs it, with psycopg's placeholders:
    ``?`` becomes ``%s``, ``:name`` becomes ``%(name)s``, a literal ``%`` is doubled
    (psycopg reads ``%`` everywhere, string literals too); ``CAST(x AS REAL)`` (float4 on
    PostgreSQL) becomes DOUBLE PRECISION; ``json_extract`` of a path that holds a number
    becomes ``json_number`` (``json_integer``), typed, where SQLite's returns the JSON
    value's own type; and SQLite's index-hiding unary ``+`` is dropped. Without
    ``placeholders`` (DDL: the views), only the dialect is translated."""

    def number(m: re.Match[str]) -> str:
        path = m.group(2)
        if path in INTEGER_PATHS:
            return f"json_integer({m.group(1)}, '{path}')"
        if path in NUMBER_PATHS:
            return f"json_number({m.group(1)}, '{path}')"
        return m.group(0)

    out: list[str] = []
    for i, part in enumerate(re.split(r"('(?:[^']|'')*')", sql)):
        if i % 2:  # a string literal: kept, only its % doubled
            out.append(part.replace("%", "%%") if placeholders else part)
            continue
        if placeholders:
            part = part.replace("%", "%%")
            part = re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", part)
            part = part.replace("?", "%s")
        part = re.sub(r"\bAS REAL\)", "AS DOUBLE PRECISION)", part)
        part = _UNARY_PLUS.sub("", part)
        out.append(part)
    return _NUMBER_CALL.sub(number, "".join(out))


@dataclass
class _PgCursor:
    """A psycopg cursor with the result fetched (client-side), as the store reads it."""

    description: Any
    rowcount: int
    rows: list[Any]

    async def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[Any]:
        return self.rows

    async def __aiter__(self) -> AsyncIterator[Any]:
        for row in self.rows:
            yield row


class PostgresDatabase:
    """One psycopg connection in autocommit mode: a write turn (StoreBase.writing) opens a
    transaction with ``begin`` and ends it with ``commit`` or ``rollback``; a read outside
    one sees every node's latest commits. A connection lost between transactions (the
    server restarted) is opened again at the next statement."""

    dialect = "postgresql"

    def __init__(self, url: str, password: str | None) -> None:
        self.url = url
        self._password = password
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._in_transaction = False
        self._translated: dict[str, str] = {}
        self.timeout_s = STATEMENT_TIMEOUT_S  # the client's deadline for each statement

    @classmethod
    async def open(cls, url: str, password: str | None = None) -> PostgresDatabase:
        db = cls(url, password)
        await db._connection()
        return db

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        try:
            import psycopg
            from psycopg.types.string import TextLoader
        except ImportError as exc:
            raise DatabaseError("storage.database is PostgreSQL, and psycopg is not "
                                "installed: pip install 'pxsgate[postgresql]'") from exc

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._in_transaction:
            raise DatabaseError("the connection to PostgreSQL was lost in a transaction")
        kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": 10, "application_name": "pxsgate",
            "options": f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}",
            # A peer gone without a reset is noticed by TCP too, between statements.
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
            "keepalives_count": 3}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
            # Documents and JSON built in SQL come back as their text, as on SQLite.
            for name in ("json", "jsonb"):
                conn.adapters.register_loader(name, TextLoader)
            await conn.execute("SET TIME ZONE 'UTC'")
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {_reason(exc)}") from exc
        self._conn = conn
        return conn

    def _sql(self, sql: str) -> str:
        found = self._translated.get(sql)
        if found is None:
            found = self._translated[sql] = translate(sql)
        return found

    async def _call(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """``work`` on the connection, within ``timeout_s``: a server that stops
        answering (hung, or cut off without a reset) is a DatabaseError, not a wait for
        ever; the connection is then dropped, and opened again at the next statement."""
        import psycopg

        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await work(conn)
        except TimeoutError as exc:
            self._in_transaction = False
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.close()
            raise DatabaseError(f"PostgreSQL did not answer in {self.timeout_s:g} s"
                                ) from exc
        except psycopg.Error as exc:
            raise DatabaseError(_reason(exc)) from exc

    def execute(self, sql: str, params: Params = ()) -> Statement:
        async def work(conn: psycopg.AsyncConnection[Any]) -> Cursor:
            cur = await conn.execute(self._sql(sql), _params(params))
            rows = await cur.fetchall() if cur.description is not None else []
            return _PgCursor(cur.description, cur.rowcount, list(rows))

        return Statement(lambda: self._call(work))

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        batch = [_params(r) for r in rows]
        if not batch:
            return

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(self._sql(sql), batch)

        await self._call(work)

    async def executescript(self, script: str) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(script.encode())  # no placeholders: run as written

        await self._call(work)

    async def _simple(self, statement: str) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(statement.encode())

        await self._call(work)

    async def begin(self) -> None:
        if not self._in_transaction:
            await self._simple("BEGIN")
            self._in_transaction = True

    async def commit(self) -> None:
        if self._in_transaction:
            self._in_transaction = False
            await self._simple("COMMIT")

    async def rollback(self) -> None:
        if self._in_transaction:
            self._in_transaction = False
            if self._conn is not None and not self._conn.closed and not self._conn.broken:
                await self._simple("ROLLBACK")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _params(params: Params) -> Params:
    if isinstance(params, Mapping):
        return dict(params)
    return tuple(params)


def _reason(exc: Exception) -> str:
    """psycopg's message without its libpq context lines (which may name the host)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_postgres_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))
