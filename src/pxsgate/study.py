"""One study, from ready to stored: select -> score -> document -> store.

:class:`StudyProcessor` does what processing one ready study takes, in data-flow order; the
pipeline (:mod:`pxsgate.pipeline`) decides when a study is processed. Header reads run on a
thread pool, pixel decoding and preprocessing in the :class:`~pxsgate.decode.DecodePool`
processes, inference on the worker thread; the loop only coordinates.

Every study that is processed ends with one stored result: SKIPPED (not a candidate),
FAILED (its images or the model failed, try after try) or SUCCEEDED (scored).

Pictures for the pages (:mod:`pxsgate.pictures`): each scored image's model input is saved
while the model scores it; once the result is stored, every instance's thumbnail is made in
the background (:class:`~pxsgate.pictures.Thumbnailer`), never delaying a result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

import structlog
from pydicom import dcmread

from pxsgate import change, rules
from pxsgate.config import Config, SelectionConfig
from pxsgate.decode import DecodePool
from pxsgate.document import PriorLookup
from pxsgate.early import Early, EarlyDecodes
from pxsgate.errors import DecodeFailed, ModelError, PreprocessError, PxsgateError
from pxsgate.infer import ImageResult, InferenceWorker, ModelGate
from pxsgate.pictures import PictureStore, Thumbnailer
from pxsgate.preprocess import U8Array
from pxsgate.priors.finder import LookupRequest
from pxsgate.records import (
    UNFINISHED_STATES,
    ImageDecision,
    PriorImage,
    ScoredImage,
    Status,
    StoredInstance,
    StudyDecision,
    StudyState,
    now_iso,
)
from pxsgate.results import (
    ModelInfo,
    ResultDocument,
    StudyIdentity,
    build_document,
    dicom_datetime,
    exporters_for,
)
from pxsgate.rules import Header
from pxsgate.service.metrics import Metrics
from pxsgate.store import ImageEmbedding, Store, StudyEmbeddings, StudyRow

# The logger these events always had (study.skipped, study.failed, result.stored, ...).
log = structlog.get_logger("pxsgate.pipeline")

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


class PriorLookups(Protocol):
    """Asks the PACS for a patient's prior (:class:`pxsgate.priors.finder.PriorFinder`)."""

    async def lookup(self, request: LookupRequest) -> PriorLookup: ...


def _seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


@dataclasses.dataclass(frozen=True)
class Stages:
    """When the study reached each stage (the result's ``pxsgate.stages``), filled in as it
    goes (``dataclasses.replace``): inferred once scored, stored once its result is."""

    received: str | None  # its last instance
    released: str | None
    ready: str
    inferred: str | None = None
    stored: str | None = None

    @classmethod
    def of(cls, row: StudyRow, ready: str) -> Stages:
        return cls(received=row.received_at, released=row.released_at, ready=ready)

    def as_dict(self) -> dict[str, str | None]:
        """As the result document has them: received, released and ready always (None
        when unknown), inferred and stored once reached."""
        stages: dict[str, str | None] = {
            "received": self.received, "released": self.released, "ready": self.ready}
        if self.inferred is not None:
            stages["inferred"] = self.inferred
        if self.stored is not None:
            stages["stored"] = self.stored
        return stages

    def durations(self) -> dict[str, float]:
        """Milliseconds between consecutive stages, for the result.stored log line."""
        reached = [(name, at) for name, at in self.as_dict().items() if at]
        return {f"{a}_to_{b}_ms": round(_seconds_between(a_at, b_at) * 1000, 1)
                for (a, a_at), (b, b_at) in itertools.pairwise(reached)}


@dataclasses.dataclass(frozen=True)
class Scored:
    """A study's try: the images scored, and those whose own pixel data could not be."""

    images: list[ScoredImage]
    unscorable: list[tuple[ImageDecision, str]]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a study's result says, before it is a document."""

    status: Status
    identity: StudyIdentity
    decision: StudyDecision
    stages: Stages
    created_at: str  # when inference started (a skip: when the study became ready)
    senders: Sequence[str]
    scores: Sequence[ScoredImage] = ()
    error: str = ""
    exit_code: int = 0
    flags: Sequence[str] | None = None  # None: the decision's
    attempts: int = 0

    @property
    def state(self) -> StudyState:
        """The study's state once the result is stored."""
        return StudyState.FAILED if self.status is Status.FAILED else StudyState.STORED


def with_change(document: ResultDocument, scores: Sequence[ScoredImage],
                embeddings: StudyEmbeddings, prior: PriorImage,
                study_label: str) -> tuple[ResultDocument, float | None]:
    """The document with the change from the patient's prior scored image to this study's
    headline image, and the interval in days; the document as it was (and None) when the
    prior's embedding cannot be compared."""
    try:
        entry = change.change_entry(scores[0], embeddings.images[0].vector,
                                    embeddings.study_time, prior)
    except ValueError as exc:  # a stored vector of another size: no change entry
        log.warning("change.skipped", study=study_label, error=str(exc))
        return document, None
    assert entry.change is not None
    return document.with_entry(entry), entry.change.interval_days


class StudyProcessor:
    """Processes one ready study at a time per call, each with one result stored.

    Shared between studies, and handed in by the pipeline: the model (``gate``: studies use
    it together, or a suspect study alone) and the decoded-image slots (``decoded_slot``,
    handed out fairly between studies)."""

    def __init__(self, config: Config, store: Store, worker: InferenceWorker,
                 model: ModelInfo, *, executor: concurrent.futures.Executor,
                 decoder: DecodePool, gate: ModelGate,
                 decoded_slot: Callable[[str], AbstractAsyncContextManager[None]],
                 on_deliveries: Callable[[], None], metrics: Metrics,
                 priors: PriorLookups | None = None, pictures: PictureStore | None = None,
                 thumbnails: Thumbnailer | None = None,
                 early: EarlyDecodes | None = None) -> None:
        self._config = config
        self._store = store
        self._worker = worker
        self._model = model
        self._executor = executor
        self._decoder = decoder
        self._gate = gate
        self._decoded_slot = decoded_slot
        self._on_deliveries = on_deliveries  # wakes the outbox
        self._metrics = metrics
        self._priors = priors  # None: priors from PACS are off
        self._pictures = pictures  # None: pictures.enabled is off
        self._thumbnails = thumbnails
        self._early = early  # None: preprocess.decode-on-arrival is off
        self._saving: set[asyncio.Future[object]] = set()  # model inputs being written
        self.selection: SelectionConfig = config.selection  # replaced on reload (SIGHUP)

    async def process(self, study_uid: str) -> None:
        """ready -> select -> score -> document -> store."""
        ready_at = now_iso()
        row = await self._ready(study_uid, ready_at)
        if row is None:
            return  # finished already (a retry that came late): nothing to do
        stages = Stages.of(row, ready_at)
        instances, headers, decision = await self._select(study_uid)
        # The selected images decoded on arrival, for this round's first try to use.
        early = ({} if self._early is None
                 else self._early.claim(study_uid, instances, decision))
        claimed = list(early.values())
        try:
            await self._decided(study_uid, row, stages, instances, headers, decision, early)
        finally:
            if self._early is not None:
                self._early.release(claimed)

    async def _decided(self, study_uid: str, row: StudyRow, stages: Stages,
                       instances: Sequence[StoredInstance], headers: Sequence[Header],
                       decision: StudyDecision, early: dict[str, Early]) -> None:
        """select -> score -> document -> store, once the study is decided."""
        ready_at = stages.ready
        identity = identity_of(study_uid, headers)
        if not decision.candidate:
            await self._skip(Outcome(Status.SKIPPED, identity, decision, stages, ready_at,
                                     row.senders, error=decision.reason))
            self._make_thumbnails(study_uid, instances)
            return
        await self._store.mark_study(study_uid, StudyState.SELECTED, now_iso(),
                                     only_from=(StudyState.READY,))
        created_at = now_iso()
        scored, attempts = await self._score_with_retries(study_uid, instances, decision,
                                                          row.attempts, early)
        if isinstance(scored, PxsgateError):
            code = EXIT_MODEL if isinstance(scored, ModelError) else EXIT_PREPROCESS
            await self._fail(Outcome(Status.FAILED, identity, decision, stages, created_at,
                                     row.senders, error=str(scored), exit_code=code,
                                     attempts=attempts))
            self._make_thumbnails(study_uid, instances)
            return
        stages = dataclasses.replace(stages, inferred=now_iso())
        images, decision = await self._without_unscorable(study_uid, scored, decision)
        flags = decision.flags
        if await self._store.scored_before(study_uid):
            flags = tuple(sorted((*flags, rules.FLAG_RESCORED)))
        stages = await self._store_outcome(Outcome(
            Status.SUCCEEDED, identity, decision, stages, created_at, row.senders,
            scores=images, flags=flags, attempts=attempts))
        log.info("result.stored", study=self._store.study_label(study_uid), images=len(images),
                 flags=list(flags), attempts=attempts, **stages.durations())
        self._make_thumbnails(study_uid, instances)

    def _make_thumbnails(self, study_uid: str, instances: Sequence[StoredInstance]) -> None:
        """Every instance's thumbnail, used or not, in the background: the result is
        stored already."""
        if self._thumbnails is not None:
            self._thumbnails.submit(study_uid, instances)

    async def fail_internally(self, study_uid: str, error: str) -> None:
        """FAILED with exitCode 3, from what the store alone knows of the study (pxsgate's
        own code failed on it, again and again)."""
        row = await self._ready(study_uid, now_iso())
        if row is None:
            return
        decision = StudyDecision(False, "internal-error", error, ())
        stages = Stages.of(row, now_iso())
        await self._store_outcome(Outcome(
            Status.FAILED, StudyIdentity(study_uid, "", ""), decision, stages, now_iso(),
            row.senders, error=error, exit_code=EXIT_INTERNAL))
        log.error("study.failed", study=self._store.study_label(study_uid), error=error,
                  exit_code=EXIT_INTERNAL)

    # --- ready, select --------------------------------------------------------------------

    async def _ready(self, study_uid: str, ready_at: str) -> StudyRow | None:
        """Move the study to ``ready`` (unless it finished meanwhile) and read its row back;
        None when it is not ready (finished already)."""
        await self._store.mark_study(study_uid, StudyState.READY, ready_at, column="ready_at",
                                     only_from=UNFINISHED_STATES)
        row = await self._store.study(study_uid)
        if row is None or row.state != StudyState.READY:
            return None
        return row

    async def _in_executor(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _select(self, study_uid: str
                      ) -> tuple[list[StoredInstance], list[Header], StudyDecision]:
        """The study's instances, their headers, and the decision on what is model input
        (the selection rules, with the flags of a PACS correction that moved instances
        into or out of it); the decisions are recorded in the store."""
        instances = await self._store.instances_for_study(study_uid)
        headers = await self._in_executor(read_headers, instances)
        decision = rules.select(headers, self.selection)
        moved = await self._store.move_flags(study_uid)  # a PACS correction touched it
        if moved:
            decision = dataclasses.replace(
                decision, flags=tuple(sorted(set(decision.flags) | set(moved))))
        await self._store.record_decisions(study_uid, decision, now_iso())
        return instances, headers, decision

    async def _skip(self, outcome: Outcome) -> None:
        await self._store_outcome(outcome)
        # The reason quotes tag values, which a site's rule may aim at PHI: logged only
        # with logging.include-phi; it is always in the stored result.
        decision = outcome.decision
        detail = {"reason": decision.reason} if self._config.logging.include_phi else {}
        log.info("study.skipped", study=self._store.study_label(
            outcome.identity.study_instance_uid), rule=decision.rule,
            flags=list(decision.flags), **detail)

    async def _fail(self, outcome: Outcome) -> None:
        await self._store_outcome(outcome)
        log.error("study.failed", study=self._store.study_label(
            outcome.identity.study_instance_uid), error=outcome.error,
            exit_code=outcome.exit_code, attempts=outcome.attempts)

    # --- score ----------------------------------------------------------------------------

    async def _score_with_retries(self, study_uid: str, instances: Sequence[StoredInstance],
                                  decision: StudyDecision, attempts: int,
                                  early: dict[str, Early]
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
                    return await self._score(study_uid, instances, decision,
                                             early), attempts
                except PxsgateError as exc:
                    error = exc
            if isinstance(error, PreprocessError) and not isinstance(error, DecodeFailed):
                return error, attempts  # the images' own bytes: another try reads the same
            suspect = False
        return error or ModelError(
            f"scoring was interrupted {attempts} times (the service stopped or crashed "
            f"while this study was on the model)"), attempts

    async def _score(self, study_uid: str, instances: Sequence[StoredInstance],
                     decision: StudyDecision, early: dict[str, Early]) -> Scored:
        """One try: every model-input image decoded and scored (those decoded on arrival
        taken from ``early``: used by one try only)."""
        paths = {inst.sop_instance_uid: inst.path for inst in instances}
        chosen = decision.inputs
        tag = self._store.study_label(study_uid)
        # A model failure fails the try: the siblings are cancelled, so they give back
        # their decoded-image slots instead of going through the model for nothing.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._score_image(study_uid, tag,
                                                             d.sop_instance_uid,
                                                             paths[d.sop_instance_uid],
                                                             early.pop(d.sop_instance_uid,
                                                                       None)))
                         for d in chosen]
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

    async def _score_image(self, study_uid: str, tag: str, sop_uid: str, path: Path,
                           early: Early | None = None) -> ImageResult | PreprocessError:
        """One image decoded (holding one of the decoded-image slots) and scored; the
        image's own failure is returned, for the others to be scored still. Its model
        input is saved as a picture while the model scores it. ``early``: its decode on
        arrival, used when it gave an image; else the file is decoded now."""
        async with self._decoded_slot(study_uid):
            image = None
            if early is not None and self._early is not None:
                image = await self._early.use(early)
            if image is None:
                self._metrics.model_input_decodes.labels(stage="ready").inc()
                try:
                    image = await self._decoder.preprocess(path)
                except PreprocessError as exc:
                    if isinstance(exc, DecodeFailed):
                        raise  # the decoder's failure, not the image's: the try again
                    return exc  # this image's own bytes: the others are still scored
            saving = self._save_model_input(sop_uid, image)
            try:
                result = await self._worker.score_image(image, tag)
            except BaseException:
                if saving is not None:  # written all the same, awaited by no one
                    self._saving.add(saving)
                    saving.add_done_callback(self._saving.discard)
                raise
            if saving is not None:
                await saving  # mostly done: it was written while the model scored
            return result

    def _save_model_input(self, sop_uid: str, image: U8Array) -> asyncio.Future[object] | None:
        """The exact model input written as a picture, on a thread (it never raises)."""
        if self._pictures is None:
            return None
        return asyncio.ensure_future(
            asyncio.to_thread(self._pictures.save_model_input, sop_uid, image))

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

    # --- document, store ------------------------------------------------------------------

    def _document(self, outcome: Outcome, stages: Stages, stored_at: str) -> ResultDocument:
        return build_document(
            status=outcome.status, identity=outcome.identity,
            site_id=self._config.results.site_id, model=self._model,
            created_at=outcome.created_at, updated_at=stored_at, scores=outcome.scores,
            decision=outcome.decision, exit_code=outcome.exit_code,
            error_message=outcome.error, stages=stages.as_dict(),
            flags=outcome.decision.flags if outcome.flags is None else outcome.flags,
            senders=outcome.senders, attempts=outcome.attempts,
            batch_sizes=[s.batch_size for s in outcome.scores],
        )

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

    async def _ask_pacs(self, identity: StudyIdentity,
                        embeddings: StudyEmbeddings | None) -> PriorLookup | None:
        """With priors from PACS on, a scored study whose patient has no usable prior in
        the store waits (at most priors.wait-seconds) for the PACS to be asked; what came
        of it, or None when it was not asked."""
        if self._priors is None or embeddings is None or embeddings.prior_from is None:
            return None
        uid = identity.study_instance_uid
        if not identity.patient_id or await self._store.prior_for(identity.patient_id, uid,
                                                                  embeddings) is not None:
            return None
        lookup = await self._priors.lookup(LookupRequest(
            identity.patient_id, uid, embeddings.study_time, embeddings.prior_from))
        log.info("prior.lookup", study=self._store.study_label(uid), outcome=lookup.outcome,
                 seconds=lookup.seconds)
        return lookup

    async def _store_outcome(self, outcome: Outcome) -> Stages:
        """document -> store: the result stored as the study's current one, with its
        deliveries (and, scored, its embeddings and the change from the patient's prior),
        and counted. Returns the stages, stored included."""
        status = outcome.status
        embeddings = (self._embeddings(outcome.identity, outcome.created_at, outcome.scores)
                      if status is Status.SUCCEEDED else None)
        lookup = await self._ask_pacs(outcome.identity, embeddings)
        stored_at = now_iso()
        stages = dataclasses.replace(outcome.stages, stored=stored_at)
        document = self._document(outcome, stages, stored_at)
        if lookup is not None:
            document = document.with_prior_lookup(lookup)
        label = self._store.study_label(outcome.identity.study_instance_uid)
        interval: float | None = None
        async with self._store.transaction() as tx:
            # The prior is read in the transaction that stores the result: a result of the
            # same patient stored just before is seen.
            prior = await tx.prior_image(document, embeddings)
            if prior is not None and embeddings is not None:
                document, interval = with_change(document, outcome.scores, embeddings, prior,
                                                 label)
            # Chosen once the change is known: an exporter's when: may ask for one.
            exporters = exporters_for(self._config.exporters, document)
            deliveries = await tx.add_result(document, outcome.state, outcome.error,
                                             exporters, embeddings=embeddings)
        if interval is not None:
            # No UIDs or dates: the study's log key and how far back its prior is.
            log.info("change.computed", study=label, interval_days=interval)
        self._metrics.studies.labels(outcome=status.value).inc()
        if status is not Status.SKIPPED and stages.received is not None:
            # Skips take no inference: counting them would flatter the percentiles.
            self._metrics.latency.observe(_seconds_between(stages.received, stored_at))
        if deliveries:
            self._on_deliveries()
        return stages
