"""Priors from the PACS: the patient's earlier studies found and retrieved, each one's AP
image picked by the selection rules and embedded (one forward pass, the same weights), and
kept as a fetched prior, so that change over time works from the first day.

A lookup runs when a study is scored and the store holds no usable prior for the patient.
The result waits for it at most ``priors.wait-seconds``; a lookup still going on then
finishes in the background (its priors serve the patient's later studies). Lookups are
de-duplicated per patient (a second study of the patient waits for the same one) and
limited to ``priors.rate-per-minute``. What came of it goes into the result
(``pxsgate.priorLookup``): found, none-found, timeout, refused, failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import structlog
from asyncio_throttle.throttler import Throttler

from pxsgate import change, rules
from pxsgate.config import PriorsConfig, SelectionConfig
from pxsgate.document import PriorLookup
from pxsgate.errors import PxsgateError
from pxsgate.infer import ImageResult
from pxsgate.priors.source import PriorSource, PriorStudy, SourceRefused
from pxsgate.records import StoredInstance, now_iso
from pxsgate.results import dicom_datetime
from pxsgate.rules import Header
from pxsgate.service.metrics import Metrics
from pxsgate.store import FetchedPrior, Store

log = structlog.get_logger("pxsgate.priors")

R = TypeVar("R")
# One image file embedded: its score and embedding (the model, under the same weights).
Embed = Callable[[Path], Awaitable[ImageResult]]


@dataclass(frozen=True)
class LookupRequest:
    """A scored study whose patient has no usable prior in the store."""

    patient_id: str
    study_instance_uid: str
    study_time: str  # pxsgate.change.study_time_key
    not_before: str  # the earliest study time a prior may have ("" = no limit)


@dataclass(frozen=True)
class Found:
    outcome: str  # found | none-found | refused | failed
    detail: str = ""


def _dicom_date(key: str) -> str:
    return key[:10].replace("-", "")


def read_prior_headers(paths: list[Path]) -> list[Header]:
    """The retrieved files as the selection rules read them."""
    from pydicom import dcmread

    headers = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # a PACS's file can be broken in any way
            instance = StoredInstance("", "", "", path)
            headers.append(Header(instance, None, str(exc)[:200]))
            continue
        instance = StoredInstance(str(ds.get("SOPInstanceUID", "")),
                                  str(ds.get("SeriesInstanceUID", "")),
                                  str(ds.get("SOPClassUID", "")), path)
        headers.append(Header(instance, ds))
    return headers


class PriorFinder:
    """Looks up, retrieves and embeds patients' priors (see the module's docstring)."""

    def __init__(self, config: PriorsConfig, source: PriorSource, store: Store, embed: Embed,
                 *, selection: Callable[[], SelectionConfig], priors_dir: Path,
                 weights_sha256: str, anchors_sha256: str,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._source = source
        self._store = store
        self._embed = embed
        self._selection = selection
        self._dir = priors_dir
        self._weights = weights_sha256
        self._anchors = anchors_sha256
        self._metrics = metrics or Metrics()
        self._throttle = Throttler(rate_limit=config.rate_per_minute, period=60.0)
        self._inflight: dict[str, asyncio.Task[Found]] = {}
        # Its own threads: a PACS that hangs holds these, never the loop's default pool.
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="pxsgate-priors")
        self._closed = False

    @property
    def source_label(self) -> str:
        return self._source.label

    def clear_leftovers(self) -> None:
        """Files of lookups a stop or crash cut short: never needed again."""
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir.mkdir(parents=True, exist_ok=True)

    async def lookup(self, request: LookupRequest, wait_seconds: float | None = None
                     ) -> PriorLookup:
        """Ask the PACS for the patient's prior; what came of it within ``wait_seconds``
        (default priors.wait-seconds)."""
        wait = self._config.wait_seconds if wait_seconds is None else wait_seconds
        started = time.monotonic()
        task = self._inflight.get(request.patient_id)
        if task is None:
            task = asyncio.create_task(self._find(request))
            self._inflight[request.patient_id] = task
            task.add_done_callback(functools.partial(self._done, request.patient_id))
        try:
            found = await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            found = Found("timeout", f"no answer within {wait:g} s")
        self._metrics.prior_lookups.labels(outcome=found.outcome).inc()
        return PriorLookup(outcome=found.outcome, source=self._source.label,
                           seconds=round(time.monotonic() - started, 3), detail=found.detail)

    def _done(self, key: str, task: asyncio.Task[Found]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            # The type only: a message may quote a value of the PACS's answer (PHI).
            log.error("prior.lookup_crashed", error=type(task.exception()).__name__)

    async def close(self) -> None:
        """Stop: cancel the lookups under way and abort their associations."""
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        self._source.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    # --- one lookup ---------------------------------------------------------------------

    async def _find(self, request: LookupRequest) -> Found:
        try:
            async with self._throttle:
                return await self._lookup(request)
        except SourceRefused as exc:
            log.warning("prior.refused", source=self._source.label, reason=str(exc))
            return Found("refused", str(exc))
        except Exception as exc:
            # The type only: a message may quote a value of the PACS's answer (PHI).
            log.error("prior.failed", source=self._source.label, error=type(exc).__name__)
            return Found("failed", type(exc).__name__)

    async def _lookup(self, request: LookupRequest) -> Found:
        date_from = _dicom_date(request.not_before) if request.not_before else None
        studies = await self._blocking(self._source.find, request.patient_id, date_from,
                                       _dicom_date(request.study_time))
        known = await self._store.known_prior_studies(request.patient_id, self._weights)
        candidates = sorted(
            (s for s in studies
             if s.study_instance_uid != request.study_instance_uid
             and s.study_instance_uid not in known
             and request.not_before <= _time_key(s) < request.study_time),
            key=lambda s: s.sort_key, reverse=True)[:self._config.max_studies]
        log.info("prior.candidates", source=self._source.label, found=len(studies),
                 candidates=len(candidates))
        kept: list[FetchedPrior] = []
        errors: list[str] = []
        for study in candidates:
            try:
                prior = await self._fetch(request.patient_id, study)
            except SourceRefused:
                if not kept:
                    raise
                break  # keep what was fetched
            except PxsgateError as exc:  # its image could not be decoded or embedded
                errors.append(str(exc))
                continue
            if prior is not None:
                kept.append(prior)
        if kept:
            await self._store.add_fetched_priors(kept)
            self._metrics.priors_fetched.inc(len(kept))
            return Found("found")
        if errors:
            return Found("failed", f"no prior image could be embedded: {errors[0][:200]}")
        return Found("none-found")

    async def _fetch(self, patient_id: str, study: PriorStudy) -> FetchedPrior | None:
        """One prior study retrieved, its AP image picked and embedded; None when the
        rules pick no image of it. Its files are deleted after."""
        folder = self._dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            count = await self._blocking(self._source.retrieve, study.study_instance_uid,
                                         folder)
            paths = sorted(folder.glob("*.dcm"))
            headers = await self._blocking(read_prior_headers, paths)
            # The same patient's study only: a PACS's answer for another patient (a merge
            # in progress, a bad query match) is no prior of this one.
            headers = [h for h in headers
                       if h.dataset is None or h.text("PatientID") == patient_id]
            decision = rules.select(headers, self._selection())
            log.info("prior.retrieved", source=self._source.label, instances=count,
                     candidate=decision.candidate, rule=decision.rule)
            if not decision.candidate or not decision.inputs:
                return None
            chosen = decision.inputs[0]
            header = next(h for h in headers
                          if h.instance.sop_instance_uid == chosen.sop_instance_uid)
            study_datetime = dicom_datetime(header.text("StudyDate"),
                                            header.text("StudyTime"))
            if study_datetime is None:
                return None  # no date: it cannot be placed before this study
            result = await self._embed(header.instance.path)
            if result.embedding is None:
                return None
            return FetchedPrior(
                patient_id=patient_id, study_instance_uid=study.study_instance_uid,
                series_instance_uid=chosen.series_instance_uid,
                sop_instance_uid=chosen.sop_instance_uid,
                study_time=change.study_time_key(study_datetime, now_iso()),
                study_datetime=study_datetime, score=result.score,
                weights_sha256=self._weights, anchors_sha256=self._anchors,
                dim=int(result.embedding.size), vector=change.pack(result.embedding),
                source=self._source.label, fetched_at=now_iso())
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _time_key(study: PriorStudy) -> str:
    iso = dicom_datetime(study.study_date, study.study_time) or ""
    try:
        return datetime.fromisoformat(iso).isoformat(timespec="seconds")
    except ValueError:
        return ""
