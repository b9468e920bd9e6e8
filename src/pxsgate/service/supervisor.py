"""The supervisor: one task on the event loop, for as long as the service runs.

Every second it enforces the batch time limit and feeds systemd's watchdog; every 10 s it
sends a ``STATUS=`` line and refreshes the pending-deliveries gauge; every minute it runs
retention; every five minutes it refreshes the drift gauges (pxsgate.trends). The watchdog
is fed only while the model worker is alive and not stuck, and only from here: a blocked
loop stops feeding it too, and systemd restarts the service. A worker found stuck or dead
is reported once, through ``on_unhealthy``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from pxsgate.infer import InferenceWorker
from pxsgate.records import DeliveryState
from pxsgate.retention import Retention
from pxsgate.service.metrics import Metrics
from pxsgate.service.sdnotify import Notifier
from pxsgate.store import Store
from pxsgate.trends import DriftMonitor

log = structlog.get_logger("pxsgate.server")

STATUS_EVERY_S = 10.0
RETENTION_EVERY_S = 60.0
UNHEALTHY = "the model worker is stuck or died"


class Supervisor:
    """Start it once everything it watches runs (:meth:`start`); :meth:`stop` it first."""

    def __init__(self, notifier: Notifier, worker: InferenceWorker, store: Store,
                 retention: Retention, metrics: Metrics, status_line: Callable[[], str],
                 on_unhealthy: Callable[[str], None],
                 drift: DriftMonitor | None = None) -> None:
        self._notifier = notifier
        self._worker = worker
        self._store = store
        self._retention = retention
        self._metrics = metrics
        self._status_line = status_line
        self._on_unhealthy = on_unhealthy
        self._drift = drift
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the task and wait for it (idempotent; nothing to do if never started)."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # whatever it was, the stop goes on
            log.error("gateway.supervisor_failed", error=repr(exc))
        self._task = None

    async def _run(self) -> None:
        interval = self._notifier.watchdog_interval()
        tick = min(1.0, interval) if interval else 1.0
        last_status = last_retention = 0.0
        while True:
            now = time.monotonic()
            self._check_worker()
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                await self._report_status()
            if now - last_retention >= RETENTION_EVERY_S:
                last_retention = now
                await self._run_retention()
            await self._refresh_drift()
            await asyncio.sleep(tick)

    def _check_worker(self) -> None:
        """The batch time limit; then the watchdog while healthy, else ``on_unhealthy``."""
        if self._worker.check_time_limit() and self._worker.alive:
            self._notifier.watchdog()
        else:
            self._on_unhealthy(UNHEALTHY)

    async def _report_status(self) -> None:
        self._notifier.status(self._status_line())
        try:
            counts = await self._store.delivery_counts()
            self._metrics.deliveries_pending.set(counts.get(DeliveryState.PENDING, 0))
        except Exception as exc:  # the store is busy or failing: next time
            log.warning("metrics.deliveries_failed", error=repr(exc))

    async def _refresh_drift(self) -> None:
        if self._drift is None:
            return
        try:
            await self._drift.refresh_if_stale()
        except Exception as exc:  # the store is busy or failing: the gauges wait
            log.warning("metrics.drift_failed", error=repr(exc))

    async def _run_retention(self) -> None:
        try:
            await self._retention.run()
        except Exception as exc:  # retention must never take reception down
            log.error("retention.failed", error=repr(exc))
