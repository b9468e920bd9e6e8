"""Study assembly: group instances by StudyInstanceUID and decide when a study is complete.

DICOM has no "end of study" message, so completeness is inferred from time (as Orthanc's
StableAge and Clara's DICOM Adapter do): a study is *ready* when no association that brought
it is still open and for ``settle-seconds`` since the later of its last instance and its
last association release nothing new arrived; or, for a sender that keeps an association
open, after ``quiet-timeout-seconds`` with no new instance. Both come from the assembly
section or from the AE title the last instance was sent to. An instance that arrives after
a study was handed on starts a new round: the study becomes ready again and is scored again.

The timers live here, armed on a :class:`~pxsgate.clock.Clock` (the event loop's, unless
a test passes a fake one); the deadlines they stand for are also written to SQLite by the
gateway, so a restart resumes them (:meth:`Assembler.resume`).

Everything here runs on the event loop; there are no locks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from pxsgate.clock import Clock, SystemClock, Timer

ReadyHandler = Callable[[str, str], None]  # (study uid, why: "settled" | "quiet-timeout"
#                                            | "forced")


@dataclass
class _Pending:
    last_instance: float
    settle: float
    quiet: float
    last_release: float = 0.0
    open_associations: set[str] = field(default_factory=set)
    timer: Timer | None = None


class Assembler:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_ready: ReadyHandler,
        clock: Clock | None = None,
    ) -> None:
        self._on_ready = on_ready
        self._clock = clock or SystemClock(loop)
        self._pending: dict[str, _Pending] = {}
        self._by_association: dict[str, set[str]] = {}

    @property
    def pending(self) -> int:
        """How many studies are still being received."""
        return len(self._pending)

    def instance_arrived(self, study_uid: str, association_id: str, settle: float,
                         quiet: float) -> None:
        now = self._clock.monotonic()
        state = self._pending.get(study_uid)
        if state is None:
            state = self._pending[study_uid] = _Pending(now, settle, quiet)
        state.last_instance, state.settle, state.quiet = now, settle, quiet
        state.open_associations.add(association_id)
        self._by_association.setdefault(association_id, set()).add(study_uid)
        self._schedule(study_uid, state)

    def association_closed(self, association_id: str) -> dict[str, float]:
        """Note an association's end; return the studies it brought, each with the seconds
        until it is ready if nothing more arrives."""
        delays: dict[str, float] = {}
        for study_uid in self._by_association.pop(association_id, set()):
            state = self._pending.get(study_uid)
            if state is not None:
                state.open_associations.discard(association_id)
                state.last_release = now = self._clock.monotonic()
                self._schedule(study_uid, state)
                delays[study_uid] = max(0.0, self._deadline(state) - now)
        return delays

    def resume(self, study_uid: str, delay: float, settle: float, quiet: float) -> None:
        """Re-arm a study that was pending when the service stopped: ready in ``delay``
        seconds unless more arrives (its associations ended with the old process)."""
        now = self._clock.monotonic()
        state = _Pending(now + delay - settle, settle, quiet)
        self._pending[study_uid] = state
        self._schedule(study_uid, state)

    def receiving(self, study_uid: str) -> bool:
        """Whether the study is still being received (its timer is armed)."""
        return study_uid in self._pending

    def force(self, study_uid: str) -> bool:
        """Make a study still being received ready now (an operator's force completion,
        the web UI's Operations page); False when it is not being received."""
        state = self._pending.pop(study_uid, None)
        if state is None:
            return False
        if state.timer is not None:
            state.timer.cancel()
        for assoc_id in state.open_associations:
            self._by_association.get(assoc_id, set()).discard(study_uid)
        self._on_ready(study_uid, "forced")
        return True

    def close(self) -> None:
        for state in self._pending.values():
            if state.timer is not None:
                state.timer.cancel()
        self._pending.clear()
        self._by_association.clear()

    def _deadline(self, state: _Pending) -> float:
        if state.open_associations:
            return state.last_instance + state.quiet
        # Settle counts from the later of the last instance and the last release, so a
        # router that sends one image per association gets time to open the next one.
        return max(state.last_instance, state.last_release) + state.settle

    def _schedule(self, study_uid: str, state: _Pending) -> None:
        if state.timer is not None:
            state.timer.cancel()
        delay = max(0.0, self._deadline(state) - self._clock.monotonic())
        state.timer = self._clock.call_later(delay, functools.partial(self._check, study_uid))

    def _check(self, study_uid: str) -> None:
        state = self._pending.get(study_uid)
        if state is None:
            return
        if self._clock.monotonic() < self._deadline(state):
            self._schedule(study_uid, state)  # an instance arrived since the timer was set
            return
        del self._pending[study_uid]
        why = "quiet-timeout" if state.open_associations else "settled"
        for assoc_id in state.open_associations:
            self._by_association.get(assoc_id, set()).discard(study_uid)
        self._on_ready(study_uid, why)
