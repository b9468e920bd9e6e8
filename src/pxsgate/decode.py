"""Decoding and preprocessing in processes of their own: the :class:`DecodePool` the service
owns, and what runs first in each of its processes (``init_worker``, ``warm``).

Kept apart from the pipeline on purpose: a spawned process imports the module of every
function it is given, and the pipeline imports torch (through infer.py). From here and
preprocess.py a decode process loads numpy, pydicom and PIL only: about 50 MB instead of
250 MB each. Nothing here may import infer.py (or, at run time, config.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pxsgate.errors import DecodeFailed
from pxsgate.preprocess import THUMBNAIL_SIDE, U8Array, preprocess_file, thumbnail_file

if TYPE_CHECKING:  # config only for the annotation: a decode process does not load it
    from pxsgate.config import PreprocessConfig

# The logger the pipeline's decode events always had (decode.timeout, decode.worker_died).
log = structlog.get_logger("pxsgate.pipeline")

PR_SET_PDEATHSIG = 1  # prctl(2)
IDLE_TIME_FACTOR = 10  # a thumbnail's time limit: the decode time limit times this


def init_worker(parent: int | None = None, log_format: str = "auto",
                include_phi: bool = False, idle: bool = False) -> None:
    """Lower the process's priority, tie its life to the service's, and send what the
    libraries log or warn here (pydicom decoding a peer's file) through the service's
    format, without data set values unless ``include_phi``. ``idle``: the process runs
    only when a core has nothing else to do (SCHED_IDLE; the thumbnails' process)."""
    import sys

    from pxsgate.log import route_library_logs

    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    route_library_logs(use_json, include_phi)
    # Decoding yields the CPU to reception: a busy decoder must not slow C-STORE answers.
    # Nice 19 weighs 15 against the receiver threads' 1024 in the Linux scheduler.
    with contextlib.suppress(OSError):
        os.nice(19)
    if idle:
        # SCHED_IDLE: below nice 19, scheduled only on a core nothing else wants, so
        # thumbnails never take time from reception, decoding for the model or inference.
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # A service killed with SIGKILL (a crash, the OOM killer) runs no clean-up: without
    # this its decode processes would live on as orphans. Linux only; best effort.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect


def warm() -> int:
    """A no-op task: starting every process before the first study needs one."""
    return os.getpid()


def auto_workers(cores: int) -> int:
    """Decode processes when ``preprocess.workers`` is 0: every core but one, which is left
    to reception and the loop; at least one, and no more than 8 (a DGX has 128 cores, and a
    study is a handful of images)."""
    return max(1, min(8, cores - 1))


def decoded_image_bound(batch_size: int, decode_workers: int) -> int:
    """How many decoded images the service holds at most (see pipeline.Pipeline)."""
    return 2 * batch_size + decode_workers


class DecodePool:
    """Processes that decode and preprocess images, owned by the service.

    Spawned, not forked: the service has threads (pynetdicom, torch) and forking a threaded
    process can deadlock the child. A worker that dies (a codec crashing on a malformed
    image) fails that image's study with a clear error and the pool is replaced.

    Thumbnails (:meth:`thumbnail`) have a process of their own, started at the first one,
    that runs only when a core is idle: they never wait in front of a model input.
    """

    def __init__(self, config: PreprocessConfig, time_limit: float = 120.0,
                 log_format: str = "auto", include_phi: bool = False) -> None:
        self._log = (log_format, include_phi)  # how the workers log (init_worker)
        self.workers = config.workers or auto_workers(os.cpu_count() or 1)
        self._jpeg = config.jpeg_roundtrip
        self._time_limit = time_limit
        self._pool = self._new()
        self._idle_pool: concurrent.futures.ProcessPoolExecutor | None = None
        # Model inputs being decoded now (or waiting for a process): read on the loop by
        # decode on arrival (pxsgate.early), which starts one only while this is below
        # ``workers``, and told by ``_freed`` each time one ends.
        self.in_flight = 0
        self._freed: list[Callable[[], None]] = []

    def when_freed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) each time a model input's decode ends."""
        self._freed.append(callback)

    def _new(self, idle: bool = False) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=1 if idle else self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(os.getpid(), *self._log, idle))

    async def start(self) -> None:
        """Start every worker now, so the first study does not pay for the spawns."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, warm)
                               for _ in range(self.workers)))

    async def preprocess(self, path: Path) -> U8Array:
        self.in_flight += 1
        try:
            return await self._preprocess(path)
        finally:
            self.in_flight -= 1
            for callback in self._freed:
                callback()

    async def _preprocess(self, path: Path) -> U8Array:
        pool = self._pool
        call = functools.partial(preprocess_file, path, jpeg_roundtrip=self._jpeg)
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(pool, call), self._time_limit)
        except TimeoutError:
            # A codec looping on a malformed image: its process cannot be interrupted, so
            # the pool is replaced (images decoding beside it fail too, and are retried).
            if pool is self._pool:
                log.error("decode.timeout", time_limit_s=self._time_limit)
                self._pool = self._new()
                _terminate(pool)
            raise DecodeFailed(
                f"decoding took longer than {self._time_limit:g} s") from None
        except BrokenProcessPool as exc:
            if pool is self._pool:
                log.error("decode.worker_died")
                self._pool = self._new()
            raise DecodeFailed("the decoder process died on this image") from exc

    async def thumbnail(self, path: Path, max_side: int = THUMBNAIL_SIDE) -> U8Array:
        """The image's thumbnail (``preprocess.thumbnail_file``), made in the idle process;
        PreprocessError as :meth:`preprocess` (DecodeFailed: the process, not the image)."""
        if self._idle_pool is None:
            self._idle_pool = self._new(idle=True)
        pool = self._idle_pool
        call = functools.partial(thumbnail_file, path, max_side)
        # An idle process waits while the cores are busy: a longer limit, for a codec
        # that loops, not for a busy hour.
        limit = self._time_limit * IDLE_TIME_FACTOR
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(pool, call), limit)
        except TimeoutError:
            if pool is self._idle_pool:
                log.warning("decode.thumbnail_timeout", time_limit_s=limit)
                self._idle_pool = None
                _terminate(pool)
            raise DecodeFailed(f"the thumbnail took longer than {limit:g} s") from None
        except BrokenProcessPool as exc:
            if pool is self._idle_pool:
                log.error("decode.worker_died", thumbnail=True)
                self._idle_pool = None
            raise DecodeFailed("the thumbnail process died on this image") from exc

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the processes; one still busy after ``timeout`` seconds is terminated."""
        pool = self._pool
        processes = _processes(pool)
        if self._idle_pool is not None:
            idle, self._idle_pool = self._idle_pool, None
            processes += _processes(idle)
            idle.shutdown(wait=False, cancel_futures=True)
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.terminate()


def _processes(pool: concurrent.futures.ProcessPoolExecutor) -> list[Any]:
    """A pool's worker processes (ProcessPoolExecutor keeps them private; None once shut
    down)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes (ProcessPoolExecutor has no public way to)."""
    processes = _processes(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
