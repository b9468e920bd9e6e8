"""The study pipeline: ready study -> select -> preprocess -> infer -> result -> store.

A study handed here by the assembler is processed as one asyncio task. Header reads run on
a thread pool, pixel decoding and preprocessing in the decode.DecodePool processes,
inference on the worker thread; the loop only coordinates. A study that becomes ready
again while it is being processed (late instances) is processed once more afterwards, so
the newest instances always get a result.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import structlog
from pydicom import dcmread

from pxsgate import change, rules
from pxsgate.config import Config, SelectionConfig
from pxsgate.decode import DecodePool, decoded_image_bound
from pxsgate.errors import DecodeFailed, ModelError, PreprocessError, PxsgateError, StoreError
from pxsgate.infer import ImageResult, InferenceWorker, ModelGate
from pxsgate.records import (
    ImageDecision,
    PriorImage,
    ScoredImage,
    StoredInstance,
    StudyDecision,
    now_iso,
)
from pxsgate.results import ModelInfo, StudyIdentity, build_document, dicom_datetime
from pxsgate.rules import Header
from pxsgate.service.metrics import Metrics
from pxsgate.store import UNFINISHED_STATES, ImageEmbedding, Store, StudyEmbeddings

log = structlog.get_logger("pxsgate.pipeline")


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


@dataclasses.dataclass(frozen=True)
class Scored:
    """A study's try: the images scored, and those whose own pixel data could not be."""

    images: list[ScoredImage]
    unscorable: list[tuple[ImageDecision, str]]
R = TypeVar("R")

EXIT_PREPROCESS = 1  # the image could not be decoded or prepared
EXIT_MODEL = 2  # the model failed
EXIT_INTERNAL = 3  # pxsgate itself failed on this study, again and again (a bug)


def read_headers(instances: Sequence[StoredInstance]) -> list[Header]:
    """Read each instance's header (no pixel data); an unreadable file is kept with its error."""
    headers = []
    for inst in instances:
        try:
            ds = dcmread(inst.path, stop_before_pixels=True)
        except Exception as exc:  # malformed files fail in many ways; keep the reason
            headers.append(Header(inst, None, str(exc)[:200]))
        else:
            headers.append(Header(inst, ds))
    return headers


def identity_of(study_uid: str, headers: Sequence[Header]) -> StudyIdentity:
    for h in headers:
        if h.dataset is not None:
            return StudyIdentity(study_uid, h.text("PatientID"), h.text("AccessionNumber"),
                                 dicom_datetime(h.text("StudyDate"), h.text("StudyTime")))
    return StudyIdentity(study_uid, "", "")


def _seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def _stage_durations(stages: dict[str, str | None]) -> dict[str, float]:
    """Milliseconds between consecutive stages, for the result.stored log line."""
    names = [n for n in ("received", "released", "ready", "inferred", "stored")
             if stages.get(n)]
    return {f"{a}_to_{b}_ms": round(_seconds_between(str(stages[a]), str(stages[b])) * 1000, 1)
            for a, b in itertools.pairwise(names)}


class Pipeline:
    def __init__(self, config: Config, store: Store, worker: InferenceWorker, model: ModelInfo,
                 executor: concurrent.futures.Executor, decoder: DecodePool,
                 on_deliveries: Callable[[], None] = lambda: None,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._on_deliveries = on_deliveries  # wakes the outbox
        self.selection: SelectionConfig = config.selection  # replaced on reload (SIGHUP)
        self._store = store
        self._worker = worker
        self._model = model
        self._executor = executor
        self._decoder = decoder
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        # Ready studies beyond jobs.max-studies-in-progress wait here, first come first
        # served, as UIDs: their images stay files in the spool.
        self._waiting: collections.deque[str] = collections.deque()
        self._crashes: dict[str, int] = {}  # unexpected errors per study, for the retry delay
        self._give_up: dict[str, str] = {}  # studies to store as FAILED, with the error
        self._retry_timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        self._gate = ModelGate()
        # Decoded images held at once, from decode start to score: a batch being scored, the
        # next one filling, and one image per decode process. However many studies arrive
        # together, memory stays bounded; the rest wait as files in the spool.
        self.max_decoded = decoded_image_bound(config.model.batch.max_size, decoder.workers)
        self._decoded = FairSlots(self.max_decoded)

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

    def _finished(self, study_uid: str, task: asyncio.Task[None]) -> None:
        del self._running[study_uid]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not a study's own failure (those are stored as FAILED) but the store or a bug:
            # the study is still unfinished in the store, so it is tried again, later and
            # later, never dropped.
            crashes = self._crashes[study_uid] = self._crashes.get(study_uid, 0) + 1
            delay = min(300.0, 5.0 * 2 ** (crashes - 1))
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
        else:
            self._crashes.pop(study_uid, None)
        if study_uid in self._again:
            self._again.discard(study_uid)
            self.submit(study_uid)
        while (self._waiting and not self._closing
               and len(self._running) < self._config.jobs.max_studies_in_progress):
            self.submit(self._waiting.popleft())

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

    async def _in_executor(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _process(self, study_uid: str) -> None:
        if (error := self._give_up.get(study_uid)) is not None:
            await self._store_internal_failure(study_uid, error)
            return
        ready_at = now_iso()
        await self._store.mark_study(study_uid, "ready", ready_at, column="ready_at",
                                     only_from=UNFINISHED_STATES)
        row = await self._store.study(study_uid)
        if row is None or row.state != "ready":
            return  # finished already (a retry that came late): nothing to do
        instances = await self._store.instances_for_study(study_uid)
        headers = await self._in_executor(read_headers, instances)
        decision = rules.select(headers, self.selection)
        moved = await self._store.move_flags(study_uid)  # a PACS correction touched it
        if moved:
            decision = dataclasses.replace(
                decision, flags=tuple(sorted(set(decision.flags) | set(moved))))
        await self._store.record_decisions(study_uid, decision, now_iso())
        identity = identity_of(study_uid, headers)
        stages = {"received": row.received_at if row else None,
                  "released": row.released_at if row else None, "ready": ready_at}
        senders = row.senders if row else ()
        if not decision.candidate:
            await self._store_outcome("SKIPPED", identity, decision, stages, ready_at, senders,
                                      error=decision.reason)
            # The reason quotes tag values, which a site's rule may aim at PHI: logged only
            # with logging.include-phi; it is always in the stored result.
            detail = {"reason": decision.reason} if self._config.logging.include_phi else {}
            log.info("study.skipped", study=self._store.study_label(study_uid), rule=decision.rule,
                     flags=list(decision.flags), **detail)
            return
        await self._store.mark_study(study_uid, "selected", now_iso(), only_from=("ready",))
        created_at = now_iso()
        scores, attempts = await self._score_with_retries(study_uid, instances, decision,
                                                          row.attempts)
        if isinstance(scores, PxsgateError):
            code = EXIT_MODEL if isinstance(scores, ModelError) else EXIT_PREPROCESS
            await self._store_outcome("FAILED", identity, decision, stages, created_at, senders,
                                      error=str(scores), exit_code=code, attempts=attempts)
            log.error("study.failed", study=self._store.study_label(study_uid),
                      error=str(scores), exit_code=code, attempts=attempts)
            return
        stages["inferred"] = now_iso()
        images, decision = await self._without_unscorable(study_uid, scores, decision)
        flags = decision.flags
        if await self._store.scored_before(study_uid):
            flags = tuple(sorted((*flags, rules.FLAG_RESCORED)))
        await self._store_outcome("SUCCEEDED", identity, decision, stages, created_at, senders,
                                  scores=images, flags=flags, attempts=attempts)
        log.info("result.stored", study=self._store.study_label(study_uid), images=len(images),
                 flags=list(flags), attempts=attempts, **_stage_durations(stages))

    async def _without_unscorable(self, study_uid: str, scored: Scored,
                                  decision: StudyDecision
                                  ) -> tuple[list[ScoredImage], StudyDecision]:
        """The scores, and the decision with each image that could not be scored marked
        as not used with its reason (rule ``unscorable``) and the study flagged
        ``image-failed``; recorded in the store as the study's decisions."""
        if not scored.unscorable:
            return scored.images, decision
        reasons = {d.sop_instance_uid: reason for d, reason in scored.unscorable}
        images = tuple(
            dataclasses.replace(d, selected=False, rule="unscorable",
                                reason=f"could not be scored: {reasons[d.sop_instance_uid]}")
            if d.sop_instance_uid in reasons else d
            for d in decision.images)
        flags = tuple(sorted({*decision.flags, rules.FLAG_IMAGE_FAILED}))
        decision = dataclasses.replace(decision, images=images, flags=flags)
        await self._store.record_decisions(study_uid, decision, now_iso())
        log.warning("study.images_unscorable", study=self._store.study_label(study_uid),
                    images=len(reasons), scored=len(scored.images))
        return scored.images, decision

    async def _store_internal_failure(self, study_uid: str, error: str) -> None:
        """FAILED with exitCode 3, from what the store alone knows of the study."""
        await self._store.mark_study(study_uid, "ready", now_iso(), column="ready_at",
                                     only_from=UNFINISHED_STATES)
        row = await self._store.study(study_uid)
        if row is None or row.state != "ready":
            self._give_up.pop(study_uid, None)
            return
        decision = StudyDecision(False, "internal-error", error, ())
        stages = {"received": row.received_at if row else None,
                  "released": row.released_at if row else None, "ready": now_iso()}
        await self._store_outcome("FAILED", StudyIdentity(study_uid, "", ""), decision, stages,
                                  now_iso(), row.senders if row else (), error=error,
                                  exit_code=EXIT_INTERNAL)
        self._give_up.pop(study_uid, None)
        log.error("study.failed", study=self._store.study_label(study_uid), error=error,
                  exit_code=EXIT_INTERNAL)

    async def _score_with_retries(self, study_uid: str, instances: Sequence[StoredInstance],
                                  decision: StudyDecision, attempts: int
                                  ) -> tuple[Scored | PxsgateError, int]:
        """Score the study, trying again with backoff after a failure; after
        jobs.max-attempts tries (``attempts`` were made before, interrupted by a stop or a
        crash) the last error. Each try is counted in the store before it starts."""
        jobs = self._config.jobs
        error: PxsgateError | None = None
        # A study whose try was cut short by a crash may be the one that crashed the
        # service: its next try has the model to itself, so that if it crashes the service
        # again, the other studies' tries are not counted against them.
        suspect = attempts > 0
        tries = 0  # this run's (the store's count stays put while a late instance re-opens)
        while max(attempts, tries) < jobs.max_attempts:
            if error is not None:
                delay = jobs.retry_backoff_seconds * 2 ** (max(attempts, tries) - 1)
                log.warning("study.retry", study=self._store.study_label(study_uid),
                            attempt=max(attempts, tries),
                            error=str(error), retry_in_s=delay)
                await asyncio.sleep(delay)
                self._metrics.study_retries.inc()
            async with self._gate.exclusive() if suspect else self._gate.shared():
                attempts = await self._store.begin_attempt(study_uid, now_iso())
                tries += 1
                try:
                    return await self._score(study_uid, instances, decision), attempts
                except PxsgateError as exc:
                    error = exc
            if isinstance(error, PreprocessError) and not isinstance(error, DecodeFailed):
                return error, attempts  # the images' own bytes: another try reads the same
            suspect = False
        return error or ModelError(
            f"scoring was interrupted {attempts} times (the service stopped or crashed "
            f"while this study was on the model)"), attempts

    async def _score(self, study_uid: str, instances: Sequence[StoredInstance],
                     decision: StudyDecision) -> Scored:
        paths = {inst.sop_instance_uid: inst.path for inst in instances}
        chosen = decision.inputs
        tag = self._store.study_label(study_uid)

        async def one(sop_uid: str) -> ImageResult | PreprocessError:
            async with self._decoded.slot(study_uid):
                try:
                    image = await self._decoder.preprocess(paths[sop_uid])
                except PreprocessError as exc:
                    if isinstance(exc, DecodeFailed):
                        raise  # the decoder's failure, not the image's: the try again
                    return exc  # this image's own bytes: the others are still scored
                return await self._worker.score_image(image, tag)

        # A model failure fails the try: the siblings are cancelled, so they give back
        # their decoded-image slots instead of going through the model for nothing.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(d.sop_instance_uid)) for d in chosen]
        except* PxsgateError as failed:
            raise failed.exceptions[0] from None
        answers = [t.result() for t in tasks]
        unscorable = [(d, a) for d, a in zip(chosen, answers, strict=True)
                      if isinstance(a, PreprocessError)]
        if len(unscorable) == len(chosen):
            raise unscorable[0][1]  # nothing to score: the study fails (not retried)
        return Scored(
            [ScoredImage(d.sop_instance_uid, d.series_instance_uid, a.score, a.batch_size,
                         a.embedding)
             for d, a in zip(chosen, answers, strict=True) if not isinstance(a, PxsgateError)],
            [(d, str(error)) for d, error in unscorable])

    def _embeddings(self, identity: StudyIdentity, created_at: str,
                    scores: Sequence[ScoredImage]) -> StudyEmbeddings | None:
        """What the store keeps of a scored study's images for change over time; None when
        the model gave no embeddings."""
        if not scores or any(s.embedding is None for s in scores):
            return None
        study_time = change.study_time_key(identity.study_datetime, created_at)
        config = self._config.change
        return StudyEmbeddings(
            images=tuple(ImageEmbedding(s.sop_instance_uid, s.series_instance_uid, s.score,
                                        int(s.embedding.size), change.pack(s.embedding))
                         for s in scores if s.embedding is not None),
            study_time=study_time, weights_sha256=self._model.weights_sha256,
            anchors_sha256=self._model.anchors_sha256,
            prior_from=(change.look_back_start(study_time, config.look_back_days)
                        if config.enabled else None))

    async def _store_outcome(self, status: str, identity: StudyIdentity,
                             decision: StudyDecision, stages: dict[str, str | None],
                             created_at: str, senders: Sequence[str], *,
                             scores: Sequence[ScoredImage] = (),
                             error: str = "", exit_code: int = 0,
                             flags: Sequence[str] | None = None, attempts: int = 0) -> None:
        stored_at = stages["stored"] = now_iso()
        document = build_document(
            status=status, identity=identity, site_id=self._config.results.site_id,
            model=self._model, created_at=created_at, updated_at=stored_at,
            scores=scores, decision=decision, exit_code=exit_code, error_message=error,
            stages=stages, flags=decision.flags if flags is None else flags, senders=senders,
            attempts=attempts, batch_sizes=[s.batch_size for s in scores],
        )
        state = "failed" if status == "FAILED" else "stored"
        exporters = [e.name for e in self._config.exporters if status in e.wanted_statuses]
        embeddings = (self._embeddings(identity, created_at, scores)
                      if status == "SUCCEEDED" else None)
        changes: list[float] = []  # the interval, when a change to a prior was computed

        def with_prior(doc: dict[str, Any], prior: PriorImage) -> dict[str, Any]:
            assert embeddings is not None
            try:
                entry = change.change_entry(scores[0], embeddings.images[0].vector,
                                            embeddings.study_time, prior)
            except ValueError as exc:  # a stored vector of another size: no change entry
                log.warning("change.skipped", study=self._store.study_label(
                    identity.study_instance_uid), error=str(exc))
                return doc
            changes.append(entry["change"]["intervalDays"])
            return change.with_change(doc, entry)

        deliveries = await self._store.store_result(document, state, error, exporters,
                                                    embeddings=embeddings,
                                                    with_prior=with_prior)
        if changes:
            # No UIDs or dates: the study's log key and how far back its prior is.
            log.info("change.computed", study=self._store.study_label(
                identity.study_instance_uid), interval_days=changes[-1])
        self._metrics.studies.labels(outcome=status).inc()
        if status != "SKIPPED" and (received := stages.get("received")) is not None:
            # Skips take no inference: counting them would flatter the percentiles.
            self._metrics.latency.observe(_seconds_between(received, stored_at))
        if deliveries:
            self._on_deliveries()
