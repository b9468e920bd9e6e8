"""Fakes behind pxsgate's seams, for tests that drive a real component without waiting on
real time or a real destination: a clock moved by hand (:class:`FakeClock`, a
``pxsgate.clock.Clock``) and an exporter that records what it is given and fails when told
(:class:`FakeExporter`, a ``pxsgate.delivery.outbox.Exporter``)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from pxsgate.document import ResultDocument
from pxsgate.errors import ExportError, PermanentExportError

WAIT_SECONDS = 10.0  # real time a test waits for the component under test to act


@dataclass(order=True)
class FakeTimer:
    when: float
    seq: int
    callback: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    handle: asyncio.Handle | None = field(default=None, compare=False)

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class FakeClock:
    """A clock that stands still until :meth:`advance` moves it; timers armed on it fire
    then, in the order of their deadlines, each with the clock reading its deadline. A
    timer already due when armed runs on the event loop's next turn, as
    ``loop.call_later(0, ...)`` would. ``time()`` starts at ``start`` (epoch seconds; by
    default 2026-01-01, well before the real time, so that code reading the real clock
    where it should read this one is caught) and moves with it."""

    # Its monotonic reading starts where a real one would, far from 0: the assembler takes
    # 0.0 as "never released".
    UPTIME = 100_000.0
    START = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def __init__(self, start: float | None = None) -> None:
        self.now = self.UPTIME
        self._epoch = (self.START if start is None else start) - self.UPTIME
        self._timers: list[FakeTimer] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self._epoch + self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(self.now + max(0.0, delay), next(self._seq), callback)
        loop = _running_loop()
        if delay <= 0 and loop is not None:
            timer.handle = loop.call_soon(self._fire, timer)
        else:
            heapq.heappush(self._timers, timer)
        return timer

    @property
    def armed(self) -> list[float]:
        """The deadlines of the timers not yet fired nor cancelled, soonest first."""
        return sorted(t.when for t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, firing the timers due on the way."""
        target = self.now + seconds
        while self._timers and self._timers[0].when <= target:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self.now = max(self.now, timer.when)
                self._fire(timer)
        self.now = target

    @staticmethod
    def _fire(timer: FakeTimer) -> None:
        if not timer.cancelled:
            timer.cancelled = True  # fired: one shot
            timer.callback()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.get_running_loop()
    return None


@dataclass
class Call:
    delivery_id: str
    document: ResultDocument
    outcome: str = "in flight"  # then "delivered", or the error's class name


class FakeExporter:
    """An exporter that keeps every delivery it is given (``calls``), fails the next ones
    when told (:meth:`fail`), and, while ``hold`` is cleared, keeps each delivery in
    flight until it is set."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.calls: list[Call] = []
        self.failures: list[ExportError] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.started = self.closed = False
        self._called = asyncio.Condition()

    def fail(self, times: int = 1, *, permanent: bool = False,
             message: str = "the destination is down") -> None:
        """Fail the next ``times`` deliveries: with ExportError (tried again), or with
        PermanentExportError (dead-lettered at once)."""
        kind = PermanentExportError if permanent else ExportError
        self.failures += [kind(message) for _ in range(times)]

    @property
    def delivered(self) -> list[str]:
        """The ids of the deliveries that succeeded, in order."""
        return [c.delivery_id for c in self.calls if c.outcome == "delivered"]

    async def wait_calls(self, count: int) -> list[Call]:
        """Wait until ``count`` deliveries were started (in real time, at most
        ``WAIT_SECONDS``: the outbox's own tasks and its SQLite reads must run)."""
        async with asyncio.timeout(WAIT_SECONDS), self._called:
            await self._called.wait_for(lambda: len(self.calls) >= count)
        return self.calls

    async def start(self) -> None:
        self.started = True

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        call = Call(delivery_id, document)
        self.calls.append(call)
        async with self._called:
            self._called.notify_all()
        await self.hold.wait()
        if self.failures:
            error = self.failures.pop(0)
            call.outcome = type(error).__name__
            raise error
        call.outcome = "delivered"

    async def close(self) -> None:
        self.closed = True
