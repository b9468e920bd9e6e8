"""The study pipeline's scheduling: which ready study is processed when.

A study handed here by the assembler is processed (:class:`pxsgate.study.StudyProcessor`:
select -> score -> document -> store) as one asyncio task, at most
``jobs.max-studies-in-progress`` at once; the others wait their turn, first come first
served. A study that becomes ready again while it is being processed (late instances) is
processed once more afterwards, so the newest instances always get a result. A study whose
processing crashed (the store, the disk, a bug) is tried again later and later, and given a
FAILED result if pxsgate's own code keeps failing on it. Decoded images are handed out
fairly between studies (:class:`FairSlots`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog

from pxsgate.config import Config, SelectionConfig
from pxsgate.decode import DecodePool, decoded_image_bound
from pxsgate.early import EarlyDecodes
from pxsgate.errors import StoreError
from pxsgate.infer import ImageResult, InferenceWorker, ModelGate
from pxsgate.pictures import PictureStore, Thumbnailer
from pxsgate.priors.finder import PriorFinder
from pxsgate.priors.source import PriorSource
from pxsgate.results import ModelInfo
from pxsgate.service.metrics import Metrics
from pxsgate.store import Store
from pxsgate.study import StudyProcessor

log = structlog.get_logger("pxsgate.pipeline")

MAX_CRASH_DELAY_S = 300.0  # a crashed study is tried again after 5 s, 10 s, ... up to this


class FairSlots:
    """A bounded number of slots (decoded images in flight), handed out in turn between
    studies: when one frees, it goes to the next study in rotation that is waiting, not to
    the study that queued the most images. A one-image study arriving behind a study of
    hundreds waits for one slot, not for all of the big study's images."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] \
            = collections.OrderedDict()

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        await self._acquire(key)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, key: str) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, collections.deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted as it was cancelled: pass the slot on
            else:
                self._forget(key, future)
            raise

    def _release(self) -> None:
        self._free += 1
        while self._free > 0 and self._waiting:
            key, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)  # this study's next image waits its turn
            else:
                del self._waiting[key]
            if not future.done():
                self._free -= 1
                future.set_result(None)

    def _forget(self, key: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[key]


PRIOR_SLOT = "prior"  # the decoded-image slots' key, and the log tag, of priors' images


class Pipeline:
    def __init__(self, config: Config, store: Store, worker: InferenceWorker, model: ModelInfo,
                 executor: concurrent.futures.Executor, decoder: DecodePool,
                 on_deliveries: Callable[[], None] = lambda: None,
                 metrics: Metrics | None = None,
                 prior_source: PriorSource | None = None,
                 pictures: PictureStore | None = None,
                 thumbnails: Thumbnailer | None = None,
                 early: EarlyDecodes | None = None) -> None:
        self._config = config
        self._store = store
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        # Ready studies beyond jobs.max-studies-in-progress wait here, first come first
        # served, as UIDs: their images stay files in the spool.
        self._waiting: collections.deque[str] = collections.deque()
        self._crashes: dict[str, int] = {}  # unexpected errors per study, for the retry delay
        self._give_up: dict[str, str] = {}  # studies to store as FAILED, with the error
        self._retry_timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        # Decoded images held at once, from decode start to score: a batch being scored, the
        # next one filling, and one image per decode process. However many studies arrive
        # together, memory stays bounded; the rest wait as files in the spool.
        self.max_decoded = decoded_image_bound(config.model.batch.max_size, decoder.workers)
        self._decoded = FairSlots(self.max_decoded)
        gate = ModelGate()

        async def embed_prior(path: Path) -> ImageResult:
            """A prior's image from the PACS through the same decode and model."""
            async with gate.shared(), self._decoded.slot(PRIOR_SLOT):
                image = await decoder.preprocess(path)
                return await worker.score_image(image, PRIOR_SLOT)

        self.priors = None if prior_source is None else PriorFinder(
            config.priors, prior_source, store, embed_prior,
            selection=lambda: self._study.selection, priors_dir=config.priors_dir,
            weights_sha256=model.weights_sha256, anchors_sha256=model.anchors_sha256,
            metrics=metrics)
        if self.priors is not None:
            self.priors.clear_leftovers()
        self._study = StudyProcessor(
            config, store, worker, model, executor=executor, decoder=decoder,
            gate=gate, decoded_slot=self._decoded.slot, on_deliveries=on_deliveries,
            metrics=metrics or Metrics(), priors=self.priors, pictures=pictures,
            thumbnails=thumbnails, early=early)

    @property
    def selection(self) -> SelectionConfig:
        """The selection rules studies are processed with (replaced on reload, SIGHUP)."""
        return self._study.selection

    @selection.setter
    def selection(self, selection: SelectionConfig) -> None:
        self._study.selection = selection

    @property
    def busy(self) -> int:
        """Studies being processed now."""
        return len(self._running)

    @property
    def backlog(self) -> int:
        """Studies ready and not yet finished: being processed, or waiting their turn.
        Read from association threads for backpressure (an int read is atomic)."""
        return len(self._running) + len(self._waiting)

    def submit(self, study_uid: str) -> None:
        """Process a ready study (called on the loop by the assembler)."""
        if (timer := self._retry_timers.pop(study_uid, None)) is not None:
            timer.cancel()  # ready again meanwhile: processed now, once
        if study_uid in self._running:
            self._again.add(study_uid)
            return
        if study_uid in self._waiting:
            return
        if self._closing:
            return  # stays unfinished in the store; the next start resumes it
        if len(self._running) >= self._config.jobs.max_studies_in_progress:
            self._waiting.append(study_uid)
            return
        task = asyncio.get_running_loop().create_task(self._process(study_uid))
        self._running[study_uid] = task
        task.add_done_callback(functools.partial(self._finished, study_uid))

    async def _process(self, study_uid: str) -> None:
        if (error := self._give_up.get(study_uid)) is not None:
            await self._study.fail_internally(study_uid, error)
            self._give_up.pop(study_uid, None)
            return
        await self._study.process(study_uid)

    def _finished(self, study_uid: str, task: asyncio.Task[None]) -> None:
        del self._running[study_uid]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._crashed(study_uid, exc)
        else:
            self._crashes.pop(study_uid, None)
        if study_uid in self._again:
            self._again.discard(study_uid)
            self.submit(study_uid)
        while (self._waiting and not self._closing
               and len(self._running) < self._config.jobs.max_studies_in_progress):
            self.submit(self._waiting.popleft())

    def _crashed(self, study_uid: str, exc: BaseException) -> None:
        """Not a study's own failure (those are stored as FAILED) but the store or a bug:
        the study is still unfinished in the store, so it is tried again, later and later,
        never dropped."""
        crashes = self._crashes[study_uid] = self._crashes.get(study_uid, 0) + 1
        delay = min(MAX_CRASH_DELAY_S, 5.0 * 2 ** (crashes - 1))
        log.error("study.crashed", study=self._store.study_label(study_uid), error=repr(exc),
                  retry_in_s=delay)
        ours = not isinstance(exc, sqlite3.Error | OSError | StoreError)
        if ours and crashes >= self._config.jobs.max_attempts:
            # The same study keeps failing in pxsgate's own code: give it a FAILED
            # result rather than try for ever. Not for the store or the disk failing
            # (locked, full): those pass, and the study is tried again until then.
            self._give_up[study_uid] = f"pxsgate failed on this study: {exc!r}"[:500]
        if not self._closing:
            self._retry_timers[study_uid] = asyncio.get_running_loop().call_later(
                delay, self._retry, study_uid)

    def reopened(self, study_uid: str) -> None:
        """A new instance arrived for the study: a fresh round, with fresh chances."""
        self._give_up.pop(study_uid, None)
        self._crashes.pop(study_uid, None)

    def _retry(self, study_uid: str) -> None:
        self._retry_timers.pop(study_uid, None)
        self.submit(study_uid)

    def close(self) -> None:
        """Start no more studies: the waiting ones stay unfinished in the store, where
        the next start finds them."""
        self._closing = True
        self._waiting.clear()
        for timer in self._retry_timers.values():
            timer.cancel()
        self._retry_timers.clear()

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def cancel(self) -> None:
        """Stop the studies still in progress (after the drain time ran out); they stay
        ``inferring`` in the store and resume at the next start, the try counted."""
        for task in self._running.values():
            task.cancel()
        await self.drain()
