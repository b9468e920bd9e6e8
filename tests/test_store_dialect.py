"""The store's SQL, written in SQLite's dialect, as PostgreSQL runs it (store/db.py
translate): placeholders, literals left alone, the typed JSON paths. The statements
themselves run on both backends in test_postgres.py and test_store_states.py."""

from __future__ import annotations

from pxsgate.store.db import translate
from pxsgate.store.jsonpaths import CHANGE_DISTANCE, EXIT_CODE, HEADLINE_VALUE, PXS_SCORE, doc


def test_placeholders_become_psycopgs_and_literals_stay() -> None:
    assert translate("SELECT a FROM t WHERE b = ? AND c = :name") == (
        "SELECT a FROM t WHERE b = %s AND c = %(name)s")
    # A literal's ? and :word are text, not placeholders; every % is doubled for psycopg.
    assert translate("SELECT 'a?b :x', strftime('%Y', ?) WHERE d LIKE ?") == (
        "SELECT 'a?b :x', strftime('%%Y', %s) WHERE d LIKE %s")
    assert translate("SELECT 'it''s ?' WHERE x = ?") == "SELECT 'it''s ?' WHERE x = %s"
    assert translate("SELECT x::text") == "SELECT x::text"  # a cast, not a placeholder


def test_dialect_differences() -> None:
    # REAL is float4 on PostgreSQL: the store's numbers are doubles.
    assert translate(PXS_SCORE) == (
        f"CAST(json_extract(r.document, '{HEADLINE_VALUE}') AS DOUBLE PRECISION)")
    # JSON numbers come back typed, as SQLite's json_extract gives them; strings as text.
    assert translate(doc(EXIT_CODE)) == f"json_integer(r.document, '{EXIT_CODE}')"
    assert translate(f"json_extract(e.value, '{CHANGE_DISTANCE}')") == (
        f"json_number(e.value, '{CHANGE_DISTANCE}')")
    assert translate(doc(HEADLINE_VALUE)) == doc(HEADLINE_VALUE)
    # SQLite's unary + (keeping an index out of the plan) means nothing to PostgreSQL.
    assert translate("WHERE r.current = 1 AND +r.status = ?") == (
        "WHERE r.current = 1 AND r.status = %s")
    assert translate("SELECT a + b.c") == "SELECT a + b.c"  # a sum is kept
    # DDL (the views) keeps its literals exactly, % included.
    assert translate("SELECT strftime('%Y', x) AS REAL)", placeholders=False) == (
        "SELECT strftime('%Y', x) AS DOUBLE PRECISION)")
