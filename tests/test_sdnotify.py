"""pxsgate.service.sdnotify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxsgate.service.sdnotify import MAX_STATUS_BYTES, Notifier

RECV_TIMEOUT_S = 2.0
# sun_path holds 108 bytes; pytest's tmp_path can be longer on some machines.
MAX_SOCKET_PATH = 100


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(65536)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(RECV_TIMEOUT_S)
    return False


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "notify.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield os.path.join(short, "notify.sock")


@pytest.fixture
def systemd(socket_path: str) -> Iterator[socket.socket]:
    """A bound datagram socket, as systemd's notification socket is."""
    with _receiver(socket_path) as sock:
        yield sock


@pytest.fixture
def notifier(socket_path: str, systemd: socket.socket) -> Iterator[Notifier]:
    n = Notifier({"NOTIFY_SOCKET": socket_path})
    yield n
    n.close()


def test_ready_with_status(notifier: Notifier, systemd: socket.socket) -> None:
    assert notifier.enabled
    assert notifier.ready("listening on port 11112")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=listening on port 11112"


def test_ready_without_status(notifier: Notifier, systemd: socket.socket) -> None:
    assert notifier.ready()
    assert systemd.recv(4096) == b"READY=1"


def test_status_newlines_are_flattened(notifier: Notifier, systemd: socket.socket) -> None:
    assert notifier.status("loading model\nweights 3/4\r\n\n")
    assert systemd.recv(4096) == b"STATUS=loading model weights 3/4"
    assert notifier.notify(READY=1, STATUS="a\nb\rc\0d")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=a b cd"


def test_long_status_is_cut_to_fit(notifier: Notifier, systemd: socket.socket) -> None:
    assert notifier.status("é" * 5000)
    data = systemd.recv(65536)
    assert data.startswith(b"STATUS=\xc3\xa9")
    text = data.removeprefix(b"STATUS=").decode("utf-8")  # never cut inside a character
    assert len(text.encode()) <= MAX_STATUS_BYTES
    assert set(text) == {"é"}


def test_each_helper_sends_its_field(notifier: Notifier, systemd: socket.socket) -> None:
    assert notifier.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping("draining 2 studies")
    assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=draining 2 studies"
    assert notifier.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    assert notifier.extend_timeout(90.5)
    assert systemd.recv(4096) == b"EXTEND_TIMEOUT_USEC=90500000"
    assert notifier.notify(MAINPID=os.getpid(), ERRNO=5, X_FLAG=True)
    assert systemd.recv(4096) == f"MAINPID={os.getpid()}\nERRNO=5\nX_FLAG=1".encode()


def test_reloading_sends_monotonic_usec(notifier: Notifier, systemd: socket.socket) -> None:
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    lines = systemd.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_abstract_namespace_socket() -> None:
    name = f"pxsgate-test-{os.getpid()}-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as systemd:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            assert notifier.enabled
            assert notifier.ready("abstract")
            assert systemd.recv(4096) == b"READY=1\nSTATUS=abstract"
        finally:
            notifier.close()


def test_one_socket_is_reused_and_close_is_idempotent(
    notifier: Notifier, systemd: socket.socket
) -> None:
    assert notifier.status("one")
    first = notifier._sock
    assert first is not None
    assert first.type == socket.SOCK_DGRAM
    assert not first.get_inheritable()
    assert notifier.status("two")
    assert notifier._sock is first
    notifier.close()
    notifier.close()
    assert notifier.status("three")  # reopened lazily
    assert [systemd.recv(4096) for _ in range(3)] == [b"STATUS=one", b"STATUS=two", b"STATUS=three"]


def test_disabled_notifier_is_a_no_op(systemd: socket.socket) -> None:
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative.sock"},
                    {"NOTIFY_SOCKET": "vsock:2:1234"}):
        notifier = Notifier(environ)
        assert not notifier.enabled
        assert not notifier.ready("x")
        assert not notifier.status("x")
        assert not notifier.watchdog()
        assert not notifier.stopping()
        assert not notifier.reloading()
        assert not notifier.extend_timeout(1)
        assert notifier._sock is None
    assert _nothing_waiting(systemd)


def test_default_environ_is_os_environ(
    monkeypatch: pytest.MonkeyPatch, socket_path: str, systemd: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    notifier = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")  # read once, at construction
    try:
        assert notifier.ready()
        assert systemd.recv(4096) == b"READY=1"
    finally:
        notifier.close()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    try:
        assert notifier.enabled
        assert not notifier.ready("x")
        assert not notifier.watchdog()
    finally:
        notifier.close()


def test_closed_receiver_returns_false(socket_path: str) -> None:
    systemd = _receiver(socket_path)
    notifier = Notifier({"NOTIFY_SOCKET": socket_path})
    try:
        assert notifier.watchdog()
        systemd.close()  # the path stays, nobody listens: ECONNREFUSED
        assert not notifier.watchdog()
        os.unlink(socket_path)
        with _receiver(socket_path) as again:  # a restarted manager is reached again
            assert notifier.watchdog()
            assert again.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()


def test_full_queue_returns_false_without_blocking(
    notifier: Notifier, systemd: socket.socket
) -> None:
    deadline = time.monotonic() + 10
    sent = 0
    while notifier.watchdog():
        sent += 1
        assert time.monotonic() < deadline, "the receive queue never filled"
    assert sent > 0
    assert systemd.recv(4096) == b"WATCHDOG=1"


def test_bad_field_names_are_programming_errors() -> None:
    notifier = Notifier({})
    with pytest.raises(ValueError, match="without any field"):
        notifier.notify()
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(ready=1)
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(**{"A=B": 1})
    with pytest.raises(ValueError, match="non-negative"):
        notifier.extend_timeout(-1)
    with pytest.raises(ValueError, match="non-negative"):
        notifier.extend_timeout(float("nan"))


def test_concurrent_sends_arrive_whole(notifier: Notifier, systemd: socket.socket) -> None:
    threads, per_thread = 4, 25
    received: list[bytes] = []

    def drain() -> None:
        for _ in range(threads * per_thread):
            received.append(systemd.recv(4096))

    def send(i: int) -> None:
        for j in range(per_thread):
            while not notifier.status(f"thread {i} message {j}"):
                time.sleep(0.001)  # queue full for a moment: the drain thread catches up

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    senders = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(threads)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=10)
    reader.join(timeout=10)
    assert not reader.is_alive()
    expected = {f"STATUS=thread {i} message {j}".encode()
                for i in range(threads) for j in range(per_thread)}
    assert set(received) == expected
    assert len(received) == threads * per_thread


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "nope"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(
    socket_path: str, environ: dict[str, str], expected: float | None
) -> None:
    assert Notifier({"NOTIFY_SOCKET": socket_path, **environ}).watchdog_interval() == expected


def test_watchdog_interval_none_without_notify_socket() -> None:
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval() is None
