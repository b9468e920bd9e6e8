"""Results for every audience: documents that validate against the published JSON Schema
(SUCCEEDED, FAILED, SKIPPED), the views per audience, `pxsgate results` filters and formats,
the read-only HTTP API, and a store written by the previous schema migrated in place."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from pxsgate.results import ResultDocument
from pxsgate.service.gateway import Gateway
from pxsgate.store import MIGRATIONS, Store

from .conftest import free_port, pxsgate, write_config
from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

TOKEN = "reader-token-0123456789abcdef0123456789"  # at least 32 characters (serve refuses less)


def schema_validator() -> jsonschema.Draft202012Validator:
    text = resources.files("pxsgate").joinpath("schemas/result-document.schema.json")
    schema = json.loads(text.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def assert_valid(doc: dict[str, Any]) -> None:
    errors = [f"{e.json_path}: {e.message}" for e in schema_validator().iter_errors(doc)]
    assert not errors, errors


@dataclass
class Site:
    gw: Gateway
    http: str
    tmp: Path
    docs: dict[str, dict[str, Any]]  # by outcome: scored, second, other, skipped, failed
    token: str


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    async with gateway(tmp_path, http_port=port,
                       http_token_file=tmp_path / "token") as (gw, model):
        docs: dict[str, dict[str, Any]] = {}
        first = ap_study(71, "RES")
        await send(gw, first, calling_ae="ROUTER-A")
        docs["scored"] = await result_of(gw, str(first[0].StudyInstanceUID))
        pa = ap_study(72, "RES", series_description="CHEST PA")
        for ds in pa:
            ds.ViewPosition = "PA"
        await send(gw, pa, calling_ae="ROUTER-B")
        docs["skipped"] = await result_of(gw, str(pa[0].StudyInstanceUID))
        model.fail = True
        bad = ap_study(73, "RES")
        await send(gw, bad)
        docs["failed"] = await result_of(gw, str(bad[0].StudyInstanceUID))
        model.fail = False
        yield Site(gw, f"http://127.0.0.1:{port}", tmp_path, docs, TOKEN)


async def test_every_outcome_validates_against_the_schema(site: Site) -> None:
    statuses = {k: (d["status"], d["exitCode"]) for k, d in site.docs.items()}
    assert statuses == {"scored": ("SUCCEEDED", 0), "skipped": ("SKIPPED", 0),
                        "failed": ("FAILED", 2)}
    for doc in site.docs.values():
        assert_valid(doc)
        # The typed document reads a stored one back to the same JSON, key order included.
        again = ResultDocument.from_json(doc)
        assert json.dumps(again.to_json()) == json.dumps(doc)
        assert again.status == doc["status"]
    stages = site.docs["scored"]["pxsgate"]["stages"]
    assert list(stages) == ["received", "released", "ready", "inferred", "stored"]
    assert stages["received"] <= stages["ready"] <= stages["inferred"] <= stages["stored"]
    assert site.docs["scored"]["pxsgate"]["senders"] == ["ROUTER-A"]
    assert site.docs["failed"]["errorMessage"].startswith("inference failed")


def test_the_schema_rejects_what_listing_3_forbids() -> None:
    validator = schema_validator()
    doc = {"version": "0.2.4", "id": "00000000-0000-4000-8000-000000000000",
           "status": "SUCCEEDED", "studyInstanceUid": "1.2.3", "patientId": "P",
           "accessionNumber": "A", "siteId": "H", "createdAt": "2026-11-26T10:00:00+01:00",
           "updatedAt": "2026-11-26T10:00:01+01:00", "exitCode": 0, "errorMessage": "",
           "model": {"id": "m-1", "name": "m", "displayName": "m", "version": "1",
                     "author": "a", "description": "d", "createdAt": "2026-01-01T00:00:00Z"},
           "results": [], "entities": [],
           "pxsgate": {"version": "0.1.0", "flags": [], "headline": None, "selection": None,
                       "stages": {}}}
    # SUCCEEDED without a score, a FAILED without a reason, a timestamp without offset.
    assert not validator.is_valid(doc)
    assert not validator.is_valid({**doc, "status": "FAILED", "exitCode": 2})
    assert validator.is_valid({**doc, "status": "FAILED", "exitCode": 2,
                               "errorMessage": "inference failed"})
    assert not validator.is_valid({**doc, "status": "SKIPPED", "errorMessage": "no AP",
                                   "createdAt": "2026-11-26T10:00:00"})


async def test_views_per_audience(site: Site) -> None:
    db = sqlite3.connect(site.gw.config.db_path)
    db.row_factory = sqlite3.Row
    scored = site.docs["scored"]
    rows = {r["study_instance_uid"]: dict(r) for r in db.execute("SELECT * FROM radiologist_view")}
    mine = rows[scored["studyInstanceUid"]]
    assert (mine["patient_id"], mine["accession_number"]) == (scored["patientId"],
                                                              scored["accessionNumber"])
    assert mine["pxs_score"] == float(scored["pxsgate"]["headline"]["value"])
    assert mine["study_time"] == scored["pxsgate"]["studyDateTime"]

    research = [dict(r) for r in db.execute("SELECT * FROM researcher_view")]
    assert len(research) == 3
    identifiers = {d[k] for d in site.docs.values()
                   for k in ("patientId", "accessionNumber", "studyInstanceUid")}
    for row in research:  # de-identified: no MRN, accession or study UID in any column
        assert not identifiers & {str(v) for v in row.values()}
        assert len(row["patient_hash"]) == 32
    by_id = {r["result_id"]: r for r in research}
    assert by_id[scored["id"]]["pxs_score"] == mine["pxs_score"]
    assert by_id[scored["id"]]["model_version"] == "2"
    assert by_id[scored["id"]]["ready_to_stored_s"] >= 0

    support = {r["result_id"]: dict(r) for r in db.execute("SELECT * FROM support_view")}
    failed = support[site.docs["failed"]["id"]]
    assert (failed["status"], failed["exit_code"]) == ("FAILED", 2)
    assert (failed["job_state"], failed["attempts"]) == ("failed", 3), "tried 3 times"
    assert failed["error_message"].startswith("inference failed")
    skipped = support[site.docs["skipped"]["id"]]
    assert skipped["senders"] == "ROUTER-B"
    assert "PA" in skipped["image_reasons"]
    assert skipped["received_to_stored_s"] >= skipped["ready_to_stored_s"] >= 0


async def test_patient_hash_is_keyed_and_follows_the_patient(site: Site) -> None:
    store = site.gw.store
    key = store.patient_key("MRN457")
    assert key == store.patient_key("MRN457") != store.patient_key("MRN458")
    import hashlib
    assert key not in hashlib.sha256(b"MRN457").hexdigest()  # not a plain, guessable hash


def _cli(site: Site, *args: str) -> str:
    out = pxsgate("results", "--config", site.tmp / "pxsgate.yaml", *args)
    return out.stdout


async def test_results_command_filters_and_formats(site: Site) -> None:
    def uids(*args: str) -> set[str]:
        return {d["studyInstanceUid"] for d in json.loads(_cli(site, "--json", *args))}

    everything = {d["studyInstanceUid"] for d in site.docs.values()}
    failed = site.docs["failed"]
    assert await asyncio.to_thread(uids) == everything
    assert await asyncio.to_thread(uids, "--status", "FAILED") == {failed["studyInstanceUid"]}
    assert await asyncio.to_thread(uids, "--model", "Fast-2") == everything
    assert await asyncio.to_thread(uids, "--model", "PxsScore-0.1") == set()
    assert await asyncio.to_thread(uids, "--accession", failed["accessionNumber"]) == {
        failed["studyInstanceUid"]}
    assert await asyncio.to_thread(uids, "--since", "2000-01-01") == everything
    assert await asyncio.to_thread(uids, "--since", "2999-01-01T00:00+05:00") == set()
    text = await asyncio.to_thread(_cli, site, "--csv", "--status", "SUCCEEDED")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["status"] for r in rows] == ["SUCCEEDED"]
    assert rows[0]["score (headline first) / reason"] == site.docs["scored"]["results"][0][
        "value"]
    table = await asyncio.to_thread(_cli, site)
    assert "(3 result(s))" in table
    bad = await asyncio.to_thread(pxsgate, "results", "--config", site.tmp / "pxsgate.yaml",
                                  "--since", "yesterday", check=False)
    assert bad.returncode == 2
    assert "since" in bad.stderr


async def _get(site: Site, path: str, token: str | None = TOKEN
               ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(
            site.http + path, headers=headers) as response:
        return response.status, await response.json()


async def test_http_api_answers_read_only_queries(site: Site) -> None:
    scored = site.docs["scored"]
    status, body = await _get(site, "/healthz", token=None)
    assert status == 200
    assert body["ok"]
    assert body["model"]["id"] == "Fast-2"
    assert body["deliveries"] == {"pending": 0, "dead": 0, "inFlight": 0}

    status, body = await _get(site, f"/results?patient_id={scored['patientId']}")
    assert status == 200
    assert [d["id"] for d in body] == [scored["id"]]
    status, body = await _get(site, "/results?status=FAILED&since=2000-01-01")
    assert [d["id"] for d in body] == [site.docs["failed"]["id"]]
    status, body = await _get(site, "/results?limit=2")  # the latest two, oldest first
    assert [d["id"] for d in body] == [site.docs["skipped"]["id"], site.docs["failed"]["id"]]

    status, body = await _get(site, f"/studies/{scored['studyInstanceUid']}")
    assert status == 200
    assert body["result"] == scored
    # No exporters here: a study whose result is stored has nothing left to do.
    assert {k: body["study"][k] for k in ("state", "outcome", "attempts")} == {
        "state": "stored", "outcome": "SUCCEEDED", "attempts": 1}
    assert [i["calling_ae"] for i in body["instances"]] == ["ROUTER-A"]
    assert [d["rule"] for d in body["decisions"]] == ["chest-radiograph", "ap-in-description"]

    assert (await _get(site, "/studies/1.2.3.4"))[0] == 404
    assert (await _get(site, "/results?since=yesterday"))[0] == 400
    assert (await _get(site, "/results?patient=x"))[0] == 400
    assert (await _get(site, "/results", token=None))[0] == 401
    assert (await _get(site, "/results", token="wrong"))[0] == 401
    async with aiohttp.ClientSession() as session, session.post(
            site.http + "/results", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 405  # no write endpoints


async def test_a_store_from_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    db_path = tmp_path / "pxsgate.sqlite3"
    db = sqlite3.connect(db_path)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    old = {"id": "11111111-1111-4111-8111-111111111111", "studyInstanceUid": "1.2.3",
           "patientId": "MRN1", "accessionNumber": "A1", "status": "SUCCEEDED",
           "createdAt": "2026-11-26T10:00:00.000+01:00", "model": {"id": "PxsScore-0.1"},
           "pxsgate": {"headline": {"value": "0.5"}}}
    db.execute("""INSERT INTO results (id, study_instance_uid, patient_id, accession_number,
                      model_id, status, created_at, document) VALUES (?,?,?,?,?,?,?,?)""",
               (old["id"], "1.2.3", "MRN1", "A1", "PxsScore-0.1", "SUCCEEDED",
                old["createdAt"], json.dumps(old)))
    db.commit()
    db.close()
    store = Store(db_path)
    await store.open()
    await store.close()
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    created_utc, key = db.execute("SELECT created_utc, patient_key FROM results").fetchone()
    assert created_utc == "2026-11-26T09:00:00.000Z"  # the offset applied
    assert len(key) == 32
    assert db.execute("SELECT pxs_score FROM radiologist_view").fetchone() == (0.5,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("command", [("results",), ("results", "--json"), ("outbox", "list")])
async def test_a_closed_pipe_ends_the_command_quietly(site: Site, command: tuple[str, ...]
                                                      ) -> None:
    """`pxsgate results | head -1`: the reader goes away before the output is written. The
    command exits as the Python docs' SIGPIPE recipe does: no traceback, exit 1."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "pxsgate", *command, "--config", str(site.tmp / "pxsgate.yaml")]
    proc = await asyncio.to_thread(
        subprocess.Popen, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    stderr = (await asyncio.to_thread(proc.stderr.read)).decode()
    code = await asyncio.to_thread(proc.wait, 60)
    assert "BrokenPipeError" not in stderr
    assert stderr == ""
    assert code == 1


async def test_hostile_authorization_headers_get_401_then_429(site: Site) -> None:
    """Before any login: a non-UTF-8 Authorization header is a 401, not a 500; failed tries
    are logged without the token, and past ten a minute the peer gets 429 + Retry-After,
    even with the right token, while other paths' open endpoints still answer."""
    from structlog.testing import capture_logs

    port = int(site.http.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /results HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer \xe9\xff\xfe-latin1\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]

    secret_guess = "guess-" + "x" * 40
    with capture_logs() as logs:
        statuses = [(await _get(site, "/results", token=secret_guess))[0] for _ in range(9)]
    assert statuses == [401] * 9  # the raw request above was the first failure
    assert (await _get(site, "/results"))[0] == 429, "locked out, the right token too"
    async with aiohttp.ClientSession() as session, session.get(
            site.http + "/results", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
    assert (await _get(site, "/healthz", token=None))[0] == 200
    failed = [e for e in logs if e["event"] == "http.unauthorized"]
    assert len(failed) == 9
    assert failed[-1]["locked_out"] is True
    assert all(secret_guess not in json.dumps(e, default=str) for e in logs)


def test_a_short_bearer_token_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("short\n")
    config = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", http_port=free_port(),
                          http_token_file=tmp_path / "token")
    run = pxsgate("serve", "--config", config, check=False, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "http.bearer-token-file" in run.stderr
    assert "fewer than 32" in run.stderr
