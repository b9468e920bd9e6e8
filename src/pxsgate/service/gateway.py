"""The Gateway: one object that owns every stage and their lifecycle.

Start-up order: store -> spool (files a crash left unindexed are indexed) -> outbox ->
model (worker thread, anchors embedded) -> pipeline -> assembler -> resume every unfinished
job (service.recovery) -> HTTP -> receiver (the port opens last, once everything behind it
can take work, with backpressure from service.admission) -> READY=1 to systemd. The
supervisor (service.supervisor) then feeds systemd's watchdog while the model worker is
healthy, updates STATUS=, enforces the batch time limit and runs retention. Signals, the
notifier and the wait for a stop are service.serve's.

Shutdown (SIGTERM) runs in reverse: STOPPING=1; the port closes and associations in
progress get ``jobs.shutdown-grace-seconds`` to finish; studies in progress get as long
again to finish, and what is left (studies waiting, or cut short) stays unfinished in the
store, where the next start resumes it; the worker stops, the store closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from pxsgate.assemble import Assembler
from pxsgate.config import Config
from pxsgate.decode import DecodePool
from pxsgate.delivery import build_exporters
from pxsgate.delivery.http import read_secret
from pxsgate.delivery.outbox import Outbox
from pxsgate.early import EarlyDecodes
from pxsgate.errors import ConfigError, StoreError
from pxsgate.infer import InferenceWorker, Scorer, load_scorer, runs_on_cpu
from pxsgate.intake import Intake
from pxsgate.pictures import FilePictures, Thumbnailer
from pxsgate.pipeline import Pipeline
from pxsgate.preprocess import U8Array
from pxsgate.priors.inbox import MoveInbox
from pxsgate.priors.source import PriorSource, make_source
from pxsgate.receive import Receiver
from pxsgate.records import DeliveryState, Indexed, ReceivedInstance, now_iso
from pxsgate.results import ModelInfo
from pxsgate.retention import Retention
from pxsgate.service.admission import AdmissionControl
from pxsgate.service.api import MIN_TOKEN_LENGTH, Api
from pxsgate.service.failpoints import Failpoints
from pxsgate.service.metrics import Metrics
from pxsgate.service.recovery import file_patient_id, recover_spool, resume
from pxsgate.service.sdnotify import Notifier
from pxsgate.service.supervisor import Supervisor
from pxsgate.spool import Spool
from pxsgate.store import store_for
from pxsgate.stow import Stow, is_loopback
from pxsgate.trends import DriftMonitor
from pxsgate.ui.app import build_app
from pxsgate.ui.services import UiServices

log = structlog.get_logger("pxsgate.server")

MODEL_LOAD_TIMEOUT_S = 1800.0  # EXTEND_TIMEOUT_USEC while the model loads and warms up
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cuda_memory(device: str) -> float:
    """Bytes of GPU memory held by tensors on the model's device (NaN if it cannot be read:
    a scrape must not fail over one gauge)."""
    try:
        import torch

        return float(torch.cuda.memory_allocated(torch.device(device)))
    except Exception:
        return float("nan")


def check_writable(data_dir: Path) -> None:
    """Fail the start with a clear message when the data directory cannot be written (a
    read-only mount, wrong owner): better than accepting associations and answering every
    C-STORE with an error."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise StoreError(f"storage.data-dir {data_dir} is not writable: "
                         f"{exc.strerror or exc}") from exc


def _store_problem(exc: BaseException) -> str:
    """Why the store failed, in words an operator can act on (no paths, no data)."""
    cause: BaseException = exc
    while cause.__cause__ is not None and not isinstance(cause, sqlite3.Error):
        cause = cause.__cause__
    text = str(cause).split("\n", 1)[0][:200]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class Gateway:
    def __init__(self, config: Config,
                 scorer_factory: Callable[[], Scorer] | None = None,
                 notifier: Notifier | None = None,
                 failpoints: Failpoints | None = None) -> None:
        self.config = config
        self.failpoints = failpoints or Failpoints()
        self.notifier = notifier or Notifier({})  # systemd: serve() passes the real one
        self.metrics = Metrics()
        self.store = store_for(config, self.failpoints)
        self.store.reveal_uids = config.logging.include_phi
        self.spool = Spool(config.spool_dir, int(config.storage.min_free_mb * 2**20))
        # Thumbnails and model inputs for the pages (None: pictures.enabled is off).
        self.pictures = FilePictures(config.pictures_dir) if config.pictures.enabled else None
        self.thumbnails = None if self.pictures is None else Thumbnailer(
            self.pictures, self._thumbnail, label=self.store.study_label)
        self.retention = Retention(
            config.storage, self.store, self.spool, pictures=self.pictures,
            pictures_config=config.pictures,
            busy=self.thumbnails.pending if self.thumbnails else lambda uid: False)
        self._scorer_factory = scorer_factory or (lambda: load_scorer(
            config.model, jpeg_roundtrip=config.preprocess.jpeg_roundtrip))
        local = config.model.backend == "local"
        # With Triton, its dynamic batcher gathers the images: each goes as soon as it is
        # here, without the local micro-batcher's wait for company.
        batch = config.model.batch if local else replace(config.model.batch, max_delay_ms=0.0)
        self.worker = InferenceWorker(self._scorer_factory, batch,
                                      nice=local and runs_on_cpu(config.model.device),
                                      time_limit=config.jobs.batch_time_limit_seconds,
                                      failpoints=self.failpoints, metrics=self.metrics)
        # Set when the service cannot go on (the model worker is stuck): serve() stops it
        # and the CLI exits non-zero, so that systemd restarts it and the jobs resume.
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        # Header reads (small, I/O-bound); pixel work goes to the decode processes.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="pxsgate-io")
        self._decoder: DecodePool | None = None
        self._early: EarlyDecodes | None = None  # decode on arrival (preprocess section)
        self.model: ModelInfo | None = None
        self._pipeline: Pipeline | None = None
        self._assembler: Assembler | None = None
        self._receiver: Receiver | None = None
        self._move_inbox: MoveInbox | None = None  # priors retrieved by C-MOVE
        self.outbox = Outbox(self.store, build_exporters(
            config.exporters, self.store, jpeg_roundtrip=config.preprocess.jpeg_roundtrip,
            pictures=self.pictures),
                             {e.name: e for e in config.exporters}, metrics=self.metrics)
        self._outbox_started = False
        self._api: Api | None = None
        self._shared_intake: Intake | None = None
        # The drift alarm's gauges (pxsgate.trends), refreshed by the supervisor.
        self.drift = DriftMonitor(self.store, config.ui, self.metrics.set_drift)
        self._supervisor = Supervisor(self.notifier, self.worker, self.store, self.retention,
                                      self.metrics, self.status_line, self._unhealthy,
                                      drift=self.drift)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self.port = 0
        self.http_port = 0

    # --- start-up, in order ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load the model, resume, then listen. If any step fails, what was
        started is stopped again (threads, processes, the database) before the error goes
        up, so a service that cannot start exits instead of hanging."""
        try:
            await self._start()
        except BaseException:
            try:
                await self.stop()
            except Exception as exc:  # keep the start-up error; log the clean-up's
                log.error("gateway.stop_failed", error=repr(exc))
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if self.failpoints.armed:
            log.warning("failpoints.armed", points=self.failpoints.armed,
                        note="this process will kill itself: crash tests only")
        await self._open_storage()
        # Before the model: a missing token file fails the start in seconds, not minutes.
        await self.outbox.start()
        self._outbox_started = True
        token = self._api_token()
        model = self.model = await self._load_model()
        pipeline, assembler = self._build_stages(loop, model)
        await recover_spool(self.spool, self.store, self.retention, self._executor,
                            self.config.timings)
        await resume(self.store, pipeline, assembler, self.config.timings)
        await self._open_api(token)
        await self._open_port(loop)
        self._supervisor.start()
        log.info("gateway.started", port=self.port, http_port=self.http_port,
                 ae_titles=[t.ae_title for t in self.config.dicom.scp.ae_titles],
                 model=model.id, weights_sha256=model.weights_sha256[:16],
                 startup_s=round(time.perf_counter() - started, 2))
        # Here, before the supervisor's first WATCHDOG=1 and STATUS= (its task runs at the
        # next await): READY=1 is the first thing systemd hears of the started service.
        self.notifier.ready(self.status_line())

    async def _open_storage(self) -> None:
        self.notifier.status("opening the store")
        check_writable(self.config.storage.data_dir)
        await self.store.open()
        self.spool.open()
        self.spool.remove_leftovers()
        await self.retention.start()

    def _api_token(self) -> str | None:
        """The HTTP API's bearer token (None: no token file configured)."""
        http = self.config.http
        token = (read_secret(http.bearer_token_file, "http.bearer-token-file")
                 if http.bearer_token_file else None)
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError("http.bearer-token-file",
                              f"the token has {len(token)} characters, fewer than "
                              f"{MIN_TOKEN_LENGTH}: make one with `openssl rand -hex 32`")
        return token

    async def _load_model(self) -> ModelInfo:
        """The decode processes and the model worker, started side by side."""
        config = self.config
        self._decoder = DecodePool(config.preprocess, config.jobs.decode_time_limit_seconds,
                                   config.logging.format, config.logging.include_phi)
        self.notifier.status("loading the model")
        self.notifier.extend_timeout(MODEL_LOAD_TIMEOUT_S)  # torch.compile can take minutes
        model_loading = asyncio.to_thread(self.worker.start)
        _, model = await asyncio.gather(self._decoder.start(), model_loading)
        return model

    def _build_stages(self, loop: asyncio.AbstractEventLoop,
                      model: ModelInfo) -> tuple[Pipeline, Assembler]:
        assert self._decoder is not None
        preprocess = self.config.preprocess
        # Decode on arrival (issue 24); None: every image is decoded once its study is ready.
        self._early = None if not preprocess.decode_on_arrival else EarlyDecodes(
            self._decoder, lambda: self._pipeline.selection if self._pipeline
            else self.config.selection, self.metrics,
            max_bytes=int(preprocess.on_arrival_cache_mb * 2**20))
        pipeline = self._pipeline = Pipeline(
            self.config, self.store, self.worker, model, self._executor, self._decoder,
            self.outbox.wake, metrics=self.metrics, prior_source=self._prior_source(),
            pictures=self.pictures, thumbnails=self.thumbnails, early=self._early)
        self._watch_metrics(model)
        assembler = self._assembler = Assembler(loop, self._study_ready)
        return pipeline, assembler

    def _prior_source(self) -> PriorSource | None:
        """The PACS that priors are fetched from (None: priors from PACS are off); a
        C-MOVE's instances arrive on the DICOM port, taken by the move inbox."""
        priors = self.config.priors
        if not priors.enabled or priors.source is None:
            return None
        source = priors.source
        destination = (source.move_destination
                       or self.config.dicom.scp.ae_titles[0].ae_title)
        if source.type == "dimse" and source.retrieve == "c-move":
            self._move_inbox = MoveInbox(source.calling_ae_title)
        return make_source(source, self._move_inbox, destination)

    def _watch_metrics(self, model: ModelInfo) -> None:
        self.metrics.watch(
            associations=lambda: self._receiver.active if self._receiver else 0,
            in_progress=lambda: self._pipeline.busy if self._pipeline else 0,
            waiting=lambda: self.backlog, inference_queue=lambda: self.worker.queued,
            spool_bytes=lambda: self.retention.spool_bytes,
            data_dir=self.config.storage.data_dir, healthy=lambda: self.worker.alive,
            gpu_memory=(functools.partial(cuda_memory, model.device)
                        if model.device.startswith("cuda") else None))

    async def _open_api(self, token: str | None) -> None:
        http = self.config.http
        if not http.port:
            return
        if token is None and http.host not in LOOPBACK:
            log.warning("http.unprotected", host=http.host,
                        note="results carry PHI: set http.bearer-token-file")
        self._api = Api(http, self.store, self.health, token, self.metrics,
                        stow=self._stow(token), ui=self._ui())
        self.http_port = await self._api.start()

    def _ui(self) -> web.Application | None:
        """The web UI under /ui/ (ui.enabled; by default on with the HTTP port)."""
        if not self.config.ui_enabled:
            return None
        services = UiServices(
            pictures=self.pictures, force_study=self.force_study, wake_outbox=self.outbox.wake,
            health=self.health, model=lambda: self.model.to_json() if self.model else None,
            data_dir=self.config.storage.data_dir)
        return build_app(self.config.ui, self.store,
                         secure_cookies=self.config.http.tls.enabled, services=services)

    def _intake(self) -> Intake:
        """The one Intake of every way in (C-STORE, STOW-RS): same checks, same admission
        (backpressure, the spool ceiling)."""
        if self._shared_intake is None:
            loop = asyncio.get_running_loop()
            admission = AdmissionControl(self.config.backpressure, self.retention,
                                         lambda: self.backlog, loop)
            self._shared_intake = Intake(
                self.spool, loop, self._instance_received,
                max_dataset_mb=self.config.dicom.scp.max_dataset_mb, admit=admission.admit,
                failpoints=self.failpoints)
        return self._shared_intake

    def _stow(self, token: str | None) -> Stow:
        """STOW-RS on the HTTP port: each request an association of its own, released
        (study completion) when it ends."""
        http, scp = self.config.http, self.config.dicom.scp
        return Stow(self._intake(), self._association_closed,
                    called_ae=scp.ae_titles[0].ae_title,
                    transfer_syntaxes=scp.transfer_syntaxes,
                    max_dataset_mb=scp.max_dataset_mb,
                    max_request_mb=http.stow_max_request_mb,
                    refuse_anonymous=token is None and not is_loopback(http.host),
                    metrics=self.metrics, label=self.store.study_label)

    async def _open_port(self, loop: asyncio.AbstractEventLoop) -> None:
        """The DICOM port, last: everything behind it can take work now."""
        self._receiver = Receiver(self.config.dicom, self.spool, loop,
                                  self._instance_received, self._association_closed,
                                  failpoints=self.failpoints,
                                  metrics=self.metrics, label=self.store.study_label,
                                  include_phi=self.config.logging.include_phi,
                                  intake=self._intake(),
                                  move_inbox=self._move_inbox)
        self.port = await asyncio.to_thread(self._receiver.start)

    # --- shutdown, in reverse -------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully (see the module docstring); ``grace`` defaults to
        jobs.shutdown-grace-seconds, for the associations and again for the studies."""
        grace = self.config.jobs.shutdown_grace_seconds if grace is None else grace
        self.notifier.stopping("stopping: finishing the associations and studies in progress")
        await self._supervisor.stop()
        await self._close_port(grace)
        if self._api is not None:
            await self._api.stop()
            self._api = None
        await self._drain(grace)
        if self._outbox_started:
            await self.outbox.stop()
            self._outbox_started = False
        try:
            await self._stop_workers()
        finally:
            # Whatever failed above, the store is closed: its committed state is all a
            # restart needs.
            await self.store.close()
        log.info("gateway.stopped")

    async def _close_port(self, grace: float) -> None:
        if self._receiver is None:
            return
        receiver, self._receiver = self._receiver, None
        aborted = await asyncio.to_thread(receiver.stop, grace)
        if aborted:
            log.warning("gateway.associations_aborted", associations=aborted, grace_s=grace)

    async def _drain(self, grace: float) -> None:
        """Studies in progress get ``grace`` to finish; the rest is resumed at the next
        start."""
        if self._assembler is not None:
            self._assembler.close()
        if self._pipeline is not None:
            self._pipeline.close()
            try:
                await asyncio.wait_for(self._pipeline.drain(), grace)
            except TimeoutError:
                log.warning("gateway.drain_timeout", studies=self._pipeline.busy,
                            note="resumed at the next start")
                await self._pipeline.cancel()
            if self._pipeline.priors is not None:
                await self._pipeline.priors.close()
        if self._early is not None:
            await self._early.close()  # before the decode processes stop
        if self.thumbnails is not None:
            await self.thumbnails.close()  # what is waiting is not made
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop_workers(self) -> None:
        await asyncio.to_thread(self.worker.stop)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.shutdown)

    async def _thumbnail(self, path: Path) -> U8Array:
        """A thumbnail made in the decode pool's idle process."""
        assert self._decoder is not None
        return await self._decoder.thumbnail(path)

    # --- while running --------------------------------------------------------------------

    def reload(self, new: Config) -> None:
        """Apply a re-read config (SIGHUP) without dropping associations: the selection
        rules and the study completion timings change at once; everything else needs a
        restart and is logged as such."""
        old = self.config
        same_titles = ([t.ae_title for t in old.dicom.scp.ae_titles]
                       == [t.ae_title for t in new.dicom.scp.ae_titles])
        dicom = (replace(old.dicom, scp=replace(old.dicom.scp,
                                                ae_titles=new.dicom.scp.ae_titles))
                 if same_titles else old.dicom)
        applied = replace(old, selection=new.selection, assembly=new.assembly, dicom=dicom)
        restart = [f.name for f in fields(Config) if getattr(applied, f.name)
                   != getattr(new, f.name)]
        self.config = applied
        if self._pipeline is not None:
            self._pipeline.selection = applied.selection
        log.info("config.reloaded", study_rules=len(applied.selection.study_rules),
                 image_rules=len(applied.selection.image_rules),
                 changed_rules=old.selection != applied.selection,
                 restart_needed=restart)

    async def health(self) -> dict[str, Any]:
        """/healthz: the store answers and can write, the model worker runs, and the
        outbox's backlog. A store that reads but cannot write (a full disk) is unhealthy,
        with the reason."""
        store_error = ""
        deliveries: dict[str, int] = {}
        try:
            deliveries = await self.store.delivery_counts()
            await self.store.probe_write(now_iso())
        except Exception as exc:
            store_error = _store_problem(exc)
            log.error("health.store_failed", error=store_error)
        store_ok = not store_error
        worker_ok = self.worker.alive
        # A remote model (model.backend triton) can be down while this process is fine:
        # studies then retry, and monitors are told here.
        backend_error = await asyncio.to_thread(self.worker.backend_problem)
        model_ok = worker_ok and backend_error is None
        return {
            "ok": store_ok and model_ok,
            "store": store_ok,
            **({"storeError": store_error} if store_error else {}),
            "model": {"ok": model_ok, "id": self.model.id if self.model else None,
                      "backend": self.config.model.backend,
                      **({"error": backend_error} if backend_error else {})},
            "dicomPort": self.port,
            "uptimeSeconds": round(time.time() - self._started_at, 1),
            "studiesInProgress": self._pipeline.busy if self._pipeline else 0,
            "studiesWaiting": self.backlog,
            "associations": self._receiver.active if self._receiver else 0,
            "inferenceQueue": self.worker.queued,
            "spoolBytes": self.retention.spool_bytes,
            "deliveries": {"pending": deliveries.get(DeliveryState.PENDING, 0),
                           "dead": deliveries.get(DeliveryState.DEAD, 0),
                           "inFlight": self.outbox.in_flight},
        }

    def idle(self) -> bool:
        """Nothing being received, assembled or processed."""
        return (
            (self._assembler is None or self._assembler.pending == 0)
            and (self._pipeline is None or self._pipeline.busy == 0)
            and not self._tasks
        )

    async def wait_idle(self, limit_s: float = 60.0, poll: float = 0.05) -> None:
        deadline = time.monotonic() + limit_s
        while not self.idle():
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not become idle in time")
            await asyncio.sleep(poll)

    @property
    def backlog(self) -> int:
        """Studies whose images are all here and that wait for, or are in, processing."""
        return self._pipeline.backlog if self._pipeline else 0

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS= (``systemctl status``)."""
        return (f"port {self.port}; {self.backlog} studies in progress or waiting; "
                f"{self.worker.queued} images queued for the model; spool "
                f"{self.retention.spool_bytes / 2**30:.2f} GiB")

    def _unhealthy(self, reason: str) -> None:
        """The supervisor found that the service cannot go on: said once (log, STATUS=),
        then ``fatal`` is set for serve() to stop it."""
        if self.fatal.is_set():
            return
        self.fatal_reason = reason
        log.error("gateway.unhealthy", reason=reason)
        self.notifier.status(f"unhealthy: {reason}")
        self.fatal.set()

    # --- stage glue (on the loop) ---------------------------------------------------------

    async def _instance_received(self, instance: ReceivedInstance) -> Indexed:
        settle, quiet = self.config.timings(instance.called_ae)
        # While its association is open, the study is ready after the quiet timeout.
        indexed = await self.store.record_instance(instance, time.time() + quiet, settle)
        if indexed.outcome in ("duplicate", "revived"):
            # Stored once; the same bytes again do not re-open the study (a file retention
            # had deleted is kept again, for retention to delete later).
            if indexed.outcome == "revived":
                self.retention.added(instance.size)
            return indexed
        self.retention.added(instance.size)
        if indexed.moved_from is not None:
            await self._instance_moved(instance, indexed)
        if indexed.replaced is not None:
            # The instance moved to another study: its old file is no longer its own.
            await asyncio.to_thread(indexed.replaced.unlink, True)
        if indexed.outcome == "attached":
            return indexed  # a non-image object or pxsgate's own: the study stays as it is
        assert self._pipeline is not None
        self._pipeline.reopened(instance.study_instance_uid)
        assert self._assembler is not None
        self._assembler.instance_arrived(instance.study_instance_uid, instance.association_id,
                                         settle, quiet)
        if self._early is not None:
            try:
                self._early.arrived(instance)  # starts a task: the answer does not wait
            except Exception as exc:  # indexed and durable: this must not refuse it
                log.error("decode.on_arrival_error", error=type(exc).__name__)
        return indexed

    async def _instance_moved(self, instance: ReceivedInstance, indexed: Indexed) -> None:
        """An instance sent again under another study: a PACS correction (an image moved
        to the right study, or the right patient), never silent. The store recorded the
        move with the instance (both studies' next results are flagged instance-moved,
        and wrong-patient when its PatientID changed, found here from the two files); it is
        logged and counted, and the study it left, re-opened by the store, is scored again
        so that its current result no longer claims the image; history is kept."""
        old_study = indexed.moved_from
        assert old_study is not None
        changed = False
        try:
            loop = asyncio.get_running_loop()
            before, after = await asyncio.gather(
                loop.run_in_executor(self._executor, file_patient_id, indexed.replaced),
                loop.run_in_executor(self._executor, file_patient_id, instance.path))
            changed = before is not None and after is not None and before != after
            if changed:
                await self.store.set_move_patient_changed(instance.sop_instance_uid,
                                                          instance.study_instance_uid)
        except Exception as exc:  # the instance is indexed: this must not refuse it
            log.error("instance.move_check_failed", error=type(exc).__name__)
        finally:
            self.metrics.instances_moved.inc()
            log.warning("instance.moved", association_id=instance.association_id,
                        from_study=self.store.study_label(old_study),
                        to_study=self.store.study_label(instance.study_instance_uid),
                        patient_changed=changed, rescored=indexed.rescore_old)
            if indexed.rescore_old:
                assert self._pipeline is not None
                assert self._assembler is not None
                self._pipeline.reopened(old_study)
                settle, quiet = self.config.timings(instance.called_ae)
                self._assembler.resume(old_study, settle, settle, quiet)

    def _association_closed(self, association_id: str) -> None:
        assert self._assembler is not None
        delays = self._assembler.association_closed(association_id)
        if delays:
            now = time.time()
            deadlines = [(uid, now + delay) for uid, delay in delays.items()]
            self._spawn(self.store.set_released(deadlines, now_iso()))

    async def force_study(self, study_uid: str) -> bool:
        """Make a study still being received ready now (the web UI's force completion):
        False when it is not being received."""
        if self._assembler is None or not self._assembler.receiving(study_uid):
            return False
        await self.store.set_released([(study_uid, time.time())], now_iso())
        return self._assembler.force(study_uid)

    def _study_ready(self, study_uid: str, why: str) -> None:
        log.info("study.ready", study=self.store.study_label(study_uid), why=why)
        assert self._pipeline is not None
        self._pipeline.submit(study_uid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
