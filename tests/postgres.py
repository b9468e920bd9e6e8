"""A private PostgreSQL cluster for the tests: Debian's PostgreSQL (``initdb`` in a temp
dir, run as the unprivileged ``postgres`` user when the tests run as root), listening on
127.0.0.1 at an ephemeral port, trust authentication for loopback only; one fresh
database per test. Never the system's cluster or service."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "pxsgate"


def bindir() -> Path | None:
    """Debian's PostgreSQL server binaries (the newest installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    port: int
    data: Path
    bin: Path
    run_as: list[str]

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        done = subprocess.run(
            [*self.run_as, str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v",
             "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER,
             "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:16]
        self.psql("postgres", f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data),
                        "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def cluster(*, durable: bool = False) -> Iterator[Cluster]:
    """Start a private cluster; stop and remove it at the end. ``durable``: fsync and
    synchronous commits on, as in production (the benchmark); off for the tests' speed."""
    binaries = bindir()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL's initdb (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pxsgate-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: Debian's postgres user runs the cluster
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    port = _free_port()
    c = Cluster(port, data, binaries, run_as)
    try:
        subprocess.run([*run_as, str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER,
                        "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                       capture_output=True, text=True, timeout=120, check=True)
        subprocess.run(
            [*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-w", "-t", "60",
             "-l", str(root / "server.log"),
             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1" + (
                 "" if durable else " -c fsync=off -c synchronous_commit=off "
                 "-c full_page_writes=off"), "start"],
            capture_output=True, text=True, timeout=90, check=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                c.psql("postgres", "SELECT 1")
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
