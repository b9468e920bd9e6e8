"""Retention: spooled images are deleted once their study is finished, and the spool is
kept under its ceiling.

A study is finished when its result is stored and none of its deliveries is pending
(delivered, or dead-lettered after its tries). Its images are deleted ``retention-hours``
after that; sooner, oldest finished first, when the spool is above ``max-spool-gb``.
Nothing is deleted that an unfinished job still needs: studies being received, waiting,
being scored, or with a delivery pending (the SR exporter reads the source images) are
never candidates, nor (unless the spool is above its ceiling) a study whose thumbnails are
still being made. The instances' rows, decisions and results stay: ``pxsgate results`` and
the study's story are kept; only the pixels go. The study's pictures
(:mod:`pxsgate.pictures`) stay too: they are removed only ``pictures.keep-days`` after they
were made, checked here once an hour.

The byte count of the spool is kept here, on the loop, so that reception (association
threads) can check the ceiling without a query per image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from pxsgate.config import PicturesConfig, StorageConfig
from pxsgate.pictures import PRUNE_EVERY_S, PictureStore
from pxsgate.records import now_iso
from pxsgate.spool import Spool
from pxsgate.store import Store

log = structlog.get_logger("pxsgate.retention")

BATCH = 100  # studies looked at per query


class Retention:
    def __init__(self, storage: StorageConfig, store: Store, spool: Spool, *,
                 pictures: PictureStore | None = None,
                 pictures_config: PicturesConfig | None = None,
                 busy: Callable[[str], bool] = lambda study_uid: False) -> None:
        self._retention_s = storage.retention_hours * 3600.0
        self.ceiling = int(storage.max_spool_gb * 2**30)  # 0: none
        self._store = store
        self._spool = spool
        self._pictures = pictures
        self._pictures_keep_days = pictures_config.keep_days if pictures_config else None
        self._pictures_pruned = float("-inf")  # time.monotonic() of the last prune
        self._busy = busy  # the study's files are still needed (its thumbnails)
        self.spool_bytes = 0  # written on the loop; read by association threads
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.spool_bytes = await self._store.spool_bytes()

    def added(self, size: int) -> None:
        self.spool_bytes += size

    def over_ceiling(self, incoming: int = 0) -> bool:
        return bool(self.ceiling) and self.spool_bytes + incoming > self.ceiling

    async def run(self, incoming: int = 0, now: float | None = None) -> int:
        """Delete what retention allows, then what the ceiling needs to take ``incoming``
        more bytes; return studies purged."""
        async with self._lock:  # one pass at a time (the timer and a full spool)
            # Re-counted each pass, so small drifts of the running count do not last.
            self.spool_bytes = await self._store.spool_bytes()
            now = time.time() if now is None else now
            purged = await self._purge(now - self._retention_s, lambda: True, wait=True)
            if self.over_ceiling(incoming):
                # Above the ceiling a study's thumbnails do not hold its files: reception
                # comes first (the thumbnails not yet made are not made).
                purged += await self._purge(None, lambda: self.over_ceiling(incoming),
                                            wait=False)
                if self.over_ceiling(incoming):
                    log.warning("spool.ceiling", spool_mb=self.spool_bytes // 2**20,
                                ceiling_mb=self.ceiling // 2**20,
                                note="only unfinished studies left: reception refuses")
            await self.prune_pictures(now)
            return purged

    async def prune_pictures(self, now: float, force: bool = False) -> int:
        """Remove the pictures older than ``pictures.keep-days`` (none when it is null), at
        most once an hour unless ``force``; return how many went."""
        if self._pictures is None or self._pictures_keep_days is None:
            return 0
        if not force and time.monotonic() - self._pictures_pruned < PRUNE_EVERY_S:
            return 0
        self._pictures_pruned = time.monotonic()
        removed = await asyncio.to_thread(
            self._pictures.prune, now - self._pictures_keep_days * 86400.0)
        if removed:
            log.info("pictures.pruned", pictures=removed, keep_days=self._pictures_keep_days)
        return removed

    async def _purge(self, finished_before: float | None, wanted: Callable[[], bool], *,
                     wait: bool) -> int:
        """``wait``: a study whose thumbnails are being made keeps its files for now."""
        purged = 0
        while wanted():
            batch = await self._store.purgeable_studies(finished_before, BATCH)
            if not batch:
                break
            progress = False
            for study_uid, paths, size in batch:
                if not wanted():
                    break
                if wait and self._busy(study_uid):
                    continue  # its thumbnails are being made from these files
                if not self._spool.begin_purge(study_uid):
                    continue  # an instance of it is arriving: it is being re-opened
                try:
                    gone = await asyncio.to_thread(_delete, paths)
                    if await self._store.mark_purged(study_uid, gone, now_iso()):
                        purged += 1
                        progress = True
                        log.info("study.purged", study=self._store.study_label(study_uid),
                                 files=len(gone), bytes=size)
                        self.spool_bytes -= size
                finally:
                    self._spool.end_purge(study_uid)
            if len(batch) < BATCH or not progress:
                break
        return purged


def _delete(paths: Sequence[Path]) -> list[Path]:
    """Delete the files; return those that are gone afterwards (a late re-send of the same
    instance may have written its file again meanwhile: that one stays)."""
    directories = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        directories.add(path.parent)
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty: a late instance arrived meanwhile
            directory.rmdir()
        with contextlib.suppress(OSError):
            fd = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return [p for p in paths if not p.exists()]
