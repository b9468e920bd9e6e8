"""Shared fixtures: a real ``pxsgate serve`` process on an ephemeral loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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


def free_port() -> int:
    """A TCP port free on loopback now (for services whose 0 means "off", not "any")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data_dir: Path, *, port: int = 0, settle: float = 0.3,
                 extra_scp: str = "", min_free_mb: float = 16, level: str = "info",
                 ae_titles: tuple[str, ...] = ("PxsScore",), http_port: int = 0,
                 http_token_file: Path | None = None, extra: str = "") -> Path:
    titles = "\n".join(f"      - ae-title: {t}" for t in ae_titles)
    path.write_text(
        f"""dicom:
  scp:
    host: 127.0.0.1
    port: {port}
    ae-titles:
{titles}
{extra_scp}
storage:
  data-dir: {data_dir}
  min-free-mb: {min_free_mb}
assembly:
  settle-seconds: {settle}
http:
  port: {http_port}
  bearer-token-file: {http_token_file or "null"}
logging:
  format: json
  level: {level}
{extra}""",
        encoding="utf-8",
    )
    return path


@dataclass
class Service:
    """A running ``pxsgate serve`` and the ways to look at it from outside."""

    process: subprocess.Popen[str]
    port: int
    config: Path
    data_dir: Path
    logs: list[dict[str, Any]] = field(default_factory=list)
    raw_log: list[str] = field(default_factory=list)

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


def _pump(service: Service, stream: Any) -> None:
    for line in stream:
        service.raw_log.append(line.rstrip("\n"))
        with contextlib.suppress(json.JSONDecodeError):
            service.logs.append(json.loads(line))


def start_service(tmp: Path, **config_kwargs: Any) -> Service:
    config = write_config(tmp / "pxsgate.yaml", tmp / "data", **config_kwargs)
    # The log (JSON lines) is on stdout; stderr carries only the CLI's own error message.
    proc = subprocess.Popen([sys.executable, "-m", "pxsgate", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    service = Service(proc, 0, config, tmp / "data")
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        service.raw_log.append(line.rstrip("\n"))
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        service.logs.append(event)
        if event.get("event") == "gateway.started":
            service.port = int(event["port"])
            break
        if time.monotonic() > deadline:
            break
    if service.port == 0:
        proc.kill()
        raise AssertionError("pxsgate serve did not start:\n" + "\n".join(service.raw_log))
    threading.Thread(target=_pump, args=(service, proc.stdout), daemon=True).start()
    return service


def stop_service(service: Service) -> int:
    service.process.terminate()
    try:
        return service.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.process.kill()
        raise


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("serve"))
    yield svc
    assert stop_service(svc) == 0


@pytest.fixture
def storescu() -> str:
    return dcmtk("storescu")


def has_tool(name: str) -> bool:
    return shutil.which(name) is not None
