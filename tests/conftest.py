"""Shared fixtures: a real ``pxsgate serve`` process on an ephemeral loopback port (started
by tests/harness.py, which the benchmarks share)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from . import harness, postgres
from .harness import free_port as free_port  # re-exported: tests import them from here
from .harness import stop as stop_service
from .harness import write_config as write_config

REPO = Path(__file__).resolve().parents[1]
# Real vendor radiographs (pylibjpeg-data, MIT: tests/data/dicom-samples/LICENSE.pylibjpeg-data).
SAMPLES = REPO / "tests" / "data" / "dicom-samples"
DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool. pynetdicom installs scripts named storescu/storescp that shadow
    DCMTK's on PATH, so the Debian binaries are called by absolute path."""
    path = DCMTK_BIN / tool
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"DCMTK's {tool} is missing: .ci/run must install dcmtk")
        pytest.skip(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return str(path)


def pxsgate(*args: str | Path, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    return subprocess.run([sys.executable, "-m", "pxsgate", *map(str, args)], text=True,
                          capture_output=True, timeout=timeout, check=check)


@dataclass
class Service(harness.Service):
    """A running ``pxsgate serve`` (every line of its log kept) and the ways to look at it
    from outside."""

    keep_log: bool = True
    data_dir: Path = Path()

    def results(self, *args: str) -> list[dict[str, Any]]:
        out = pxsgate("results", "--config", self.config, "--json", *args)
        docs: list[dict[str, Any]] = json.loads(out.stdout)
        return docs

    def wait_for(self, study_uids: Sequence[str], timeout: float = 120
                 ) -> dict[str, dict[str, Any]]:
        """Wait until each study has a result document; return them by study UID."""
        deadline = time.monotonic() + timeout
        wanted = set(study_uids)
        while True:
            docs = {d["studyInstanceUid"]: d for d in self.results()}
            if wanted <= docs.keys():
                return {uid: docs[uid] for uid in study_uids}
            if time.monotonic() > deadline:
                missing = wanted - docs.keys()
                raise AssertionError(f"no result for {len(missing)} study(ies) in {timeout} s")
            if self.process.poll() is not None:
                raise AssertionError("pxsgate serve exited:\n" + "\n".join(self.raw_log[-30:]))
            time.sleep(0.2)


def start_service(tmp: Path, **config_kwargs: Any) -> Service:
    """``pxsgate serve`` with ``tmp/pxsgate.yaml`` (write_config's keywords), its data in
    ``tmp/data``."""
    config = write_config(tmp / "pxsgate.yaml", tmp / "data", **config_kwargs)
    return harness.start(config, functools.partial(Service, data_dir=tmp / "data"))


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a test that runs the CLI in-process
    configures structlog for the whole process (its level filter included), which would
    hide events from a later test's capture_logs."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("serve"))
    yield svc
    assert stop_service(svc) == 0


@pytest.fixture
def storescu() -> str:
    return dcmtk("storescu")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.Cluster]:
    """A private PostgreSQL cluster on a loopback port, for the whole session."""
    if postgres.bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing: .ci/run must install postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres.cluster() as c:
        yield c


@pytest.fixture
def pg_url(postgres_cluster: postgres.Cluster) -> str:
    """A fresh, empty PostgreSQL database: its URL (no password: trust on loopback)."""
    return postgres_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest) -> str:
    """The storage section's lines for a test run on each store backend: none (SQLite's
    file, the default), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    url = request.getfixturevalue("pg_url")
    return f"  database: {url}\n  node-name: test-node\n"


def has_tool(name: str) -> bool:
    return shutil.which(name) is not None
