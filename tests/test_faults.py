"""Faults, from outside: a model that fails now and then, a poison image, a model that
hangs, the database locked by another process, a read-only data directory, a backlog
(backpressure), a spool at its ceiling, retention, and a graceful SIGTERM that tells
systemd. Real DICOM associations, the real SQLite file, real processes where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from pxsgate.config import load_config
from pxsgate.errors import ModelError
from pxsgate.log import configure_logging
from pxsgate.results import ModelInfo
from pxsgate.service.gateway import Gateway
from pxsgate.tools.scu import send_datasets

from .conftest import write_config
from .inprocess import eventually, gateway, result_of, send
from .test_lifecycle import ap_study

INFO = ModelInfo("Fault", "1", "tests", "a model that misbehaves on request",
                 "2026-01-01T00:00:00+00:00", "0" * 64)


class Model:
    """Mean brightness, like tests/inprocess.FastModel, with faults: ``fail_next`` batches
    raise; a batch holding a flat image (no contrast: the poison) raises; while ``hang`` is
    set, every batch blocks until it is cleared."""

    info = INFO

    def __init__(self) -> None:
        self.fail_next = 0
        self.hang = threading.Event()
        self.released = threading.Event()
        self.batches: list[int] = []

    def score_batch(self, batch: np.ndarray) -> list[float]:
        self.batches.append(len(batch))
        if self.hang.is_set():
            self.released.wait(60)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any(int(img.max()) == int(img.min()) for img in batch):
            raise ModelError("NaN in the output")
        return [float(img.mean()) / 255 for img in batch]


@contextlib.asynccontextmanager
async def running(tmp: Path, model: Any, extra: str = "", data: Path | None = None
                  ) -> AsyncIterator[Gateway]:
    path = write_config(tmp / "pxsgate.yaml", data or tmp / "data", settle=0.2, extra=(
        "preprocess:\n  workers: 1\n" + extra))
    configure_logging("json", "info")
    gw = Gateway(load_config(path), scorer_factory=lambda: model)
    await gw.start()
    try:
        yield gw
    finally:
        model_release = getattr(model, "released", None)
        if model_release is not None:
            model_release.set()
        await gw.stop(grace=5)


def flat(datasets: list[Any]) -> list[Any]:
    """The same study with every image flat grey: the stand-in model's poison."""
    for ds in datasets:
        ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    return datasets


async def state_of(gw: Gateway, study_uid: str) -> dict[str, Any]:
    detail = await gw.store.study_detail(study_uid)
    assert detail is not None
    study: dict[str, Any] = detail["study"]
    return study


JOBS = "jobs:\n  max-attempts: 2\n  retry-backoff-seconds: 0.05\n"


async def test_a_failing_model_is_retried_and_then_succeeds(tmp_path: Path) -> None:
    model = Model()
    async with running(tmp_path, model, JOBS) as gw:
        model.fail_next = 1  # one bad batch, as after a transient GPU fault
        study = ap_study(501, "RETRY")
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        assert doc["status"] == "SUCCEEDED"
        state = await state_of(gw, str(study[0].StudyInstanceUID))
        assert (state["state"], state["attempts"]) == ("stored", 2)


async def test_a_poison_image_fails_its_study_only(tmp_path: Path) -> None:
    """Two studies' images share a batch; the flat one makes the model raise. The batch is
    retried image by image: the good study is scored at its first try, the poisoned one
    is FAILED after jobs.max-attempts tries, with the model's error."""
    model = Model()
    extra = JOBS + "model:\n  batch:\n    max-size: 8\n    max-delay-ms: 400\n"
    async with running(tmp_path, model, extra) as gw:
        good, bad = ap_study(502, "GOOD"), flat(ap_study(503, "POISON"))
        await send(gw, good + bad)
        good_doc = await result_of(gw, str(good[0].StudyInstanceUID))
        bad_doc = await result_of(gw, str(bad[0].StudyInstanceUID))
        assert 2 in model.batches, "the two studies' images did share a batch"
        assert good_doc["status"] == "SUCCEEDED"
        assert (await state_of(gw, str(good[0].StudyInstanceUID)))["attempts"] == 1
        assert (bad_doc["status"], bad_doc["exitCode"]) == ("FAILED", 2)
        assert "NaN in the output" in bad_doc["errorMessage"]
        bad_state = await state_of(gw, str(bad[0].StudyInstanceUID))
        assert (bad_state["state"], bad_state["attempts"]) == ("failed", 2)
        assert (await gw.health())["ok"]


async def test_a_hung_model_makes_the_service_unhealthy_and_the_study_resumes(
        tmp_path: Path) -> None:
    """A batch past jobs.batch-time-limit-seconds: the service says it is unhealthy (so
    systemd's watchdog, no longer fed, or the CLI's exit 1 restarts it). The study stays
    unfinished in the store and a new start scores it, its interrupted try counted."""
    hung = Model()
    hung.hang.set()
    extra = "jobs:\n  batch-time-limit-seconds: 1\n  retry-backoff-seconds: 30\n"
    study = ap_study(504, "HANG")
    uid = str(study[0].StudyInstanceUID)
    async with running(tmp_path, hung, extra, data=tmp_path / "data") as gw:
        await send(gw, study)
        await asyncio.wait_for(gw.fatal.wait(), 30)
        assert "stuck" in gw.fatal_reason
        assert not (await gw.health())["ok"]
        assert (await state_of(gw, uid))["state"] == "inferring"
    async with running(tmp_path, Model(), extra, data=tmp_path / "data") as gw:
        doc = await result_of(gw, uid)
        assert doc["status"] == "SUCCEEDED"
        assert (await state_of(gw, uid))["attempts"] == 2


async def test_a_late_instance_during_scoring_survives_a_restart(tmp_path: Path) -> None:
    """An instance that arrives while its study is on a hung model re-opens the study;
    the retries of the first round must not close it again. After a restart the study is
    scored with both images."""
    hung = Model()
    hung.hang.set()
    extra = "jobs:\n  batch-time-limit-seconds: 1\n  retry-backoff-seconds: 0.05\n"
    first, late = ap_study(507, "LATEHUNG", images=2)
    uid = str(first.StudyInstanceUID)
    async with running(tmp_path, hung, extra, data=tmp_path / "data") as gw:
        await send(gw, [first])
        await eventually(lambda: _state_is(gw, uid, "inferring"), 30, "scoring to start")
        await send(gw, [late])
        await asyncio.wait_for(gw.fatal.wait(), 30)  # the hung batch: retried, in vain
        await asyncio.sleep(0.5)
        assert (await state_of(gw, uid))["state"] in ("receiving", "ready", "selected",
                                                       "inferring")
    async with running(tmp_path, Model(), extra, data=tmp_path / "data") as gw:
        doc = await result_of(gw, uid)
        assert doc["status"] == "SUCCEEDED"
        assert len(doc["results"]) == 2, "the late instance is scored too"


async def _state_is(gw: Gateway, uid: str, state: str) -> bool:
    row = await gw.store.study(uid)
    return row is not None and row.state == state


async def test_a_decode_past_its_time_limit_fails_the_image_not_the_service(
        tmp_path: Path) -> None:
    extra = JOBS + "  decode-time-limit-seconds: 0.001\n"
    async with running(tmp_path, Model(), extra) as gw:
        study = ap_study(508, "SLOWDECODE")
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        assert (doc["status"], doc["exitCode"]) == ("FAILED", 1)
        assert "decoding took longer than 0.001 s" in doc["errorMessage"]
        assert (await gw.health())["ok"]


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


async def test_the_database_locked_by_another_process(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock for longer than the busy timeout (5 s):
    an instance cannot be indexed, so it is refused with 0xA700, never acknowledged and
    lost; a study that became ready meanwhile is finished once the lock is gone. The lock
    is held for 16 s: the C-STORE's write may first wait behind the ready study's (the
    service's writers take turns), 5 s each, and must still find the lock held."""
    async with running(tmp_path, Model(), JOBS) as gw:
        first = ap_study(505, "BEFORE")
        await send(gw, first)  # acknowledged; becomes ready while the lock is held
        locker = subprocess.Popen(  # noqa: ASYNC220  # starting it does not block
            [sys.executable, "-c", LOCKER, str(gw.config.db_path), "16"],
            stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None
        assert (await asyncio.to_thread(locker.stdout.readline)).strip() == "locked"
        during = ap_study(506, "DURING")
        report = await asyncio.to_thread(send_datasets, "127.0.0.1", gw.port, during)
        assert report.statuses == (0xA700,)
        await asyncio.to_thread(locker.wait, 30)
        assert (await result_of(gw, str(first[0].StudyInstanceUID), 60))["status"] == \
            "SUCCEEDED"
        await send(gw, during)  # the router sends it again: now it is taken
        assert (await result_of(gw, str(during[0].StudyInstanceUID)))["status"] == \
            "SUCCEEDED"


def _readonly_dir(path: Path) -> Callable[[], None]:
    """A read-only directory: a read-only tmpfs where we may mount one (root), else a
    directory without write permission (which root would ignore)."""
    path.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                                  str(path)], capture_output=True)
        if mounted.returncode == 0:
            return lambda: subprocess.run(["umount", str(path)], check=False)
        pytest.skip("root, and no read-only mount possible here")
    path.chmod(0o555)
    return lambda: path.chmod(0o755)


def test_a_read_only_data_directory_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    undo = _readonly_dir(data)
    try:
        config = write_config(tmp_path / "pxsgate.yaml", data)
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pxsgate", "serve", "--config",
                              str(config)], capture_output=True, text=True, timeout=120)
    finally:
        undo()
    assert out.returncode == 1
    assert f"storage.data-dir {data} is not writable" in out.stderr
    assert time.monotonic() - started < 60, "it fails before loading the model"


async def test_backpressure_delays_then_refuses(tmp_path: Path) -> None:
    """With the model stuck and one study at a time: the first study is on the model, the
    second waits (backlog 2 = delay-above-studies: its answers are delayed), the third
    makes 3 (refuse-above-studies): refused with 0xA700. Once the model moves, everything
    is scored and the refused study, sent again, is taken."""
    model = Model()
    model.hang.set()
    extra = ("jobs:\n  max-studies-in-progress: 1\n"
             "backpressure:\n  delay-above-studies: 2\n  refuse-above-studies: 3\n"
             "  max-delay-seconds: 0.8\n")
    async with running(tmp_path, model, extra) as gw:
        studies = [ap_study(510 + i, f"BP{i}") for i in range(4)]
        took = []
        for n, study in enumerate(studies[:3], start=1):
            started = time.monotonic()
            await send(gw, study)
            took.append(time.monotonic() - started)
            await eventually(lambda n=n: _backlog_is(gw, n), 30, "the study to be ready")
        assert took[2] >= 0.7 > took[0], "at 2 studies waiting, answers are delayed"
        started = time.monotonic()
        report = await asyncio.to_thread(send_datasets, "127.0.0.1", gw.port, studies[3])
        assert report.statuses == (0xA700,), "three studies waiting: refused"
        assert time.monotonic() - started < 0.5, "a refusal is not delayed"
        model.hang.clear()
        model.released.set()
        await eventually(lambda: _backlog_is(gw, 0), 60, "the backlog to clear")
        await send(gw, studies[3])
        for study in studies:
            assert (await result_of(gw, str(study[0].StudyInstanceUID)))["status"] == \
                "SUCCEEDED"


async def _backlog_is(gw: Gateway, n: int) -> bool:
    return gw.backlog == n


async def test_retention_deletes_finished_images_and_keeps_what_is_needed(
        tmp_path: Path) -> None:
    """retention-hours 0: a finished study's images go at the next pass, its rows and
    result stay; a study whose delivery is still pending keeps its images (the SR exporter
    reads them)."""
    down = ("exporters:\n  - name: down\n    type: http\n    url: http://127.0.0.1:9/results\n"
            "    statuses: [FAILED]\n    backoff-initial-seconds: 60\n")
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", settle=0.2,
                        extra="preprocess:\n  workers: 1\n" + JOBS + down)
    text = path.read_text().replace("  min-free-mb: 16\n",
                                    "  min-free-mb: 16\n  retention-hours: 0\n")
    path.write_text(text)
    model = Model()
    configure_logging("json", "info")
    gw = Gateway(load_config(path), scorer_factory=lambda: model)
    await gw.start()
    try:
        kept, gone = flat(ap_study(520, "KEPT")), ap_study(521, "GONE")
        await send(gw, kept + gone)
        for study in (kept, gone):
            await result_of(gw, str(study[0].StudyInstanceUID))
        spool = gw.config.spool_dir
        before = gw.retention.spool_bytes
        assert before > 0
        assert gw.thumbnails is not None
        await gw.thumbnails.wait_idle()  # a study's files stay until its thumbnails are made
        assert await gw.retention.run() == 1
        assert not (spool / str(gone[0].StudyInstanceUID)).exists()
        assert (spool / str(kept[0].StudyInstanceUID)).exists(), "a delivery is pending"
        assert gw.retention.spool_bytes < before
        detail = await gw.store.study_detail(str(gone[0].StudyInstanceUID))
        assert detail is not None
        assert detail["study"]["purged_at"] is not None
        assert all(i["removed_at"] for i in detail["instances"])
        assert detail["result"]["status"] == "SUCCEEDED", "the result stays"

        # The router sends the same image again: its file is kept again (and counted), for
        # retention to delete later; the study is not scored again.
        after = gw.retention.spool_bytes
        await send(gw, gone)
        assert (spool / str(gone[0].StudyInstanceUID)).exists()
        assert gw.retention.spool_bytes > after
        assert await gw.retention.run() == 1
        assert not (spool / str(gone[0].StudyInstanceUID)).exists()
        history = await gw.store.study_detail(str(gone[0].StudyInstanceUID))
        assert history is not None
        assert history["history"] == [], "not re-scored"
    finally:
        await gw.stop(grace=5)


async def test_the_spool_ceiling_makes_room_or_refuses(tmp_path: Path) -> None:
    """max-spool-gb about one image: the next study makes room by deleting the finished
    one before its retention is up; while the only study in the spool is unfinished (its
    model stuck), a new one is refused with 0xA700."""
    model = Model()
    ceiling = 200_000 / 2**30  # bytes, in GiB: one 256x256 image fits, two do not
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", settle=0.2,
                        extra="preprocess:\n  workers: 1\n" + JOBS)
    path.write_text(path.read_text().replace(
        "  min-free-mb: 16\n", f"  min-free-mb: 16\n  max-spool-gb: {ceiling:.9f}\n"))
    configure_logging("json", "info")
    gw = Gateway(load_config(path), scorer_factory=lambda: model)
    await gw.start()
    try:
        first, second, third = (ap_study(530 + i, f"CEIL{i}") for i in range(3))
        await send(gw, first)
        await result_of(gw, str(first[0].StudyInstanceUID))
        model.hang.set()
        await send(gw, second)  # room made: the finished first study's images go
        assert not (gw.config.spool_dir / str(first[0].StudyInstanceUID)).exists()
        report = await asyncio.to_thread(send_datasets, "127.0.0.1", gw.port, third)
        assert report.statuses == (0xA700,), "only an unfinished study left: refused"
        model.hang.clear()
        model.released.set()
        await result_of(gw, str(second[0].StudyInstanceUID))
        await send(gw, third)
        assert (await result_of(gw, str(third[0].StudyInstanceUID)))["status"] == "SUCCEEDED"
    finally:
        model.released.set()
        await gw.stop(grace=5)


def _notify_socket() -> tuple[socket.socket, str]:
    path = f"/tmp/pxsgate-notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(120)
    return sock, path


def test_systemd_hears_ready_watchdog_and_stopping_and_sigterm_lets_associations_finish(
        tmp_path: Path) -> None:
    """``pxsgate serve`` under a stand-in systemd: READY=1 once the port accepts
    associations, WATCHDOG=1 pings at half of WATCHDOG_USEC, STATUS= lines; on SIGTERM,
    STOPPING=1, the port closes to new associations while the one in progress still
    stores its instance, and the exit status is 0."""
    sock, address = _notify_socket()
    config = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", extra=(
        "jobs:\n  shutdown-grace-seconds: 20\n"))
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
    log_file = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pxsgate", "serve", "--config",
                             str(config)], stdout=log_file, text=True, env=env)
    log_file.close()
    try:
        messages: list[str] = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any(m.startswith("STATUS=loading the model") for m in messages)
        port = int(messages[-1].split("port ")[1].split(";")[0])
        ae = AE(ae_title="ROUTER")
        study = ap_study(540, "INFLIGHT")
        ae.add_requested_context(ComputedRadiographyImageStorage,
                                 str(study[0].file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="PxsScore")
        assert assoc.is_established, "READY=1 came after the port opened"
        pings = 0
        while pings < 2:
            pings += sock.recv(4096) == b"WATCHDOG=1"
        proc.terminate()
        while not sock.recv(4096).decode().startswith("STOPPING=1"):
            pass
        late = ae.associate("127.0.0.1", port, ae_title="PxsScore")
        assert not late.is_established, "no new associations once stopping"
        # A reload asked for during the stop (logrotate, an operator) is ignored, not fatal.
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGHUP during the graceful stop ended the process"
        status = assoc.send_c_store(study[0])
        assert status.Status == 0x0000, "the association in progress is still served"
        assoc.release()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
        os.unlink(address)
    log = (tmp_path / "serve.log").read_text()
    assert '"event": "gateway.stopped"' in log
    assert '"event": "signal.ignored"' in log


async def test_healthz_reports_a_store_that_cannot_write(tmp_path: Path) -> None:
    """A full disk: reads go on, every write fails. /healthz is 503 with the reason while
    the disk is full, and 200 again once there is room (issue 18.11)."""
    import aiohttp

    from .conftest import free_port

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    data = tmp_path / "data"
    data.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)]
    if (await asyncio.to_thread(subprocess.run, mount, capture_output=True)).returncode:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: a tmpfs must be mountable")
        pytest.skip("no tmpfs mount possible here")
    port = free_port()
    try:
        async with gateway(tmp_path, http_port=port) as (gw, _):
            url = f"http://127.0.0.1:{port}/healthz"

            async def healthz() -> tuple[int, dict[str, Any]]:
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    return response.status, await response.json()

            status, body = await healthz()
            assert (status, body["store"]) == (200, True)
            filler = gw.config.storage.data_dir / "filler"
            with filler.open("wb", buffering=0) as out:
                for size in (2**20, 4096, 1):  # to the last byte
                    with contextlib.suppress(OSError):
                        while True:
                            out.write(bytes(size))
            status, body = await healthz()
            assert status == 503
            assert body["store"] is False
            assert "full" in body["storeError"]
            filler.unlink()
            status, body = await healthz()
            assert (status, body["store"]) == (200, True)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(data)], check=False)


def test_after_a_sigkill_nothing_but_json_reaches_the_log(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, a crash) leaves multiprocessing's resource tracker to clean
    up the decode pool's semaphores; it used to say so in a plain-text warning on the
    service's stderr, which journald keeps beside the JSON lines (issue 18.4)."""
    from .conftest import start_service

    svc = start_service(tmp_path)
    study = ap_study(541, "KILLED")
    uid = str(study[0].StudyInstanceUID)
    assert send_datasets("127.0.0.1", svc.port, study).ok
    assert svc.wait_for([uid])[uid]["status"] == "SUCCEEDED"  # the decode pool has worked
    svc.process.kill()
    svc.process.wait(30)
    time.sleep(3)  # the tracker notices its parent is gone and writes what it writes
    for line in svc.raw_log:
        json.loads(line)
