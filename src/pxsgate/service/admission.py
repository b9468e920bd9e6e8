"""Backpressure: whether an association may write one more instance, and how long its
C-STORE answer waits first.

Asked by the receiver's association threads (pynetdicom runs each association in a thread
of its own) before an instance is written. The answer is a delay in seconds, growing with
the backlog beyond ``backpressure.delay-above-studies``, or the reason for a refusal
(0xA700, Out of Resources) beyond ``refuse-above-studies`` or over the spool's ceiling,
once retention could not make room in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from pxsgate.config import BackpressureConfig
from pxsgate.retention import Retention

log = structlog.get_logger("pxsgate.server")

ROOM_TIMEOUT_S = 10.0  # an association thread waits this long for retention to make room


class AdmissionControl:
    """The receiver's ``admit`` callable (:meth:`admit`), over the backlog the pipeline
    reports and the spool that retention keeps under its ceiling."""

    def __init__(self, backpressure: BackpressureConfig, retention: Retention,
                 backlog: Callable[[], int], loop: asyncio.AbstractEventLoop) -> None:
        self._bp = backpressure
        self._retention = retention
        self._backlog = backlog  # studies waiting for, or in, processing
        self._loop = loop  # retention runs there (it uses the store)

    def admit(self, size: int) -> float | str:
        """On an association thread, before an instance of ``size`` bytes is written: a
        delay (0.0: none), or why it is refused."""
        bp = self._bp
        backlog = self._backlog()
        if backlog >= bp.refuse_above_studies:
            return f"busy: {backlog} studies waiting"
        if self._retention.over_ceiling(size) and not self._make_room(size):
            return "the spool is at its ceiling"
        if backlog < bp.delay_above_studies:
            return 0.0
        span = max(1, bp.refuse_above_studies - bp.delay_above_studies)
        return bp.max_delay_seconds * min(1.0, (backlog - bp.delay_above_studies + 1) / span)

    def _make_room(self, size: int) -> bool:
        """On an association thread: run retention now (early deletion of finished
        studies, oldest first) and say whether the spool is under its ceiling again."""
        try:
            asyncio.run_coroutine_threadsafe(self._retention.run(size), self._loop).result(
                timeout=ROOM_TIMEOUT_S)
        except Exception as exc:  # the loop is closing, or deleting failed: refuse
            log.error("retention.failed", error=repr(exc))
            return False
        return not self._retention.over_ceiling(size)
