"""The Gateway: one object that owns every stage and their lifecycle.

Start-up order: store -> spool -> model (worker thread, anchors embedded) -> pipeline ->
assembler -> receiver (the port opens last, once everything behind it can take work).
Shutdown runs in reverse: the port closes first, in-flight studies drain (bounded), the
worker stops, the store closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine
from dataclasses import fields, replace
from typing import Any

import structlog

from pxsgate.api import Api
from pxsgate.assemble import Assembler
from pxsgate.config import Config
from pxsgate.export import build_exporters, read_secret
from pxsgate.infer import InferenceWorker, PxsScorer, Scorer, runs_on_cpu
from pxsgate.messages import ReceivedInstance, now_iso
from pxsgate.outbox import Outbox
from pxsgate.pipeline import DecodePool, Pipeline
from pxsgate.receive import Receiver
from pxsgate.results import ModelInfo
from pxsgate.spool import Spool
from pxsgate.store import Store

log = structlog.get_logger("pxsgate.server")


class Gateway:
    def __init__(self, config: Config,
                 scorer_factory: Callable[[], Scorer] | None = None) -> None:
        self.config = config
        self.store = Store(config.db_path)
        self.spool = Spool(config.spool_dir, int(config.storage.min_free_mb * 2**20))
        self._scorer_factory = scorer_factory or (lambda: PxsScorer.load(
            config.model, jpeg_roundtrip=config.preprocess.jpeg_roundtrip))
        self.worker = InferenceWorker(self._scorer_factory, config.model.batch,
                                      nice=runs_on_cpu(config.model.device))
        # Header reads (small, I/O-bound); pixel work goes to the decode processes.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="pxsgate-io")
        self._decoder: DecodePool | None = None
        self.model: ModelInfo | None = None
        self._pipeline: Pipeline | None = None
        self._assembler: Assembler | None = None
        self._receiver: Receiver | None = None
        self.outbox = Outbox(self.store, build_exporters(config.exporters, self.store),
                             {e.name: e for e in config.exporters})
        self._outbox_started = False
        self._api: Api | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self.port = 0
        self.http_port = 0

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
        await self.store.open()
        self.spool.open()
        self.spool.remove_leftovers()
        # Before the model: a missing token file fails the start in seconds, not minutes.
        await self.outbox.start()
        self._outbox_started = True
        http = self.config.http
        token = (read_secret(http.bearer_token_file, "http.bearer-token-file")
                 if http.bearer_token_file else None)
        self._decoder = DecodePool(self.config.preprocess)
        model_loading = asyncio.to_thread(self.worker.start)
        _, model = await asyncio.gather(self._decoder.start(), model_loading)
        self.model = model
        self._pipeline = Pipeline(self.config, self.store, self.worker, self.model,
                                  self._executor, self._decoder, self.outbox.wake)
        self._assembler = Assembler(loop, self._study_ready)
        await self._resume()
        if http.port:
            if token is None and http.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("http.unprotected", host=http.host,
                            note="results carry PHI: set http.bearer-token-file")
            self._api = Api(http, self.store, self.health, token)
            self.http_port = await self._api.start()
        self._receiver = Receiver(self.config.dicom, self.spool, loop,
                                  self._instance_received, self._association_closed)
        self.port = await asyncio.to_thread(self._receiver.start)
        log.info("gateway.started", port=self.port, http_port=self.http_port,
                 ae_titles=[t.ae_title for t in self.config.dicom.scp.ae_titles],
                 model=self.model.id, weights_sha256=self.model.weights_sha256[:16],
                 startup_s=round(time.perf_counter() - started, 2))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.stop)
            self._receiver = None
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self._assembler is not None:
            self._assembler.close()
        if self._pipeline is not None:
            try:
                await asyncio.wait_for(self._pipeline.drain(), drain_timeout)
            except TimeoutError:
                log.warning("gateway.drain_timeout", studies=self._pipeline.busy)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._outbox_started:
            await self.outbox.stop()
            self._outbox_started = False
        await asyncio.to_thread(self.worker.stop)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.shutdown)
        await self.store.close()
        log.info("gateway.stopped")

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
        """/healthz: the store answers, the model worker runs, and the outbox's backlog."""
        try:
            deliveries = await self.store.delivery_counts()
            store_ok = True
        except Exception as exc:
            log.error("health.store_failed", error=repr(exc))
            deliveries, store_ok = {}, False
        worker_ok = self.worker.alive
        return {
            "ok": store_ok and worker_ok,
            "store": store_ok,
            "model": {"ok": worker_ok, "id": self.model.id if self.model else None},
            "dicomPort": self.port,
            "uptimeSeconds": round(time.time() - self._started_at, 1),
            "studiesInProgress": self._pipeline.busy if self._pipeline else 0,
            "inferenceQueue": self.worker.queued,
            "deliveries": {"pending": deliveries.get("pending", 0),
                           "dead": deliveries.get("dead", 0),
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

    # --- stage glue (on the loop) ---------------------------------------------------------

    async def _resume(self) -> None:
        """Re-arm the studies that were pending when the service last stopped: deadlines
        that passed meanwhile make the study ready now; one that was being processed is
        processed again."""
        assert self._assembler is not None
        assert self._pipeline is not None
        now = time.time()
        pending = await self.store.pending_studies()
        for study in pending:
            if study.state == "ready" or study.deadline is None:
                self._pipeline.submit(study.study_instance_uid)
                continue
            settle, quiet = self.config.timings("")
            if study.settle_seconds is not None:
                settle = study.settle_seconds
            # The associations died with the old process: at most settle from now.
            delay = min(max(0.0, study.deadline - now), settle)
            self._assembler.resume(study.study_instance_uid, delay, settle, quiet)
        if pending:
            log.info("studies.resumed", studies=len(pending))

    async def _instance_received(self, instance: ReceivedInstance) -> None:
        settle, quiet = self.config.timings(instance.called_ae)
        # While its association is open, the study is ready after the quiet timeout.
        outcome = await self.store.record_instance(instance, time.time() + quiet, settle)
        if outcome == "duplicate":
            # Stored once; the same bytes again do not re-open the study.
            log.info("instance.duplicate", association_id=instance.association_id)
            return
        assert self._assembler is not None
        self._assembler.instance_arrived(instance.study_instance_uid, instance.association_id,
                                         settle, quiet)

    def _association_closed(self, association_id: str) -> None:
        assert self._assembler is not None
        delays = self._assembler.association_closed(association_id)
        if delays:
            now = time.time()
            deadlines = [(uid, now + delay) for uid, delay in delays.items()]
            self._spawn(self.store.set_released(deadlines, now_iso()))

    def _study_ready(self, study_uid: str, why: str) -> None:
        log.info("study.ready", study=study_uid[-12:], why=why)
        assert self._pipeline is not None
        self._pipeline.submit(study_uid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
