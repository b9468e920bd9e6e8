"""A real ``pxsgate serve`` as a subprocess on ephemeral loopback ports, watched through its
log (JSON lines on stdout): the one harness of the tests (``tests/conftest.py``) and the
benchmarks (``benchmarks/common.py``). Plain Python, no pytest: the benchmarks import it
as ``tests.harness`` from the repository root."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


def free_port() -> int:
    """A TCP port free on loopback now (for services whose 0 means "off", not "any")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data_dir: Path, *, port: int = 0, settle: float | None = 0.3,
                 extra_scp: str = "", min_free_mb: float = 16, level: str = "info",
                 ae_titles: tuple[str, ...] = ("PxsScore",), http_port: int = 0,
                 http_token_file: Path | None = None, extra: str = "",
                 storage: str = "") -> Path:
    """A serve config: loopback DICOM on ``port`` (0: any free one), the data directory,
    JSON logs, ``extra`` YAML at the end. ``settle`` None: the service's default;
    ``storage``: more lines of the storage section (indented two spaces)."""
    titles = "\n".join(f"      - ae-title: {t}" for t in ae_titles)
    assembly = f"assembly:\n  settle-seconds: {settle}\n" if settle is not None else ""
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
{storage}{assembly}http:
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
    """A running ``pxsgate serve``; its log is read on a thread. Always kept: the first
    event of each name, the count of each level, the last lines. Every line and event too
    when ``keep_log`` (tests); a long run (a soak) leaves it off, to stay in bounded memory.
    Subclasses watch more by overriding :meth:`observe`."""

    process: subprocess.Popen[str]
    config: Path
    port: int = 0
    keep_log: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)  # every event, if keep_log
    raw_log: list[str] = field(default_factory=list)  # every line, if keep_log
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # the first of each
    levels: Counter[str] = field(default_factory=Counter)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    def read(self, line: str) -> dict[str, Any] | None:
        """Take one line of the log; return its event, if it is one."""
        text = line.rstrip("\n")
        self.tail.append(text)
        if self.keep_log:
            self.raw_log.append(text)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            self.levels["unparsed"] += 1
            return None
        if not isinstance(event, dict):
            return None
        if self.keep_log:
            self.logs.append(event)
        self.levels[str(event.get("level", "?"))] += 1
        self.events.setdefault(str(event.get("event")), event)
        self.observe(event)
        return event

    def observe(self, event: dict[str, Any]) -> None:
        """Called for each event of the log."""

    def last_lines(self) -> str:
        return "\n".join(self.raw_log or self.tail)

    def pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.read(line)


S = TypeVar("S", bound=Service)


class DidNotStart(AssertionError):
    """``pxsgate serve`` exited, or did not log ``gateway.started`` in time."""


def start(config: Path, make: Callable[[subprocess.Popen[str], Path], S],
          timeout: float = 180.0) -> S:
    """Start ``pxsgate serve --config config`` and wait for ``gateway.started`` (the model
    loaded and warm, the port open); its port is then ``service.port``. ``make`` builds
    the Service (or subclass) that reads the log."""
    # The log is on stdout; stderr (merged) carries only the CLI's own error message.
    proc = subprocess.Popen([sys.executable, "-m", "pxsgate", "serve", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    service = make(proc, config)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # a service that exits ends the loop (EOF)
        event = service.read(line)
        if event is not None and event.get("event") == "gateway.started":
            service.port = int(event["port"])
            break
        if time.monotonic() > deadline:
            break
    if service.port == 0:
        proc.kill()
        proc.wait()
        raise DidNotStart("pxsgate serve did not start:\n" + service.last_lines())
    threading.Thread(target=service.pump, daemon=True).start()
    return service


def stop(service: Service, timeout: float = 60.0) -> int:
    """SIGTERM, and its exit code; killed (-SIGKILL) if it has not exited in ``timeout``."""
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
    try:
        return service.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()
        return -int(signal.SIGKILL)
