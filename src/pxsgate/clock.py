"""The clock seam: what the timers of assembly and the outbox read and arm.

Study assembly waits out settle and quiet deadlines; the outbox waits out a delivery's
backoff and its next poll. Both take a :class:`Clock` (by default the :data:`SYSTEM`
clock, the event loop's own), so that tests can pass a fake one they move by hand instead
of sleeping (``tests/fakes.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A callback armed by :meth:`Clock.call_later` (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for deadlines within this process."""
        ...

    def time(self) -> float:
        """Seconds since the epoch: for times stored in SQLite, which outlive the process."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Call ``callback`` on the event loop once ``delay`` seconds of
        :meth:`monotonic` time have passed."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and the event loop's timers (the
    default loop's own clock is ``time.monotonic``). Timers go on ``loop``, or on the loop
    running when one is armed."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        loop = self._loop or asyncio.get_running_loop()
        return loop.call_later(delay, callback)


SYSTEM = SystemClock()
