"""`pxsgate trace STUDY_UID` (one study's whole story) and `pxsgate status` (the service at a
glance), run as a user would: the real command line against the store an in-process gateway
wrote, and against that gateway's /healthz while it runs."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import free_port, pxsgate, write_config
from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

STAGES = ("received", "released", "ready", "inference-started", "inferred", "stored")


@dataclass
class Stored:
    config: Path
    scored: dict[str, Any]  # the result document of a study of two AP images
    skipped: dict[str, Any]  # a PA study: not a candidate
    detail: dict[str, Any]  # the store's study_detail of the scored one


async def _feed(gw: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    two = ap_study(81, "TRC", images=2)
    await send(gw, two, calling_ae="ROUTER-T")
    scored = await result_of(gw, str(two[0].StudyInstanceUID))
    pa = ap_study(82, "TRC", series_description="CHEST PA")
    for ds in pa:
        ds.ViewPosition = "PA"
    await send(gw, pa, calling_ae="ROUTER-P")
    skipped = await result_of(gw, str(pa[0].StudyInstanceUID))
    detail = await gw.store.study_detail(scored["studyInstanceUid"])
    assert detail is not None
    return scored, skipped, detail


@pytest.fixture
async def stored(tmp_path: Path) -> Stored:
    async with gateway(tmp_path) as (gw, _model):
        scored, skipped, detail = await _feed(gw)
    return Stored(tmp_path / "pxsgate.yaml", scored, skipped, detail)


def _lines_with(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


async def test_trace_tells_the_whole_story_of_a_study(stored: Stored) -> None:
    uid = stored.scored["studyInstanceUid"]
    assert (stored.scored["status"], len(stored.scored["results"])) == ("SUCCEEDED", 2)
    out = await asyncio.to_thread(pxsgate, "trace", uid, "--config", stored.config)
    text = out.stdout
    assert f"study {uid}" in text
    assert "job: stored, outcome SUCCEEDED, 1 inference try" in text

    # The association: its id, the sender's AE title -> the called AE title, the peer.
    assoc = {i["association_id"] for i in stored.detail["instances"]}
    assert len(assoc) == 1
    (line,) = _lines_with(text, f"association {assoc.pop()}:")
    assert "ROUTER-T → PxsScore from 127.0.0.1" in line
    assert "2 instance(s)" in line
    assert len(_lines_with(text, "Computed Radiography Image Storage")) == 2
    assert len(_lines_with(text, "received once")) == 2

    # Selection: the study-level rule, then each image's rule and verdict.
    decisions = stored.detail["decisions"]
    study_rule = next(d["rule"] for d in decisions if d["sop_instance_uid"] is None)
    assert _lines_with(text, f"study: CANDIDATE [{study_rule}]")
    images = [d for d in decisions if d["sop_instance_uid"] is not None]
    assert len(images) == 2
    for d in images:
        verdict = "selected" if d["selected"] else "excluded"
        assert any(f"[{d['rule']}]" in line and verdict in line
                   for line in _lines_with(text, d["reason"])), d
    assert "flags: multiple-ap-images" in text

    # Timings: every stage, each after the first with the time since the one before.
    for n, stage in enumerate(STAGES):
        pattern = rf"^  {re.escape(stage)}\s+\S+" + (r"  \+\d+(\.\d+)? (ms|s)$" if n else "$")
        assert re.search(pattern, text, re.MULTILINE), (stage, text)
    assert re.search(r"total received → stored: \d", text)
    if "inference" in stored.scored["pxsgate"]:  # tries and batch sizes, where recorded
        assert "inference: 1 attempt(s)" in text

    # The result: each image's score, the headline marked once.
    assert f"result {stored.scored['id']}: SUCCEEDED, exitCode 0" in text
    for entry in stored.scored["results"]:
        assert _lines_with(text, f"score {entry['value']}")
    (headline,) = _lines_with(text, "(headline)")
    assert stored.scored["pxsgate"]["headline"]["value"] in headline
    assert "deliveries (0)" in text

    # PHI: only on request.
    patient, accession = stored.scored["patientId"], stored.scored["accessionNumber"]
    assert patient == "TRC-081"
    assert patient not in text
    assert accession not in text
    assert "DEMO^" not in text
    phi = (await asyncio.to_thread(pxsgate, "trace", uid, "--config", stored.config,
                                   "--phi")).stdout
    assert f"patient {patient}, accession {accession}" in phi


async def test_trace_json_and_unknown_study(stored: Stored) -> None:
    uid = stored.scored["studyInstanceUid"]
    out = await asyncio.to_thread(pxsgate, "trace", uid, "--config", stored.config, "--json")
    detail = json.loads(out.stdout)
    assert detail["result"]["id"] == stored.scored["id"]
    assert detail["result"]["results"] == stored.scored["results"]
    assert [i["calling_ae"] for i in detail["instances"]] == ["ROUTER-T", "ROUTER-T"]
    assert stored.scored["patientId"] not in out.stdout
    assert stored.scored["accessionNumber"] not in out.stdout
    phi = await asyncio.to_thread(pxsgate, "trace", uid, "--config", stored.config, "--json",
                                  "--phi")
    assert json.loads(phi.stdout)["result"] == stored.scored

    skipped = stored.skipped["studyInstanceUid"]
    text = (await asyncio.to_thread(pxsgate, "trace", skipped, "--config",
                                    stored.config)).stdout
    assert "outcome SKIPPED" in text
    assert "study: not a candidate" in text
    assert f"result {stored.skipped['id']}: SKIPPED" in text
    assert "inference-started" not in text, "a skipped study never reached the model"
    assert "ROUTER-P" in text

    unknown = await asyncio.to_thread(pxsgate, "trace", "1.2.3.4.5", "--config",
                                      stored.config, check=False)
    assert unknown.returncode == 1
    assert "no study 1.2.3.4.5 in the store" in unknown.stderr


async def test_status_with_the_service_stopped(stored: Stored) -> None:
    out = await asyncio.to_thread(pxsgate, "status", "--config", stored.config)
    text = out.stdout
    assert out.returncode == 0
    assert "not reachable (http.port is 0): figures from the store" in text
    assert "last hour  2 result(s): SUCCEEDED 1, SKIPPED 1" in text
    for doc in (stored.scored, stored.skipped):
        key = _key(stored, doc["studyInstanceUid"])
        by_key = await asyncio.to_thread(pxsgate, "trace", key, "--config", stored.config)
        assert f"study {doc['studyInstanceUid']}\n" in by_key.stdout, "trace takes the key"
        (line,) = _lines_with(text, key)
        assert doc["status"] in line
        assert doc["studyInstanceUid"] not in text, "study keys only"
        assert doc["patientId"] not in text
        assert doc["accessionNumber"] not in text
    assert f"score {stored.scored['pxsgate']['headline']['value']}" in text
    assert "errors in the last hour: 0 FAILED result(s), 0 dead-lettered deliveries" in text
    assert re.search(r"disk +spool \d+(\.\d)? KiB .* free on ", text), text
    assert "unfinished in the store: receiving 0, ready 0, selected 0, inferring 0" in text

    report = json.loads((await asyncio.to_thread(
        pxsgate, "status", "--config", stored.config, "--json")).stdout)
    assert report["service"] is None
    assert report["store"]["resultsLastHour"] == {"SUCCEEDED": 1, "SKIPPED": 1}
    assert [r["status"] for r in report["store"]["lastResults"]] == ["SKIPPED", "SUCCEEDED"]


@contextmanager
def unhealthy_service() -> Iterator[int]:
    """A stand-in /healthz that answers 503 with a report of a dead model worker."""
    body = json.dumps({"ok": False, "store": True, "model": {"ok": False, "id": "Fast-2"},
                       "dicomPort": 11112, "uptimeSeconds": 7300.0, "studiesInProgress": 1,
                       "studiesWaiting": 4, "associations": 2, "inferenceQueue": 3,
                       "spoolBytes": 2048, "deliveries": {"pending": 5, "dead": 0,
                                                          "inFlight": 1}}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503 if self.path == "/healthz" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_status_exits_1_when_the_service_reports_trouble(stored: Stored) -> None:
    with unhealthy_service() as port:
        config = write_config(stored.config.parent / "other.yaml",
                              stored.config.parent / "data", http_port=port)
        out = await asyncio.to_thread(pxsgate, "status", "--config", config, check=False)
    assert out.returncode == 1, out.stderr
    assert "service    NOT OK: up since" in out.stdout
    assert "(2 h 1 min), DICOM port 11112, model Fast-2; failing: model worker" in out.stdout
    assert ("studies in progress 1, waiting 4; inference queue 3 image(s); associations 2"
            in out.stdout)
    assert "deliveries pending 5 (in flight 1), dead 0" in out.stdout
    assert "last hour  2 result(s)" in out.stdout, "the store's figures too"


async def test_status_of_a_running_service(tmp_path: Path) -> None:
    async with gateway(tmp_path, http_port=free_port()) as (gw, model):
        model.fail = True
        bad = ap_study(83, "TRC")
        await send(gw, bad)
        failed = await result_of(gw, str(bad[0].StudyInstanceUID))
        model.fail = False
        out = await asyncio.to_thread(pxsgate, "status", "--config", tmp_path / "pxsgate.yaml")
        report = json.loads((await asyncio.to_thread(
            pxsgate, "status", "--config", tmp_path / "pxsgate.yaml", "--json")).stdout)
    text = out.stdout
    assert out.returncode == 0, out.stderr
    assert re.search(r"^service +ok: up since \S+ \S+ \(\d", text, re.MULTILINE), text
    assert f"DICOM port {gw.port}, model Fast-2" in text
    assert ("queues     studies in progress 0, waiting 0; inference queue 0 image(s); "
            "associations 0") in text
    assert "deliveries pending 0 (in flight 0), dead 0" in text
    assert "errors in the last hour: 1 FAILED result(s)" in text
    (line,) = [line for line in text.splitlines() if line.startswith("  FAILED  ")]
    assert gw.store.study_label(failed["studyInstanceUid"]) in line, "the log's study key"
    assert "exit 2: inference failed" in line
    assert failed["patientId"] not in text
    assert report["service"]["ok"] is True
    assert report["service"]["dicomPort"] == gw.port


def _key(stored: Stored, uid: str) -> str:
    """The study's key as the logs and `pxsgate status` show it (from `trace --json`)."""
    out = pxsgate("trace", uid, "--config", stored.config, "--json")
    key: str = json.loads(out.stdout)["study"]["key"]
    return key
