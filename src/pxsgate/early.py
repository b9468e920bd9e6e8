"""Decode on arrival (``preprocess.decode-on-arrival``, issue 24).

A study is scored only once it has settled (``assembly.settle-seconds`` after its last
association's release), and decoding a JPEG 2000 radiograph takes longer than anything
after that. So an instance that the selection rules could choose, judged from its header
alone (:func:`pxsgate.rules.could_be_selected`), is decoded and preprocessed as soon as it
is stored, by the same decode processes and the same function as at ready time, and its
8-bit model input waits here, in memory, until its study is ready:

- *Never in front of anyone.* The header is read on a thread of its own after the instance
  is acknowledged (nothing here runs on the path to the C-STORE answer); a decode starts
  only while a decode process is idle (``DecodePool.in_flight`` below its workers), so a
  study that is ready waits behind at most the one decode each process has begun, never
  behind a queue of them. At most ``WAITING_PER_WORKER`` per process wait for one; beyond
  that an arrival is not decoded early (``skipped``).
- *Bounded.* The kept images take at most ``preprocess.on-arrival-cache-mb``; beyond it the
  oldest are dropped (``evicted``).
- *Used once, or not at all.* When its study is ready (:meth:`EarlyDecodes.claim`) the
  selected instances' decodes are handed to that round of scoring, which awaits one still
  running; the others are dropped (``unused``). An image is used only when its file is the
  one that was decoded (device, inode, size, mtime: a re-sent instance replaces its file).
  What failed, was dropped or had not started is decoded at ready time, exactly as with
  decode on arrival off; so is every image of a later try or round. After a restart
  nothing is kept.

The same function on the same file gives the same bytes: the scores are identical
(tests/test_early.py).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import structlog
from pydicom import dcmread

from pxsgate import rules
from pxsgate.config import SelectionConfig
from pxsgate.decode import DecodePool
from pxsgate.preprocess import U8Array
from pxsgate.records import ReceivedInstance, StoredInstance, StudyDecision
from pxsgate.service.metrics import Metrics

log = structlog.get_logger("pxsgate.pipeline")

# Instances waiting for an idle decode process, per process, before arrivals are skipped.
WAITING_PER_WORKER = 4

Outcome = Literal["used", "unused", "failed", "skipped", "evicted"]
FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def file_id(path: Path) -> FileId | None:
    """Which file ``path`` is now (None: none). The spool writes a file beside and renames
    it over the old one, so a re-sent instance's file is another inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def candidate_file(path: Path, selection: SelectionConfig) -> FileId | None:
    """The file's identity when its header says it could be model input, else None (an
    unreadable header is never model input). Read as at ready time (study.read_headers)."""
    identity = file_id(path)
    if identity is None:
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True)
        return identity if rules.could_be_selected(ds, selection) else None
    except Exception:  # a peer's header can fail in any way; the ready-time path judges it
        return None


class Early:
    """One instance's decode on arrival."""

    def __init__(self, study_uid: str, sop_uid: str, path: Path) -> None:
        self.study_uid = study_uid
        self.sop_uid = sop_uid
        self.path = path
        self.identity: FileId | None = None  # the file, as checked before the decode
        self.decoding = False  # its decode has begun (it may have ended)
        self.image: U8Array | None = None
        self.kept = False  # in the cache, its bytes counted
        self.outcome: Outcome | None = None  # counted once, by the first that settles it
        self.task: asyncio.Task[U8Array | None] | None = None


class EarlyDecodes:
    """The decodes on arrival of one gateway, and the model inputs they made (on the loop)."""

    def __init__(self, decoder: DecodePool, selection: Callable[[], SelectionConfig],
                 metrics: Metrics, max_bytes: int) -> None:
        self._decoder = decoder
        self._selection = selection  # the current rules (replaced on reload)
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._max_waiting = WAITING_PER_WORKER * decoder.workers
        # (study, SOP instance) -> its decode; insertion order is age, for eviction.
        self._entries: dict[tuple[str, str], Early] = {}
        self._held = 0  # bytes of the kept images
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[U8Array | None]] = set()
        # Header reads of their own: never in the way of a ready study's (study.py's pool).
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pxsgate-early")
        self._closed = False
        decoder.when_freed(self._wake)

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        """Instances checked or waiting for a decode process."""
        return sum(1 for e in self._entries.values() if not e.decoding)

    # --- arrival ---------------------------------------------------------------------------

    def arrived(self, instance: ReceivedInstance) -> None:
        """An image instance stored and indexed (new, or a new version): decode it early if
        its header allows it. Returns at once; never raises for the instance's sake."""
        if self._closed:
            return
        key = (instance.study_instance_uid, instance.sop_instance_uid)
        if (old := self._entries.pop(key, None)) is not None:
            self._drop(old, "unused")  # the earlier version's file is gone
        if self.waiting >= self._max_waiting:
            self._settle(None, "skipped")
            return
        entry = Early(instance.study_instance_uid, instance.sop_instance_uid, instance.path)
        self._entries[key] = entry
        task = entry.task = asyncio.get_running_loop().create_task(self._run(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, entry: Early) -> U8Array | None:
        """The check, the wait for an idle decode process, the decode: the model input, or
        None (not a possible model input, or it failed: decoded again when ready)."""
        try:
            return await self._check_and_decode(entry)
        except Exception as exc:  # the image's, the decoder's, or ours: decoded when ready
            log.info("decode.on_arrival_failed", error=type(exc).__name__)
            self._settle(entry, "failed")
            self._forget(entry)
            return None

    async def _check_and_decode(self, entry: Early) -> U8Array | None:
        loop = asyncio.get_running_loop()
        identity = await loop.run_in_executor(self._thread, candidate_file, entry.path,
                                              self._selection())
        if identity is None:  # never model input: nothing to decode, nothing counted
            self._forget(entry)
            return None
        entry.identity = identity
        while self._decoder.in_flight >= self._decoder.workers:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        entry.decoding = True
        self._metrics.model_input_decodes.labels(stage="arrival").inc()
        image = await self._decoder.preprocess(entry.path)
        if self._entries.get((entry.study_uid, entry.sop_uid)) is entry:
            entry.image, entry.kept = image, True
            self._held += image.nbytes
            self._evict()
        return image

    def _wake(self) -> None:
        """A decode process may be idle: the waiting decodes look again, oldest first."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _evict(self) -> None:
        while self._held > self._max_bytes:
            oldest = next((e for e in self._entries.values() if e.kept), None)
            if oldest is None:
                return
            self._drop(oldest, "evicted")

    # --- ready -----------------------------------------------------------------------------

    def claim(self, study_uid: str, instances: Sequence[StoredInstance],
              decision: StudyDecision) -> dict[str, Early]:
        """The study is ready and decided: its selected instances' decodes (begun or done)
        by SOP Instance UID, for this round of scoring to use once (:meth:`use`); every
        other decode of these instances is dropped. Instances that arrive later keep
        theirs, for the next round."""
        selected = {d.sop_instance_uid for d in decision.inputs} if decision.candidate else set()
        claimed: dict[str, Early] = {}
        for inst in instances:
            entry = self._entries.pop((study_uid, inst.sop_instance_uid), None)
            if entry is None:
                continue
            self._unkeep(entry)
            if inst.sop_instance_uid not in selected or inst.path != entry.path:
                self._drop(entry, "unused")
            elif not entry.decoding:  # not begun: decoded now, as without decode on arrival
                self._drop(entry, "skipped")
            else:
                claimed[inst.sop_instance_uid] = entry
        return claimed

    async def use(self, entry: Early) -> U8Array | None:
        """The model input decoded on arrival (awaited if still decoding), or None when
        there is none to use: the caller decodes the file as without decode on arrival."""
        task = entry.task
        assert task is not None
        try:
            image = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the study's own cancellation
            image = None
        except Exception:  # _run returns its failures as None: never the study's problem
            image = None
        if image is None:
            self._settle(entry, "failed")
            return None
        if await asyncio.to_thread(file_id, entry.path) != entry.identity:
            self._settle(entry, "unused")  # the file changed since: decode the one there now
            return None
        self._settle(entry, "used")
        return image

    def release(self, claimed: Iterable[Early]) -> None:
        """A round is over: what it claimed and did not use (a try failed or was cancelled
        first) is counted unused."""
        for entry in claimed:
            self._settle(entry, "unused")

    # --- bookkeeping -----------------------------------------------------------------------

    def _settle(self, entry: Early | None, outcome: Outcome) -> None:
        if entry is not None:
            if entry.outcome is not None:
                return
            entry.outcome = outcome
        self._metrics.early_decodes.labels(outcome=outcome).inc()

    def _unkeep(self, entry: Early) -> None:
        if entry.kept:
            entry.kept = False
            assert entry.image is not None
            self._held -= entry.image.nbytes

    def _forget(self, entry: Early) -> None:
        key = (entry.study_uid, entry.sop_uid)
        if self._entries.get(key) is entry:
            del self._entries[key]
            self._unkeep(entry)

    def _drop(self, entry: Early, outcome: Outcome) -> None:
        """Out of the cache, counted. One not decoding yet is cancelled; one decoding runs to
        its end (its process cannot be interrupted) and is forgotten then."""
        self._forget(entry)
        entry.image = None
        self._settle(entry, outcome)
        if not entry.decoding and entry.task is not None:
            entry.task.cancel()

    async def close(self) -> None:
        """Stop: nothing more starts, what runs is cancelled (before the decode pool
        stops); the kept images are let go."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        self._held = 0
        self._thread.shutdown(wait=False, cancel_futures=True)
