"""At-least-once under SIGKILL: every acknowledged instance's study ends with exactly one
current result, however often the service is killed.

The real ``pxsgate serve`` (the real model, on the CPU) runs as a subprocess; DCMTK's
storescu sends it a stream of studies, as a router would, and sends again what was not
acknowledged. In each round the service is killed with SIGKILL at a chosen moment, by a
failpoint (pxsgate.service.failpoints: after an instance file is durable but before it is indexed,
after indexing but before the C-STORE response, during inference, inside the result's
transaction before COMMIT, after COMMIT) or by the test at a random time. Then it is
started again. The seed is fixed, so CI runs the same rounds every time.

At the end a clean start must have resumed everything, and for every instance that got a
Success status: it is indexed, its study is finished (not stuck in a state), and the study
has exactly one current result; earlier ones (a study re-scored when a re-sent instance
arrived) are history, and the current result is then flagged ``rescored``.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import dcmtk, write_config
from .test_lifecycle import ap_study

SEED = 20261126
ROUNDS = (
    "after-spool-write:2",
    "after-index:3",
    "during-inference:1",
    "before-result-commit:1",
    "after-result-commit:2",
    "random",
    "after-spool-write:5",
    "random",
)
STUDIES = 14  # 1-2 images each, 256x256

pytestmark = pytest.mark.dcmtk


def _start(config: Path, failpoint: str | None, log: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)
    env.pop("PXSGATE_FAILPOINTS", None)
    if failpoint:
        env["PXSGATE_FAILPOINTS"] = failpoint
    out = log.open("a", encoding="utf-8")
    out.write(f"--- start, failpoint {failpoint}\n")
    out.flush()
    proc = subprocess.Popen([sys.executable, "-m", "pxsgate", "serve", "--config", str(config)],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    out.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(encoding="utf-8").split(f"failpoint {failpoint}\n")[-1]
        if match := re.search(r'"port": (\d+), "http_port"', text):
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("pxsgate serve did not start:\n" + log.read_text()[-3000:])


def _send(port: int, files: list[Path]) -> set[Path]:
    """Send files with DCMTK's storescu over one association; return those acknowledged
    with Success (storescu -v prints each file, then its response)."""
    proc = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "ROUTER", "-aec", "PxsScore", "-to", "10",
         "-ta", "10", "-td", "10", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120)
    acked: set[Path] = set()
    current: Path | None = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(current)
            current = None
    return acked


def _db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data / 'pxsgate.sqlite3'}?mode=ro", uri=True)


def _settled(data: Path, study_uids: set[str]) -> bool:
    with _db(data) as db:
        rows = dict(db.execute("SELECT study_instance_uid, state FROM studies").fetchall())
    return all(rows.get(uid) in ("stored", "exported", "failed") for uid in study_uids)


def test_every_acknowledged_study_has_one_current_result_after_sigkills(
        tmp_path: Path) -> None:
    rng = random.Random(SEED)
    files_dir = tmp_path / "feed"
    files_dir.mkdir()
    feed: dict[Path, tuple[str, str]] = {}  # file -> (study uid, sop uid)
    for index in range(STUDIES):
        for ds in ap_study(300 + index, f"CRASH{index}", images=rng.choice((1, 1, 2))):
            path = files_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            feed[path] = (str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    data = tmp_path / "data"
    config = write_config(tmp_path / "pxsgate.yaml", data, settle=0.3, extra=(
        "jobs:\n  max-attempts: 6\n  retry-backoff-seconds: 0.1\n"
        "  shutdown-grace-seconds: 5\n"
        "preprocess:\n  workers: 1\nmodel:\n  device: cpu\n"))
    log = tmp_path / "serve.log"
    acked: set[Path] = set()
    unsent = sorted(feed)
    rng.shuffle(unsent)
    kills = 0
    for failpoint in ROUNDS:
        proc, port = _start(config, None if failpoint == "random" else failpoint, log)
        if failpoint == "random":
            delay = rng.uniform(0.3, 4.0)
            threading.Timer(delay, lambda p=proc: p.poll() is None and p.kill()).start()
        # This round's share of new files, plus every file not yet acknowledged (a router
        # sends again what failed).
        batch = [p for p in sorted(feed) if p not in acked and p not in unsent]
        batch += [unsent.pop() for _ in range(min(len(unsent), rng.randint(3, 6)))]
        rng.shuffle(batch)
        for start in range(0, len(batch), 2):  # a few associations, as a router does
            if proc.poll() is not None:
                break
            acked |= _send(port, batch[start : start + 2])
            time.sleep(rng.uniform(0.0, 0.6))
        try:
            proc.wait(timeout=rng.uniform(2.0, 6.0))  # inference and commits happen here
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        kills += proc.returncode == -signal.SIGKILL

    # A clean start; the rest of the feed and whatever was never acknowledged.
    proc, port = _start(config, None, log)
    try:
        for _ in range(3):
            missing = [p for p in sorted(feed) if p not in acked]
            if not missing:
                break
            acked |= _send(port, missing)
        assert acked == set(feed), "a clean service acknowledges everything"
        studies = {feed[p][0] for p in acked}
        deadline = time.monotonic() + 240
        while not _settled(data, studies):
            assert time.monotonic() < deadline, "studies left unfinished:\n" + log.read_text(
                )[-4000:]
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "a SIGTERM stops the service cleanly (exit 0)"

    assert kills >= len(ROUNDS) - 1, f"only {kills} of {len(ROUNDS)} rounds killed the service"
    with _db(data) as db:
        indexed = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        rows = db.execute(
            """SELECT study_instance_uid, current, status, flags FROM results
               ORDER BY created_utc, rowid""").fetchall()
        unfinished = db.execute(
            "SELECT count(*) FROM studies WHERE state NOT IN ('stored','exported','failed')"
        ).fetchone()[0]
    assert {feed[p][1] for p in acked} <= indexed, "every acknowledged instance is indexed"
    assert unfinished == 0
    by_study: dict[str, list[tuple[int, str, str]]] = {}
    for uid, current, status, flags in rows:
        by_study.setdefault(uid, []).append((current, status, flags))
    for uid in studies:
        results = by_study.get(uid, [])
        current = [r for r in results if r[0] == 1]
        assert len(current) == 1, f"study ...{uid[-8:]}: {len(current)} current results"
        assert results[-1][0] == 1, "the current result is the latest"
        if any(r[1] == "SUCCEEDED" for r in results[:-1]):
            assert "rescored" in current[0][2].split(), "re-scoring is flagged"
        # A study on the model at every one of its tries is FAILED ("interrupted"), by
        # design (a poison image must not crash the service forever); with 6 tries here
        # and at most a few kills per study, every study is scored.
        assert current[0][1] == "SUCCEEDED", f"study ...{uid[-8:]}: {current[0]}"
