"""Recovery at start-up, and what a spool file says of itself when the index cannot.

The spool is the source of truth: an instance file written and fsynced but never indexed
(the process was killed before SQLite committed it, so it was never acknowledged either)
is indexed again from the file alone (:func:`recover_spool`). Then every unfinished job is
re-armed (:func:`resume`): deadlines that passed meanwhile make their study ready now, and
a study that was being processed is processed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydicom import dcmread

from pxsgate.assemble import Assembler
from pxsgate.pipeline import Pipeline
from pxsgate.records import ReceivedInstance, StudyState
from pxsgate.retention import Retention
from pxsgate.rules import element_text
from pxsgate.spool import Spool
from pxsgate.store import Store

log = structlog.get_logger("pxsgate.server")

Timings = Callable[[str], tuple[float, float]]  # Config.timings: AE title -> (settle, quiet)


def recovered_instance(path: Path) -> ReceivedInstance | None:
    """An instance rebuilt from its spool file alone (sender unknown); None if unreadable."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        return ReceivedInstance(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=path,
            size=len(data), sha256=hashlib.sha256(data).hexdigest(), calling_ae="",
            called_ae="", peer_address="", association_id="recovered",
            received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC)
            .astimezone().isoformat(timespec="milliseconds"))
    except Exception:  # a file the receiver wrote is readable; anything else is not ours
        return None


def file_patient_id(path: Path | None) -> str | None:
    """A file's PatientID as DICOM writes it (None: no file, or unreadable)."""
    if path is None:
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # gone meanwhile (retention), or unreadable: unknown
        return None
    return element_text(ds, "PatientID")


async def recover_spool(spool: Spool, store: Store, retention: Retention, executor: Executor,
                        timings: Timings) -> None:
    """Index the instances a crash left in the spool unindexed: written and fsynced,
    killed before SQLite committed them (so never acknowledged either; the sender will
    likely send them again, which is then a duplicate). What is in the spool is not
    forgotten."""
    files = await asyncio.to_thread(spool.instance_files)
    missing = await store.unindexed(files)
    if not missing:
        return
    settle, _ = timings("")
    recovered = 0
    for path in missing:
        instance = await asyncio.get_running_loop().run_in_executor(
            executor, recovered_instance, path)
        if instance is None:
            log.warning("spool.unreadable")
            continue
        known = await store.instance_paths([instance.sop_instance_uid])
        if instance.sop_instance_uid in known:
            # Indexed under another study: this file is a version the index moved
            # away from (or one never acknowledged); the index is what was promised.
            await asyncio.to_thread(path.unlink, True)
            continue
        await store.record_instance(instance, time.time() + settle, settle)
        retention.added(instance.size)
        recovered += 1
    log.info("spool.recovered", instances=recovered, files=len(missing))


async def resume(store: Store, pipeline: Pipeline, assembler: Assembler,
                 timings: Timings) -> None:
    """Re-arm the studies that were pending when the service last stopped: deadlines
    that passed meanwhile make the study ready now; one that was being processed is
    processed again."""
    now = time.time()
    pending = await store.pending_studies()
    for study in pending:
        if study.state == StudyState.READY or study.deadline is None:
            pipeline.submit(study.study_instance_uid)
            continue
        settle, quiet = timings("")
        if study.settle_seconds is not None:
            settle = study.settle_seconds
        # The associations died with the old process: at most settle from now.
        delay = min(max(0.0, study.deadline - now), settle)
        assembler.resume(study.study_instance_uid, delay, settle, quiet)
    if pending:
        log.info("studies.resumed", studies=len(pending))
