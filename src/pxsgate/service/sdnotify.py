"""systemd's service notification protocol (sd_notify(3), systemd.service(5)), spoken directly.

A service started with ``Type=notify`` (or ``notify-reload``) finds in ``NOTIFY_SOCKET`` the
address of an ``AF_UNIX`` datagram socket: a file system path, or, when it starts with ``@``,
a name in the abstract namespace (the ``@`` stands for a leading NUL byte). Each message is one
datagram of newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once start-up is done,
``STATUS=`` a one-line text for ``systemctl status``, ``WATCHDOG=1`` keep-alive pings,
``STOPPING=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd 253+), ``EXTEND_TIMEOUT_USEC=``.
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set) tell the service how often to ping. Without
``NOTIFY_SOCKET`` (a terminal, the tests) every call here is a no-op that returns False.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from typing import ClassVar, Final

import structlog

# systemd reads notification datagrams into a PIPE_BUF-sized buffer and drops longer ones
# (NOTIFY_BUFFER_MAX in systemd's source).
MAX_DATAGRAM: Final = 4096
# STATUS= texts are cut to this many UTF-8 bytes so that a message always fits.
MAX_STATUS_BYTES: Final = 2048

_FIELD_NAME: Final = re.compile(r"[A-Z][A-Z0-9_]*")
_LINE_BREAKS: Final = re.compile(r"[\r\n]+")


def _one_line(value: str) -> str:
    """A value fit for one assignment: line breaks become one space, NUL bytes go (systemd
    ignores a datagram with an embedded NUL)."""
    return _LINE_BREAKS.sub(" ", value).replace("\0", "").strip()


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


def _address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None when it is not one this
    module can use (unset, relative, or a ``vsock:`` address)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends notifications to the service manager. Thread-safe; sending never raises.

    The environment is read once, when the notifier is made. The datagram socket is opened on
    the first send and kept; it is non-blocking, so a stuck manager can never stall the event
    loop: a send that would block reports False like any other failed send.
    """

    #: Logger name; failures are logged at debug level only.
    LOGGER: ClassVar[str] = "pxsgate.sdnotify"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._log = structlog.get_logger(self.LOGGER)
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw)
        if raw and self._address is None:
            self._log.debug("sdnotify.unsupported_address", notify_socket=raw)
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when ``NOTIFY_SOCKET`` named a socket to send to."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send the assignments ``fields`` (in the order given) as one datagram.

        Returns True when the datagram was sent; False when notifications are disabled or the
        send failed (no such socket, refused, would block...), which is logged at debug level.
        Values are flattened to one line; ``STATUS`` is cut to :data:`MAX_STATUS_BYTES`.
        Raises ValueError only for a programming error: no fields, or a name that is not an
        upper-case systemd field name; these are checked even when disabled.
        """
        message = self._encode(fields)
        address = self._address
        if address is None:
            return False
        if len(message) > MAX_DATAGRAM:
            self._log.debug("sdnotify.too_long", size=len(message))
            return False
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(message, address)
            except OSError as exc:
                self._log.debug("sdnotify.send_failed", fields=list(fields), error=str(exc))
                return False
        return True

    @staticmethod
    def _encode(fields: Mapping[str, str | int]) -> bytes:
        if not fields:
            raise ValueError("sd_notify message without any field")
        lines = []
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"not a systemd notification field name: {name!r}")
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, int):
                text = str(value)
            else:
                text = _one_line(str(value))
                if name == "STATUS":
                    text = _cut_utf8(text, MAX_STATUS_BYTES)
            lines.append(f"{name}={text}")
        return "\n".join(lines).encode("utf-8", errors="replace")

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up (or a reload) is complete; with ``STATUS=`` when given."""
        if status:
            return self.notify(READY=1, STATUS=status)
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line description shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: a keep-alive ping; send every :meth:`watchdog_interval` seconds."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: shutdown has begun; with ``STATUS=`` when given."""
        if status:
            return self.notify(STOPPING=1, STATUS=status)
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, microseconds), as
        ``Type=notify-reload`` needs. Send :meth:`ready` once the reload is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more than the current start, stop or
        runtime timeout (e.g. while a model loads). Negative or non-finite: ValueError."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"extend_timeout needs a finite, non-negative time: {seconds!r}")
        return self.notify(EXTEND_TIMEOUT_USEC=round(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
        advises), or None: no watchdog configured, ``WATCHDOG_PID`` names another process,
        a malformed value, or notifications disabled."""
        if not self.enabled:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket, if open (idempotent; a later send opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
