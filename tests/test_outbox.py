"""The outbox: every stored result reaches every configured exporter at least once, under a
stable id, with retries, backoff, dead-lettering and `pxsgate outbox retry`; pending
deliveries survive a stop and a SIGKILL. Real HTTP(S) receivers on loopback, and at the end
the outbox alone over a real store, with a fake exporter and a fake clock."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pxsgate.config import ExporterConfig
from pxsgate.delivery.outbox import POLL_SECONDS, Outbox, backoff_seconds
from pxsgate.records import ScoredImage
from pxsgate.results import ModelInfo, StudyIdentity, build_document
from pxsgate.store import Delivery, Store, delivery_id

from .conftest import pxsgate, write_config
from .fakes import WAIT_SECONDS, FakeClock, FakeExporter
from .http_receiver import http_receiver, server_tls
from .inprocess import eventually, gateway, result_of, send
from .test_lifecycle import ap_study, wait_until
from .test_tls import make_pki


def http_exporter(url: str, name: str = "results-db", **settings: Any) -> str:
    settings = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2, **settings}
    lines = [f"  - name: {name}", "    type: http", f"    url: {url}"]
    lines += [f"    {k.replace('_', '-')}: {v}" for k, v in settings.items()]
    return "exporters:\n" + "\n".join(lines) + "\n"


async def deliveries(gw: Any) -> list[Delivery]:
    found: list[Delivery] = await gw.store.deliveries()
    return found


async def settled(gw: Any, count: int = 1) -> list[Delivery]:
    """Wait until ``count`` deliveries exist and none is pending."""
    async def check() -> list[Delivery] | None:
        rows = await deliveries(gw)
        done = len(rows) >= count and all(d.state != "pending" for d in rows)
        return rows if done else None
    found: list[Delivery] = await eventually(check, 30, "the deliveries to settle")
    return found


async def test_retried_with_backoff_until_delivered_once_under_a_stable_id(
        tmp_path: Path, storage: str) -> None:
    with http_receiver() as receiver:
        receiver.answers = [503, 502]  # down for two tries, then back
        async with gateway(tmp_path, http_exporter(receiver.url),
                           storage=storage) as (gw, _):
            study = ap_study(61, "OUTBOX")
            await send(gw, study)
            doc = await result_of(gw, str(study[0].StudyInstanceUID))
            [row] = await settled(gw)
            detail = await gw.store.study_detail(str(study[0].StudyInstanceUID))
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, "")
    assert detail is not None
    assert detail["study"]["state"] == "exported", "the job's last state"
    assert row.id == delivery_id(doc["id"], "results-db")
    assert [r.status for r in receiver.requests] == [503, 502, 200]
    # The same delivery id on every try: the receiver de-duplicates on it.
    assert {r.headers["Idempotency-Key"] for r in receiver.requests} == {row.id}
    assert receiver.requests[-1].headers["X-Pxsgate-Result-Id"] == doc["id"]
    assert receiver.requests[-1].document == doc


async def test_every_status_goes_to_http_but_only_selected_statuses_are_queued(
        tmp_path: Path) -> None:
    extra = http_exporter("http://127.0.0.1:9/unused", name="scores-only",
                          statuses="[SUCCEEDED]")
    with http_receiver() as receiver:
        extra += http_exporter(receiver.url).removeprefix("exporters:\n")
        async with gateway(tmp_path, extra) as (gw, model):
            model.fail = True
            failed = ap_study(62, "FAILS")
            await send(gw, failed)
            doc = await result_of(gw, str(failed[0].StudyInstanceUID))
            assert (doc["status"], doc["exitCode"]) == ("FAILED", 2)
            [row] = await settled(gw)
    # The FAILED result went to the exporter that takes every status, not to scores-only.
    assert (row.exporter, row.state) == ("results-db", "delivered")
    assert receiver.accepted()[0].document["status"] == "FAILED"


async def test_dead_letter_after_max_attempts_then_outbox_retry_revives(
        tmp_path: Path, storage: str) -> None:
    with http_receiver() as receiver:
        receiver.answers = [500] * 3
        async with gateway(tmp_path, http_exporter(receiver.url, max_attempts=3),
                           storage=storage) as (gw, _):
            study = ap_study(63, "DEAD")
            await send(gw, study)
            [row] = await settled(gw)
            assert (row.state, row.attempts) == ("dead", 3)
            assert "HTTP 500" in row.last_error
            config = str(tmp_path / "pxsgate.yaml")
            listed = await asyncio.to_thread(pxsgate, "outbox", "list", "--config", config,
                                             "--state", "dead", "--json")
            assert [d["id"] for d in json.loads(listed.stdout)] == [row.id]
            # The endpoint is fixed; an operator retries the dead ones from another process.
            out = await asyncio.to_thread(pxsgate, "outbox", "retry", "--config", config)
            assert out.stdout.startswith("1 delivery due now")

            async def delivered() -> bool:
                return [d.state for d in await deliveries(gw)] == ["delivered"]
            await eventually(delivered, 20, "the revived delivery")
    assert [r.status for r in receiver.requests] == [500, 500, 500, 200]


@pytest.mark.parametrize(("status", "words"), [
    (422, ("HTTP 422",)),
    # A 302 (a proxy moving the endpoint) would turn the POST into a GET whose 200 looked
    # like a delivery: the document is not delivered, so the delivery is dead, saying why.
    (302, ("HTTP 302", "redirect, not followed")),
], ids=["refusal", "redirect"])
async def test_a_refusal_or_redirect_is_dead_lettered_at_once(
        tmp_path: Path, status: int, words: tuple[str, ...]) -> None:
    with http_receiver() as receiver:
        receiver.answers = [status]
        async with gateway(tmp_path, http_exporter(receiver.url)) as (gw, _):
            await send(gw, ap_study(64, "REFUSED"))
            [row] = await settled(gw)
    assert (row.state, row.attempts) == ("dead", 1)
    for word in words:
        assert word in row.last_error
    assert receiver.gets == 0, "the redirect was not followed"


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs openssl")
async def test_https_with_client_certificate_and_bearer_token(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    (tmp_path / "token").write_text("s3cret-token\n")
    with http_receiver(server_tls(pki)) as receiver:
        receiver.token = "s3cret-token"
        extra = http_exporter(receiver.url, ca_certificates=pki / "ca.pem",
                              client_certificate=pki / "client.pem",
                              client_key=pki / "client.key",
                              bearer_token_file=tmp_path / "token")
        async with gateway(tmp_path, extra) as (gw, _):
            await send(gw, ap_study(65, "TLS"))
            [row] = await settled(gw)
    assert row.state == "delivered"
    [request] = receiver.requests
    assert (request.status, request.client_cn) == (200, "client")


async def test_without_the_ca_the_server_is_not_trusted(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    with http_receiver(server_tls(pki, require_client=False)) as receiver:
        async with gateway(tmp_path, http_exporter(receiver.url, max_attempts=1)) as (gw, _):
            await send(gw, ap_study(66, "UNTRUSTED"))
            [row] = await settled(gw)
    assert row.state == "dead"
    assert "certificate" in row.last_error.lower()
    assert receiver.requests == []


async def test_pending_deliveries_survive_a_stop(tmp_path: Path, storage: str) -> None:
    with http_receiver() as receiver:
        receiver.answers = [503] * 1000
        extra = http_exporter(receiver.url, backoff_initial_seconds=30, backoff_max_seconds=60)
        async with gateway(tmp_path, extra, storage=storage) as (gw, _):
            await send(gw, ap_study(67, "STOPPED"))

            async def tried() -> bool:
                return any(d.attempts for d in await deliveries(gw))
            await eventually(tried, 30, "a first try")
        receiver.answers.clear()
        async with gateway(tmp_path, http_exporter(receiver.url),
                           storage=storage) as (gw, _):
            # Due in 30 s by the old backoff; a retry makes it due now.
            await gw.store.retry_deliveries("2026-01-01T00:00:00+00:00", time.time(),
                                            state="pending")
            gw.outbox.wake()
            [row] = await settled(gw)
    assert row.state == "delivered"
    assert len(receiver.accepted()) == 1


def test_sigkill_mid_delivery_resends_the_same_delivery(tmp_path: Path) -> None:
    """A delivery in flight when the process dies is sent again after the restart, under the
    same id: at least once, and the receiver can tell it is the same one."""
    from .conftest import Service, start_service, stop_service

    with http_receiver() as receiver:
        receiver.hold.set()  # the endpoint takes the request and never answers
        svc: Service = start_service(tmp_path, extra=http_exporter(receiver.url))
        study = ap_study(68, "KILLED")
        try:
            from pxsgate.tools.scu import send_datasets
            assert send_datasets("127.0.0.1", svc.port, study).ok
            wait_until(lambda: receiver.arrived > 0, what="the POST to arrive")
        finally:
            os.kill(svc.process.pid, signal.SIGKILL)
            svc.process.wait(30)
        receiver.hold.clear()
        receiver.release.set()  # the held request is answered, to a dead peer
        svc = start_service(tmp_path, extra=http_exporter(receiver.url))
        try:
            wait_until(lambda: len(receiver.accepted()) >= 2, what="the re-sent delivery")
            # The re-sent delivery is committed right after the receiver answers it.
            time.sleep(0.5)
            rows = json.loads(pxsgate("outbox", "list", "--config", svc.config,
                                      "--json").stdout)
        finally:
            assert stop_service(svc) == 0
    assert [r["state"] for r in rows] == ["delivered"]
    keys = {r.headers["Idempotency-Key"] for r in receiver.requests}
    assert keys == {rows[0]["id"]}


def test_check_config_refuses_a_broken_exporter(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path / "d",
                        extra="exporters:\n  - name: pacs\n    type: dicom\n    host: h\n")
    out = pxsgate("check-config", "--config", path, check=False)
    assert out.returncode == 2
    assert "exporters[0].port: is required for a dicom exporter" in out.stderr


def test_serve_exits_when_the_token_file_is_missing(tmp_path: Path) -> None:
    extra = http_exporter("https://localhost:9/x", bearer_token_file=tmp_path / "nope")
    path = write_config(tmp_path / "c.yaml", tmp_path / "d", extra=extra)
    out = subprocess.run([sys.executable, "-m", "pxsgate", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "exporters[0].bearer-token-file: cannot read" in out.stderr



def dicom_exporter(port: int, **settings: Any) -> str:
    lines = ["exporters:", "  - name: pacs", "    type: dicom", "    host: 127.0.0.1",
             f"    port: {port}", "    ae-title: PACS", "    calling-ae-title: PXSGATE",
             "    timeout-seconds: 5", "    backoff-initial-seconds: 0.2",
             "    backoff-max-seconds: 0.5"]
    lines += [f"    {k.replace('_', '-')}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.dcmtk
async def test_sr_reaches_the_pacs_once_it_listens(tmp_path: Path) -> None:
    """The DICOM exporter's SR, through the outbox to DCMTK's storescp: refused while the PACS
    is down, delivered once it is up; the received SR measures the stored score on the
    source image, in the source's study."""
    import highdicom as hd
    import pydicom

    from pxsgate.delivery.sr import uid_from_id

    from .conftest import free_port
    from .test_sr import PXS_SCORE, _storescp

    port = free_port()
    async with gateway(tmp_path, dicom_exporter(port)) as (gw, _):
        study = ap_study(69, "SR")
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))

        async def failed_once() -> bool:
            return any(d.attempts for d in await deliveries(gw))
        await eventually(failed_once, 30, "a refused try")
        [row] = await deliveries(gw)
        assert row.state == "pending"
        assert "127.0.0.1" in row.last_error
        pacs_dir = tmp_path / "pacs"
        with _storescp(pacs_dir, port=port):
            [row] = await settled(gw)
    assert row.state == "delivered"
    [path] = list(pacs_dir.iterdir())
    raw = pydicom.dcmread(path)
    assert raw.StudyInstanceUID == doc["studyInstanceUid"]
    # Derived from the result and the exporter: a retried delivery is the same instance.
    assert raw.SOPInstanceUID == uid_from_id(f"{doc['id']}/pacs/sr")
    assert raw.InstanceNumber == 1
    assert "PredecessorDocumentsSequence" not in raw
    assert "not for clinical use" not in raw.SeriesDescription  # the stand-in model
    [group] = hd.sr.srread(path).content.get_image_measurement_groups()
    [measurement] = group.get_measurements(name=PXS_SCORE)
    assert measurement.value == pytest.approx(float(doc["results"][0]["value"]))
    [image] = measurement.referenced_images
    assert image.referenced_sop_instance_uid == study[0].SOPInstanceUID


def test_backoff_doubles_up_to_the_cap_with_half_of_it_jitter() -> None:
    import random

    from pxsgate.config import ExporterConfig
    from pxsgate.delivery.outbox import backoff_seconds

    config = ExporterConfig(name="x", type="http", url="https://x", backoff_initial_seconds=2,
                            backoff_max_seconds=60)
    rng = random.Random(7)
    for tries, base in [(1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (40, 60)]:
        waits = [backoff_seconds(tries, config, rng) for _ in range(200)]
        assert base / 2 <= min(waits) < max(waits) <= base
        assert max(waits) - min(waits) > base / 4  # spread: senders do not retry in step


async def test_rate_limit_spaces_deliveries() -> None:
    from pxsgate.delivery.outbox import throttler

    limiter = throttler(20.0)  # 20 per second, in bursts of at most 20
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(40):
        await limiter.acquire()
    assert loop.time() - started >= 0.9  # the second 20 wait out the first second
    assert (throttler(0.5).rate_limit, throttler(0.5).period) == (1, 2.0)


# --- the outbox itself, over a real store, with a fake exporter and a fake clock ----------

FAKE_SEED = 19


def fake_config(**settings: Any) -> ExporterConfig:
    return ExporterConfig(**{"name": "fake", "type": "http", "url": "https://fake.invalid",
                             "backoff_initial_seconds": 2.0, "backoff_max_seconds": 60.0,
                             **settings})


@dataclass
class Rig:
    outbox: Outbox
    store: Store
    exporter: FakeExporter
    clock: FakeClock
    config: ExporterConfig

    async def queue(self, n: int = 1) -> str:
        """Store a result bound for the fake exporter, due now; return its delivery's id."""
        uid = f"1.2.826.0.1.3680043.10.1119.{n}"
        identity = StudyIdentity(uid, f"MRN{n}", f"ACC{n}", "2026-03-01T10:00:00")
        created = "2026-03-01T11:00:00.000+01:00"
        doc = build_document(status="SUCCEEDED", identity=identity, site_id="TEST",
                             model=FAKE_MODEL, created_at=created, updated_at=created,
                             scores=[ScoredImage(f"{uid}.1.1", f"{uid}.1", 0.5)])
        [delivery] = await self.store.store_result(doc, "stored", exporters=["fake"],
                                                   now=self.clock.time())
        self.outbox.wake()
        return delivery

    async def row(self, until: Callable[[Delivery], bool]) -> Delivery:
        """The one delivery, once ``until`` holds for it."""
        async def check() -> Delivery | None:
            [row] = await self.store.deliveries()
            return row if until(row) else None
        found: Delivery = await eventually(check, WAIT_SECONDS, "the delivery's row")
        return found

    async def due_in(self, tries: int) -> float:
        """Seconds until the retry after the ``tries``-th failed try is due."""
        row = await self.row(lambda r: r.attempts == tries)
        assert row.state == "pending"
        return row.next_attempt_at - self.clock.time()

    async def sleeps_for(self, seconds: float) -> None:
        """Wait until the outbox has armed a timer ``seconds`` from now (and sleeps, rather
        than polling the store in a loop)."""
        async def armed() -> bool:
            return any(t == pytest.approx(self.clock.now + seconds) for t in self.clock.armed)
        await eventually(armed, WAIT_SECONDS, f"a timer in {seconds:.3f} s")


FAKE_MODEL = ModelInfo("PxsScore", "0.1", "tests", "outbox tests",
                       "2026-01-01T00:00:00+00:00", "ab" * 32)


@asynccontextmanager
async def rig(tmp_path: Path, **settings: Any) -> AsyncIterator[Rig]:
    store = Store(tmp_path / "pxsgate.sqlite3")
    await store.open()
    exporter, clock, config = FakeExporter("fake"), FakeClock(), fake_config(**settings)
    outbox = Outbox(store, {"fake": exporter}, {"fake": config},
                    rng=random.Random(FAKE_SEED), clock=clock)
    try:
        await outbox.start()
        assert exporter.started
        yield Rig(outbox, store, exporter, clock, config)
    finally:
        await outbox.stop(grace_seconds=1)
        await store.close()
    assert exporter.closed


async def quiet_moment() -> None:
    """Real time for the outbox to act on what it was told, if it (wrongly) would."""
    await asyncio.sleep(0.2)


async def test_fake_retried_after_its_backoff_then_delivered(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.exporter.fail(2)
        delivery = await r.queue()
        await r.exporter.wait_calls(1)
        mirror = random.Random(FAKE_SEED)  # the outbox's draws of jitter, in order
        wait = await r.due_in(1)
        assert wait == pytest.approx(backoff_seconds(1, r.config, mirror))
        assert 1.0 <= wait <= 2.0, "the first wait: 2 s, half of it jitter"
        await r.sleeps_for(wait)
        r.clock.advance(wait - 0.25)
        await quiet_moment()
        assert len(r.exporter.calls) == 1, "not tried again before its backoff"
        r.clock.advance(0.25)
        await r.exporter.wait_calls(2)
        wait = await r.due_in(2)
        assert wait == pytest.approx(backoff_seconds(2, r.config, mirror))
        assert 2.0 <= wait <= 4.0, "doubled"
        r.clock.advance(wait)
        await r.exporter.wait_calls(3)
        row = await r.row(lambda d: d.state != "pending")
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, "")
    assert [c.delivery_id for c in r.exporter.calls] == [delivery] * 3, "one id every time"
    assert [c.outcome for c in r.exporter.calls] == ["ExportError", "ExportError",
                                                     "delivered"]
    assert r.exporter.calls[-1].document.study_instance_uid.endswith(".1119.1")


async def test_fake_permanent_error_is_dead_at_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.exporter.fail(1, permanent=True, message="refused: unknown patient")
        with capture_logs() as logs:
            delivery = await r.queue()
            row = await r.row(lambda d: d.state != "pending")
        r.clock.advance(3600)
        r.outbox.wake()
        await quiet_moment()
    assert (row.state, row.attempts, row.last_error) == ("dead", 1,
                                                         "refused: unknown patient")
    assert len(r.exporter.calls) == 1
    [dead] = [e for e in logs if e["event"] == "export.dead"]
    assert (dead["log_level"], dead["delivery"], dead["attempt"]) == ("error", delivery, 1)
    assert not [e for e in logs if e["event"] == "export.failed"]


async def test_fake_dead_once_its_tries_are_spent(tmp_path: Path) -> None:
    async with rig(tmp_path, max_attempts=3) as r:
        r.exporter.fail(5)
        await r.queue()
        for tries in (1, 2):
            await r.exporter.wait_calls(tries)
            r.clock.advance(await r.due_in(tries))
        await r.exporter.wait_calls(3)
        row = await r.row(lambda d: d.state != "pending")
        r.clock.advance(3600)
        r.outbox.wake()
        await quiet_moment()
    assert (row.state, row.attempts) == ("dead", 3)
    assert row.last_error == "the destination is down"
    assert len(r.exporter.calls) == 3, "no fourth try"
    assert len(r.exporter.failures) == 2


async def test_fake_sent_once_when_woken_while_in_flight(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.exporter.hold.clear()  # the destination takes its time
        delivery = await r.queue()
        await r.exporter.wait_calls(1)
        r.outbox.wake()
        r.outbox.wake()
        r.clock.advance(POLL_SECONDS * 3)  # and the polls come round
        await quiet_moment()
        assert len(r.exporter.calls) == 1, "not sent again while in flight"
        r.exporter.hold.set()
        row = await r.row(lambda d: d.state != "pending")
        r.outbox.wake()
        r.clock.advance(POLL_SECONDS * 3)
        await quiet_moment()
    assert (row.state, row.attempts) == ("delivered", 1)
    assert r.exporter.delivered == [delivery]
    assert len(r.exporter.calls) == 1, "nor once delivered"


async def test_when_filters_decide_which_exporters_get_a_delivery_row(
        tmp_path: Path) -> None:
    """when: beside statuses: a result that meets an exporter's conditions gets a delivery
    row there; one that does not gets none at all (not a row skipped later)."""
    from .test_change import visit

    with http_receiver() as receiver:
        extra = http_exporter(receiver.url, name="everything",
                              when="{score-at-least: 0.0}")
        for name, when in (("critical", "{score-at-least: 1.5}"),  # above any score here
                           ("changes", "{change-at-least: 0.0}"),
                           ("flagged", "{flags-any: [multiple-ap-images]}"),
                           ("both", "{change-at-least: 0.0, flags-any: [wrong-patient], "
                                    "match: all}")):
            extra += http_exporter(receiver.url, name=name, when=when).removeprefix(
                "exporters:\n")
        async with gateway(tmp_path, extra) as (gw, _):
            first, second = visit(71, 1, "20200101"), visit(71, 2, "20200201")
            two_aps = ap_study(72, "WHEN", images=2)
            for study in ([first], [second], two_aps):
                await send(gw, study)
                await result_of(gw, str(study[0].StudyInstanceUID))
            rows = await settled(gw, 4)
            docs = {d["id"]: d for d in await gw.store.results()}
    by_study: dict[str, set[str]] = {}
    for row in rows:
        by_study.setdefault(docs[row.result_id]["studyInstanceUid"], set()).add(row.exporter)
    assert by_study == {
        str(first.StudyInstanceUID): {"everything"},
        str(second.StudyInstanceUID): {"everything", "changes"},
        str(two_aps[0].StudyInstanceUID): {"everything", "flagged"},
    }
    assert all(row.state == "delivered" for row in rows)
