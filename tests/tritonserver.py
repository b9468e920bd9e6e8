"""A real Triton Inference Server on loopback ports, for the tests (tests/test_triton.py)
and the benchmarks (benchmarks/triton.py). Plain Python, no pytest.

The server is the ``tritonserver`` binary that PyPI's ``nvidia-pytriton`` wheel ships (CPU,
with the Python backend only); pxsgate installs the wheel without its dependencies (it pins
numpy<2) and uses none of PyTriton's Python code. What PyTriton does to run it, done here:

- a backend directory whose ``python`` backend holds ``libtriton_python.so``, its utils and
  the ``triton_python_backend_stub`` built for this Python's minor version (the wheel keeps
  one per version under ``python_backend_stubs/``);
- ``LD_LIBRARY_PATH`` with this Python's LIBDIR: the stub links ``libpython3.X.so.1.0``
  (Debian: the libpython3.X package);
- ``PATH`` starting with this interpreter's directory: the stub's embedded Python takes its
  prefix (and so the virtual environment's site-packages, torch among them) from the
  ``python3`` it finds there. It ignores PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .harness import free_port


class TritonMissing(RuntimeError):
    """The nvidia-pytriton wheel (which carries tritonserver) is not installed."""


def distribution() -> Path:
    """The wheel's ``pytriton/tritonserver`` folder (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonMissing("tritonserver comes from PyPI's nvidia-pytriton wheel: "
                            "pip install --no-deps nvidia-pytriton (make test does)")
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonMissing(f"{dist}/bin/tritonserver is missing")
    return dist


def backend_directory(into: Path) -> Path:
    """``into/backends`` with the Python backend for this interpreter's version."""
    dist = distribution()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonMissing(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python = into / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (dist / "backends" / "python" / "libtriton_python.so",
                   dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = python / source.name
        if not link.exists():
            link.symlink_to(source)
    return into / "backends"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


@dataclass
class Triton:
    """A running tritonserver; ``start()`` again after ``kill()`` on the same ports."""

    repository: Path
    workdir: Path
    http_port: int
    grpc_port: int
    process: subprocess.Popen[bytes] | None = None
    # The Python backend's shared memory regions (/dev/shm/<prefix>*) are named by this, so
    # that those a killed server leaves behind can be removed.
    shm_prefix: str = field(default_factory=lambda: f"pxsgate_tests_{uuid.uuid4().hex[:12]}_")

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def start(self, timeout: float = 120.0) -> None:
        """Start it and wait until it is ready (every model loaded), or raise with its log."""
        backends = backend_directory(self.workdir)
        command = [str(distribution() / "bin" / "tritonserver"),
                   "--model-repository", str(self.repository),
                   "--backend-directory", str(backends),
                   "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                   "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                   "--allow-metrics", "false", "--exit-timeout-secs", "5",
                   f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=environment(),
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("tritonserver exited:\n" + self.last_log())
            if self.ready():
                return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"tritonserver not ready in {timeout:.0f} s:\n" + self.last_log())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                    f"http://{self.http_url}/v2/health/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def last_log(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL to the server and its Python backend stubs (its process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._remove_shared_memory()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._remove_shared_memory()

    def _remove_shared_memory(self) -> None:
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)


def start(repository: Path, workdir: Path, timeout: float = 120.0) -> Triton:
    """tritonserver serving ``repository`` on free loopback ports (``workdir``: its
    backend directory and log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = Triton(repository, workdir, free_port(), free_port())
    server.start(timeout)
    return server
