"""The outbox: deliver every stored result to the configured exporters, at least once.

The delivery rows are written by :meth:`Store.store_result` in the result's own transaction,
so a result is never committed without them and a crash never loses one. This task sends
the pending ones: per exporter a bounded number at a time, under a rate limit
(asyncio-throttle), and on failure again after an exponential backoff with jitter, until
``max-attempts`` tries have failed and the row is dead-lettered (``pxsgate outbox retry``
revives it). A delivery interrupted by a crash or a stop is still pending and is sent again
on the next start: at least once, never silently dropped. Receivers de-duplicate on the
delivery's stable id (HTTP) or on the SR's derived SOP Instance UID (DICOM).

Due times are epoch seconds (they are stored), read and waited for on a
:class:`~pxsgate.clock.Clock`: the system's, unless a test passes a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog
from asyncio_throttle.throttler import Throttler

from pxsgate.clock import SYSTEM, Clock
from pxsgate.config import ExporterConfig
from pxsgate.document import ResultDocument
from pxsgate.errors import PermanentExportError
from pxsgate.records import now_iso
from pxsgate.service.metrics import Metrics
from pxsgate.store import Delivery, Store

log = structlog.get_logger("pxsgate.outbox")

POLL_SECONDS = 5.0  # how soon a `pxsgate outbox retry` from another process is noticed
BATCH = 64  # due deliveries fetched per round
CONCURRENCY = 4  # deliveries in flight per exporter


class Exporter(Protocol):
    """One destination. ``deliver`` raises ExportError to be tried again later, and
    PermanentExportError when no retry can help."""

    name: str

    async def start(self) -> None: ...

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None: ...

    async def close(self) -> None: ...


def backoff_seconds(tries: int, config: ExporterConfig, rng: random.Random) -> float:
    """Wait after ``tries`` failed tries: min(max, initial * 2^(tries-1)), half of it
    random ("equal jitter"), so receivers coming back are not hit by every sender at once."""
    base = min(config.backoff_max_seconds,
               config.backoff_initial_seconds * 2.0 ** min(tries - 1, 62))
    return base / 2 + rng.uniform(0, base / 2)


def throttler(rate_per_second: float) -> Throttler:
    """A Throttler letting ``rate_per_second`` deliveries start per second on average."""
    burst = max(1, math.floor(rate_per_second))
    return Throttler(rate_limit=burst, period=burst / rate_per_second)


class Outbox:
    def __init__(self, store: Store, exporters: Mapping[str, Exporter],
                 configs: Mapping[str, ExporterConfig], rng: random.Random | None = None,
                 metrics: Metrics | None = None, clock: Clock = SYSTEM) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._exporters = dict(exporters)
        self._configs = dict(configs)
        self._names = sorted(self._exporters)
        self._rng = rng or random.Random()
        self._throttles = {n: throttler(self._configs[n].rate_per_second) for n in self._names}
        self._slots = {n: asyncio.Semaphore(CONCURRENCY) for n in self._names}
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        started: list[Exporter] = []
        try:
            for name in self._names:
                await self._exporters[name].start()
                started.append(self._exporters[name])
        except BaseException:
            for exporter in started:
                await exporter.close()
            raise
        if self._names:
            await self._store.release_leases()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            log.info("outbox.started", exporters=self._names)

    def wake(self) -> None:
        """New deliveries were committed: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop taking new deliveries, give those in flight ``grace_seconds``, then cancel
        them (they stay pending and are sent on the next start)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._in_flight:
            _, late = await asyncio.wait(list(self._in_flight.values()), timeout=grace_seconds)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                log.warning("outbox.interrupted", deliveries=len(late),
                            note="still pending; sent again on the next start")
        for name in self._names:
            await self._exporters[name].close()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch()
                next_due = await self._store.next_delivery_time(self._names)
            except Exception as exc:  # the store is busy or broken: keep trying, loudly
                log.error("outbox.poll_failed", error=repr(exc))
                next_due = None
            wait = POLL_SECONDS
            if next_due is not None:
                wait = min(wait, max(0.0, next_due - self._clock.time()))
            timer = self._clock.call_later(wait, self._wake.set)  # a wake-up at the latest
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _dispatch(self) -> None:
        due = await self._store.due_deliveries(self._clock.time(), self._names, BATCH,
                                               skip=self._in_flight.keys())
        loop = asyncio.get_running_loop()
        for delivery in due:
            task = loop.create_task(self._deliver(delivery))
            self._in_flight[delivery.id] = task
            task.add_done_callback(functools.partial(self._done, delivery.id))

    def _done(self, delivery_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        self._wake.set()  # the slot is free: the next due delivery can go

    async def _deliver(self, delivery: Delivery) -> None:
        config = self._configs[delivery.exporter]
        exporter = self._exporters[delivery.exporter]
        tries = delivery.attempts + 1
        context: dict[str, Any] = {"exporter": delivery.exporter, "delivery": delivery.id,
                                   "attempt": tries}
        async with self._slots[delivery.exporter]:
            # asyncio-throttle's methods carry no annotations.
            await self._throttles[delivery.exporter].acquire()  # type: ignore[no-untyped-call]
            started = time.perf_counter()
            try:
                document = _readable(await self._store.result(delivery.result_id))
                context["study"] = self._store.study_label(document.study_instance_uid)
                await asyncio.wait_for(exporter.deliver(delivery.id, document),
                                       config.timeout_seconds + 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = str(exc) or repr(exc)
                if isinstance(exc, PermanentExportError) or tries >= config.max_attempts:
                    await self._store.delivery_failed(delivery.id, error, now_iso(), None)
                    self._metrics.exports.labels(exporter=delivery.exporter,
                                                 outcome="dead").inc()
                    log.error("export.dead", error=error, **context)
                    return
                wait = backoff_seconds(tries, config, self._rng)
                await self._store.delivery_failed(delivery.id, error, now_iso(),
                                                  self._clock.time() + wait)
                self._metrics.exports.labels(exporter=delivery.exporter,
                                             outcome="failed").inc()
                log.warning("export.failed", error=error, retry_in_s=round(wait, 1),
                            **context)
                return
        await self._store.delivery_done(delivery.id, now_iso())
        self._metrics.exports.labels(exporter=delivery.exporter, outcome="delivered").inc()
        log.info("export.delivered",
                 duration_ms=round((time.perf_counter() - started) * 1000, 1),
                 **context)


def _readable(stored: Mapping[str, Any] | None) -> ResultDocument:
    """The stored result as the exporters read it; a result that is gone or that no longer
    reads as a result document cannot be delivered by any later try."""
    if stored is None:
        raise PermanentExportError("its result is not in the store")
    try:
        return ResultDocument.from_json(stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentExportError(
            f"its stored result is not a readable result document ({type(exc).__name__})"
        ) from exc
