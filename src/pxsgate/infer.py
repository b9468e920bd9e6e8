"""Inference: the Scorer seam, the torch PXS scorer, and the worker thread that owns it.

One thread owns the model and the device (CUDA when there is one, else the CPU): torch and
CUDA contexts are happiest on one thread, and the event loop must never wait on a forward
pass. Images queue to that thread; it gathers them into micro-batches of up to
``model.batch.max-size``, waiting at most ``model.batch.max-delay-ms`` after the first one
for company (a deadline batcher, like Triton's dynamic batcher).

The anchor embeddings are computed once, on the worker thread, at start-up; afterwards each
image costs one forward pass (the reference code spent 2N per image).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog
import torch
from PIL import Image

from pxsgate import pxs, synth
from pxsgate.config import BatchConfig, ModelConfig
from pxsgate.errors import ModelError, PxsgateError
from pxsgate.preprocess import F32Array, preprocess_file, preprocess_pixels
from pxsgate.results import ModelInfo

log = structlog.get_logger("pxsgate.infer")

DEMO_ANCHOR_SEED = 20200424
DEMO_ANCHOR_COUNT = 8
DEMO_NOTE = "demonstration weights, not for clinical use"
# The demonstration weights have no file; their "creation" is this project's first release.
DEMO_CREATED_AT = "2026-11-26T00:00:00+00:00"


def lower_priority(increment: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread), so that when
    cores are scarce the association threads receiving images run first; decoding and
    inference take what is left. Best effort: ignored where not permitted."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError):
        pass


class Scorer(Protocol):
    """What the worker needs of a model: its identity and a batch of PXS scores."""

    info: ModelInfo

    def score_batch(self, batch: F32Array) -> list[float]:
        """Scores for a float32 batch [N, 3, 320, 320] in [0, 1]."""
        ...


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {spec!r} but CUDA is not available on this host")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise ModelError(f"model.device {spec!r} is not a torch device: {exc}") from exc


def load_anchor_inputs(spec: str) -> list[F32Array]:
    """Model inputs of the anchor pool: ``demo`` or a folder of DICOM/PNG radiographs."""
    if spec == "demo":
        images = synth.normal_chest_anchors(DEMO_ANCHOR_SEED, DEMO_ANCHOR_COUNT)
        return [preprocess_pixels(img, "MONOCHROME2") for img in images]
    folder = Path(spec)
    if not folder.is_dir():
        raise ModelError(f"model.anchors: {folder} is not a folder of normal radiographs")
    inputs: list[F32Array] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() == ".png":
            with Image.open(path) as img:
                inputs.append(preprocess_pixels(np.asarray(img.convert("L")), "MONOCHROME2"))
        elif path.suffix.lower() in (".dcm", ".dicom", ""):
            inputs.append(preprocess_file(path))
    if not inputs:
        raise ModelError(f"model.anchors: no DICOM or PNG files in {folder}")
    return inputs


class PxsScorer:
    """The PXS score with torch: one forward pass per image against cached anchors."""

    def __init__(self, net: torch.nn.Module, anchors: torch.Tensor, device: torch.device,
                 info: ModelInfo) -> None:
        self._net = net
        self._anchors = anchors
        self._device = device
        self.info = info

    @classmethod
    def load(cls, config: ModelConfig) -> PxsScorer:
        device = pick_device(config.device)
        description = config.description
        net: torch.nn.Module
        if config.weights == "demo":
            net, sha = pxs.demo_embedding_net()
            created = DEMO_CREATED_AT
            net = net.to(device)
        else:
            net, sha = pxs.load_embedding_net(config.weights, device=device)
            mtime = Path(config.weights).stat().st_mtime
            created = datetime.fromtimestamp(mtime, UTC).isoformat()
        if config.weights == "demo" or config.anchors == "demo":
            description = f"{description} ({DEMO_NOTE})"
        anchor_inputs = load_anchor_inputs(config.anchors)
        anchors = pxs.embed(net, torch.from_numpy(np.stack(anchor_inputs)).to(device))
        anchor_sha = hashlib.sha256(anchors.cpu().numpy().tobytes()).hexdigest()
        log.info("model.loaded", device=str(device), weights_sha256=sha[:16],
                 anchors=len(anchor_inputs), anchors_sha256=anchor_sha[:16])
        info = ModelInfo(name=config.name, version=config.version, author=config.author,
                         description=description, created_at=created, weights_sha256=sha)
        return cls(net, anchors, device, info)

    def score_batch(self, batch: F32Array) -> list[float]:
        x = torch.from_numpy(batch).to(self._device, non_blocking=True)
        embeddings = pxs.embed(self._net, x)
        return [float(s) for s in pxs.pxs_scores(embeddings, self._anchors)]


@dataclass(frozen=True)
class _Job:
    image: F32Array
    future: concurrent.futures.Future[float]


_STOP = object()


class InferenceWorker:
    """The thread that owns the model. ``start`` loads it (errors surface there)."""

    def __init__(self, factory: Callable[[], Scorer], batch: BatchConfig) -> None:
        self._factory = factory
        self._max_size = batch.max_size
        self._max_delay = batch.max_delay_ms / 1000.0
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[ModelInfo] = concurrent.futures.Future()

    def start(self, timeout: float = 600.0) -> ModelInfo:
        self._thread = threading.Thread(target=self._run, name="pxsgate-infer", daemon=True)
        self._thread.start()
        return self._ready.result(timeout=timeout)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    async def score(self, image: F32Array) -> float:
        job = _Job(image, concurrent.futures.Future())
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _run(self) -> None:
        lower_priority()
        try:
            scorer = self._factory()
        except BaseException as exc:  # report any load failure to start(), then end
            self._ready.set_exception(exc if isinstance(exc, PxsgateError)
                                      else ModelError(f"cannot load the model: {exc}"))
            return
        self._ready.set_result(scorer.info)
        while True:
            batch, stop = self._gather()
            if batch:
                self._run_batch(scorer, batch)
            if stop:
                return

    def _gather(self) -> tuple[list[_Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        assert isinstance(first, _Job)
        batch = [first] if first.future.set_running_or_notify_cancel() else []
        deadline = time.monotonic() + self._max_delay
        while len(batch) < self._max_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Job)
            # A job whose awaiting task was cancelled (shutdown) is dropped here; once
            # running, its future can no longer be cancelled under the worker's feet.
            if item.future.set_running_or_notify_cancel():
                batch.append(item)
        return batch, False

    def _run_batch(self, scorer: Scorer, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            scores = scorer.score_batch(np.stack([job.image for job in batch]))
        except Exception as exc:  # a model failure fails these images, not the worker
            log.error("inference.failed", batch_size=len(batch), error=str(exc))
            for job in batch:
                job.future.set_exception(ModelError(f"inference failed: {exc}"))
            return
        log.info("inference.batch", batch_size=len(batch),
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        for job, score in zip(batch, scores, strict=True):
            job.future.set_result(score)
