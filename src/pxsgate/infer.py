"""Inference: the Scorer seam, the torch PXS scorer, the worker thread that owns it, and
the ModelGate by which studies share it (or one study has it alone).

One thread owns the model and the device (CUDA when there is one, else the CPU): torch and
CUDA contexts are happiest on one thread, and the event loop must never wait on a forward
pass. Images queue to that thread; it gathers them into micro-batches of up to
``model.batch.max-size``, waiting at most ``model.batch.max-delay-ms`` after the first one
for company (a deadline batcher, like Triton's dynamic batcher).

Images arrive as 8-bit 320x320 model images (100 KB each); the batch is moved to the
device as uint8 (from pinned memory, asynchronously, on CUDA) and only there becomes the
float32 three-channel ToTensor input. The anchor embeddings are computed once (or loaded
from a file) at start-up; afterwards each image costs one forward pass (the reference code
spent 2N per image).

inference_mode and channels_last everywhere; on CUDA also bf16/fp16 autocast when its
scores agree with fp32 on a probe set, cuDNN autotuning, optional torch.compile, and a
warm-up of the batch sizes the service will use, so the first study is not slow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import structlog
import torch
from torch import Tensor, nn

from pxsgate import anchors as anchor_pool
from pxsgate import pxs
from pxsgate.config import BatchConfig, ModelConfig
from pxsgate.errors import ModelError, PxsgateError
from pxsgate.preprocess import CROP_TO, U8Array
from pxsgate.results import ModelInfo
from pxsgate.service.failpoints import Failpoints
from pxsgate.service.metrics import Metrics

log = structlog.get_logger("pxsgate.infer")

DEMO_NOTE = "demonstration weights, not for clinical use"
# The demonstration weights have no file; their "creation" is this project's first release.
DEMO_CREATED_AT = "2026-11-26T00:00:00+00:00"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_IMAGES = anchor_pool.PROBE_IMAGES  # scored in fp32 and in a reduced precision
MAX_COMPILED_SHAPES = 8  # torch._dynamo's default recompile limit per function
WARM_UP_PASSES_COMPILED = 3  # CUDA graphs are recorded on a later call than the first


def lower_priority(increment: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread), so that when
    cores are scarce the association threads receiving images run first; decoding and
    inference take what is left. Best effort: ignored where not permitted."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError):
        pass


F32Array = npt.NDArray[np.float32]


class Scorer(Protocol):
    """What the worker needs of a model: its identity and a batch of PXS scores."""

    info: ModelInfo

    def score_batch(self, batch: U8Array) -> list[float]:
        """Scores for a batch of 8-bit model images [N, 320, 320]."""
        ...


@runtime_checkable
class EmbeddingScorer(Scorer, Protocol):
    """A Scorer that also hands out each image's embedding, from the same forward pass:
    the worker uses it when a model has it (PxsScorer does), so results can be compared
    over time; a model with ``score_batch`` alone scores without embeddings."""

    def score_and_embed(self, batch: U8Array) -> tuple[list[float], F32Array]:
        """Scores and embeddings [N, D] (float32, CPU) for a batch of model images."""
        ...


@runtime_checkable
class RemoteScorer(Scorer, Protocol):
    """A Scorer whose model runs elsewhere (model.backend triton): it can be down while
    this process is fine, which /healthz reports, and it holds a connection to close."""

    def problem(self) -> str | None:
        """Why the model cannot score now (unreachable, not ready), or None. Called from
        any thread, not only the worker's."""
        ...

    def close(self) -> None: ...


def load_scorer(config: ModelConfig, *, jpeg_roundtrip: bool = False) -> Scorer:
    """The scorer of ``model.backend``: torch in this process, or the Triton client."""
    if config.backend == "triton":
        # tritonclient is imported only by a service that uses it.
        from pxsgate.triton.scorer import TritonScorer

        return TritonScorer.load(config, jpeg_roundtrip=jpeg_roundtrip)
    return PxsScorer.load(config, jpeg_roundtrip=jpeg_roundtrip)


@dataclass(frozen=True)
class ImageResult:
    """What the worker answers for one image."""

    score: float
    batch_size: int  # images in the forward pass that scored it
    embedding: F32Array | None = field(default=None, compare=False, repr=False)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {spec!r} but CUDA is not available on this host")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise ModelError(f"model.device {spec!r} is not a torch device: {exc}") from exc


# ToTensor's value for each grey level, float32(level) / 255 by IEEE division on the CPU.
# Looked up rather than divided on the device: CUDA turns a division by a scalar into a
# multiplication by its reciprocal, 1 ulp off for about half of the levels.
_TO_TENSOR = torch.arange(256, dtype=torch.float32) / 255.0


def batch_tensor(images: U8Array, device: torch.device, *, channels_last: bool = False
                 ) -> Tensor:
    """8-bit model images [N, H, W] -> the float32 [N, 3, H, W] model input on ``device``.

    torchvision ``ToTensor`` (``float / 255``) and ``np.repeat(x, 3, 0)``, done after the
    copy: a quarter of the bytes cross the bus. On CUDA the copy is from pinned memory and
    does not block; later work on the same stream waits for it.
    """
    host = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    if device.type == "cuda":
        host = host.pin_memory()
    x = levels_to_input(host.to(device, non_blocking=True),
                        _TO_TENSOR.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def to_tensor_table() -> Tensor:
    """A copy of ToTensor's value of each grey level (float32 [256]), for a module that
    carries it as a buffer (the Triton export, pxsgate.triton.export)."""
    return _TO_TENSOR.clone()


def levels_to_input(levels: Tensor, table: Tensor) -> Tensor:
    """8-bit images [N, H, W] (uint8, on the table's device) -> the float32 [N, 3, H, W]
    ToTensor input, by looking each grey level up in ``table`` (:func:`to_tensor_table`).
    The one definition of the model input: :func:`batch_tensor` uses it here, and the
    exported Triton model runs it on the server (it traces to a gather and an expand)."""
    x = table[levels.to(torch.int64)]
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def batch_buckets(max_size: int) -> tuple[int, ...]:
    """The batch sizes compiled graphs are made for: 1, 2, 4 ... and max-size itself."""
    sizes = {max_size}
    size = 1
    while size < max_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class Runtime:
    """How the forward pass runs: device, precision, memory format."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """fp32 is IEEE fp32 (cuDNN's TF32 default is switched off); tf32 lets cuDNN use
        TF32 tensor cores; bf16 and fp16 are autocast.

        cudnn.allow_tf32 is process-wide: it is set and restored around each forward pass,
        which is safe because one thread (the inference worker) runs the model.
        """
        before = torch.backends.cudnn.allow_tf32
        try:
            if self.device.type == "cuda":
                torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
            dtype = _AUTOCAST_DTYPES.get(self.precision)
            if dtype is None:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    yield
        finally:
            torch.backends.cudnn.allow_tf32 = before


def precision_candidates(spec: str, device: torch.device) -> list[str]:
    """Reduced precisions to try, fastest first; each must agree with fp32 to be used.

    ``auto`` on CUDA: bf16 where the GPU has it natively (Ampere and later), fp16, then
    TF32. ``auto`` on the CPU: none (fp32). TF32 is a CUDA mode; on the CPU it is fp32.
    """
    if spec == "fp32":
        return []
    if device.type != "cuda":
        return [] if spec in ("auto", "tf32") else [spec]
    if spec != "auto":
        return [spec]
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return (["bf16"] if native_bf16 else []) + ["fp16", "tf32"]


def load_weights(config: ModelConfig, device: torch.device) -> tuple[nn.Module, str, str]:
    """(embedding network on ``device``, weights sha256, creation time); checks the pin."""
    if config.weights == "demo":
        demo, sha = pxs.demo_embedding_net()
        net: nn.Module = demo.to(device)
        created = DEMO_CREATED_AT
    else:
        if config.sha256 is not None and Path(config.weights).is_file():
            # Check the pin before unpickling anything from an unexpected file.
            sha = pxs.file_sha256(Path(config.weights))
            _check_pin(config, sha)
        net, sha = pxs.load_embedding_net(config.weights, device=device)
        created = datetime.fromtimestamp(Path(config.weights).stat().st_mtime, UTC).isoformat()
    _check_pin(config, sha)
    return net, sha, created


def _check_pin(config: ModelConfig, sha: str) -> None:
    if config.sha256 is not None and sha != config.sha256:
        raise ModelError(
            f"model.weights {config.weights}: sha256 is {sha}, but model.sha256 pins "
            f"{config.sha256}; refusing to load other weights than the pinned ones")


class PxsScorer:
    """The PXS score with torch: one forward pass per image against cached anchors."""

    def __init__(self, net: nn.Module, anchors: anchor_pool.AnchorSet, runtime: Runtime,
                 info: ModelInfo, buckets: tuple[int, ...] = ()) -> None:
        self._net = net
        self._forward: Callable[[Tensor], Tensor] = net
        self.anchors = anchors
        self.runtime = runtime
        self.info = info
        self._buckets = buckets  # pad batches up to these sizes (compiled graphs)

    @classmethod
    def load(cls, config: ModelConfig, *, jpeg_roundtrip: bool = False) -> PxsScorer:
        """Load weights and anchors, pick the precision, compile if asked, and warm up."""
        device = pick_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        net, sha, created = load_weights(config, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
        # channels_last: cuDNN's and oneDNN's fast convolution layout (measured once, ad hoc,
        # on a 2-core CPU: a batch-2 forward pass 0.25 s against 0.31 s in NCHW).
        # Module.to accepts memory_format (documented); its type stubs omit it.
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        runtime = Runtime(device, "fp32", channels_last=True)
        info = ModelInfo(name=config.name, version=config.version, author=config.author,
                         description=config.description, created_at=created,
                         weights_sha256=sha)
        scorer = cls(net, anchor_pool.AnchorSet(torch.empty(0, 1000), (), sha), runtime, info)
        pool, images = anchor_pool.load_or_embed(config.anchors, scorer.embed, sha,
                                                 chunk=config.batch.max_size,
                                                 jpeg_roundtrip=jpeg_roundtrip)
        scorer.anchors = pool
        probe = images or pool.probe_images() or anchor_pool.anchor_images("demo")
        scorer.runtime = replace(runtime, precision=scorer._checked_precision(config, probe))
        if config.compile != "none":
            scorer._compile(config.compile, batch_buckets(config.batch.max_size))
        demo = config.weights == "demo" or config.anchors == "demo"
        description = f"{config.description} ({DEMO_NOTE})" if demo else config.description
        scorer.info = replace(info, description=description, anchors_sha256=pool.sha256,
                              anchor_count=len(pool), device=str(device),
                              precision=scorer.runtime.precision)
        scorer.warm_up(config.batch.max_size)
        log.info("model.loaded", device=str(device), precision=scorer.runtime.precision,
                 compile=config.compile, weights_sha256=sha[:16], anchors=len(pool),
                 anchors_sha256=pool.sha256[:16])
        return scorer

    def _checked_precision(self, config: ModelConfig,
                           probe: list[tuple[str, U8Array]]) -> str:
        """The first reduced precision whose scores agree with fp32, else fp32.

        Agreement: on every probe image, |score - fp32 score| <= precision-tolerance x the
        fp32 score (relative; 0.01 = 1 %).
        """
        candidates = precision_candidates(config.precision, self.runtime.device)
        if not candidates:
            return "fp32"
        batch = np.stack([img for _, img in probe[:PROBE_IMAGES]])
        reference = np.array(self._score_chunked(batch, config.batch.max_size))
        fp32 = self.runtime
        for wanted in candidates:
            self.runtime = replace(fp32, precision=wanted)
            try:
                reduced = np.array(self._score_chunked(batch, config.batch.max_size))
            except ModelError as exc:
                log.warning("model.precision_fallback", wanted=wanted, error=str(exc))
                continue
            finally:
                self.runtime = fp32
            error = float(np.max(np.abs(reduced - reference)
                                 / np.maximum(np.abs(reference), 1e-12)))
            if error <= config.precision_tolerance:
                log.info("model.precision_checked", precision=wanted, relative_error=error,
                         tolerance=config.precision_tolerance, probe_images=len(batch))
                return wanted
            log.warning("model.precision_fallback", wanted=wanted, relative_error=error,
                        tolerance=config.precision_tolerance)
        return "fp32"

    def _score_chunked(self, images: U8Array, size: int) -> list[float]:
        return [s for i in range(0, len(images), size)
                for s in self.score_batch(images[i : i + size])]

    def _compile(self, mode: str, buckets: tuple[int, ...]) -> None:
        if len(buckets) > MAX_COMPILED_SHAPES:
            raise ModelError(f"model.compile: batch.max-size gives {len(buckets)} batch sizes "
                             f"to compile; at most {MAX_COMPILED_SHAPES} (max-size 128)")
        try:
            compiled = torch.compile(self._net, mode=mode, dynamic=False)
        except Exception as exc:  # missing compiler, unsupported platform
            raise ModelError(f"model.compile {mode}: torch.compile failed: {exc}") from exc
        self._forward = compiled
        self._buckets = buckets

    def warm_up(self, max_size: int) -> None:
        """Run the batch sizes the service will use, so that cuDNN autotuning, compilation
        and CUDA graph recording happen now and not on the first studies."""
        on_cuda = self.runtime.device.type == "cuda"
        sizes = self._buckets or (batch_buckets(max_size) if on_cuda else (1,))
        passes = WARM_UP_PASSES_COMPILED if self._buckets else 1
        started = time.perf_counter()
        for size in sizes:
            for _ in range(passes):
                self.embed(np.zeros((size, CROP_TO, CROP_TO), dtype=np.uint8))
        log.info("model.warm", batch_sizes=list(sizes), passes=passes,
                 duration_s=round(time.perf_counter() - started, 2))

    def embed(self, images: U8Array) -> Tensor:
        """Embeddings [N, 1000] (float32, CPU) of 8-bit model images [N, 320, 320]."""
        count = len(images)
        padded = next((b for b in self._buckets if b >= count), count)
        if padded > count:
            filler = np.zeros((padded - count, *images.shape[1:]), dtype=np.uint8)
            images = np.concatenate([images, filler])
        try:
            with torch.inference_mode(), self.runtime.context():
                x = batch_tensor(images, self.runtime.device,
                                 channels_last=self.runtime.channels_last)
                out = self._forward(x)
            return out[:count].to("cpu", torch.float32)
        except (RuntimeError, ValueError) as exc:  # out of memory, wrong input shape
            raise ModelError(f"inference failed: {exc}") from exc

    def score_batch(self, batch: U8Array) -> list[float]:
        return self.score_and_embed(batch)[0]

    def score_and_embed(self, batch: U8Array) -> tuple[list[float], F32Array]:
        """Scores and the embeddings they were computed from: one forward pass. The
        embeddings are already float32 on the CPU (pxs_scores reads them there), so
        handing them out costs no copy."""
        embeddings = self.embed(batch)
        scores = pxs.pxs_scores(embeddings, self.anchors.embeddings)
        return [float(s) for s in scores], embeddings.numpy()


@dataclass(frozen=True)
class _Job:
    image: U8Array
    future: concurrent.futures.Future[ImageResult]
    tag: str = ""  # the study's label, for the batch's log line


_STOP = object()


def runs_on_cpu(spec: str) -> bool:
    """Whether ``model.device`` means the CPU here."""
    return spec == "cpu" or (spec == "auto" and not torch.cuda.is_available())


class InferenceWorker:
    """The thread that owns the model. ``start`` loads it (errors surface there).

    ``nice``: lower the thread's priority below reception's. Right for CPU inference, which
    would otherwise take the cores from the association threads; not for a GPU, where the
    thread mostly launches kernels and a lower priority only delays them. (Measured on a
    2-core VM with nothing else running: nice 10 costs CPU inference 18 % of its speed.)
    """

    def __init__(self, factory: Callable[[], Scorer], batch: BatchConfig, *,
                 nice: bool = False, time_limit: float = 120.0,
                 failpoints: Failpoints | None = None, metrics: Metrics | None = None) -> None:
        self._factory = factory
        self._nice = nice
        self._time_limit = time_limit
        self._failpoints = failpoints or Failpoints()
        self._metrics = metrics or Metrics()
        # The batch on the model and since when (monotonic); written by the worker thread,
        # read by the loop's watchdog (:meth:`check_time_limit`).
        self._current: tuple[float, list[_Job]] | None = None
        self._stuck = False
        self._max_size = batch.max_size
        self._max_delay = batch.max_delay_ms / 1000.0
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        # start() runs on a thread of its own while a stop signal may call stop(): the
        # thread is made and started as one step, so stop() never joins an unstarted one.
        self._starting = threading.Lock()
        self._ready: concurrent.futures.Future[ModelInfo] = concurrent.futures.Future()
        self._scorer: Scorer | None = None  # once loaded

    def start(self, timeout: float = 1800.0) -> ModelInfo:
        with self._starting:
            self._thread = threading.Thread(target=self._run, name="pxsgate-infer",
                                            daemon=True)
            self._thread.start()
        try:
            return self._ready.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise ModelError(f"the model did not load and warm up in {timeout:.0f} s") from None

    @property
    def alive(self) -> bool:
        """The worker thread runs and its last batch came back within the time limit."""
        return self._thread is not None and self._thread.is_alive() and not self._stuck

    def check_time_limit(self) -> bool:
        """Called periodically from the loop. A batch on the model for longer than
        ``jobs.batch-time-limit-seconds`` fails its images now (their studies retry) and
        marks the worker stuck: a hung GPU call cannot be interrupted from Python, so the
        service reports itself unhealthy and is restarted. True while not stuck."""
        current = self._current
        if current is None or self._stuck:
            return not self._stuck
        since, batch = current
        if time.monotonic() - since <= self._time_limit:
            return True
        self._stuck = True
        log.error("inference.stuck", batch_size=len(batch), time_limit_s=self._time_limit)
        for job in batch:
            _settle(job.future, ModelError(
                f"inference did not finish within {self._time_limit:g} s"))
        return False

    def stop(self) -> None:
        with self._starting:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=30)

    def backend_problem(self) -> str | None:
        """Why a remote model (Triton) cannot score now, or None (also for a local one).
        Blocks for a network round trip: call it off the event loop."""
        scorer = self._scorer
        if isinstance(scorer, RemoteScorer):
            return scorer.problem()
        return None

    @property
    def queued(self) -> int:
        """Images waiting for the model (approximate: the queue is shared with its thread)."""
        return self._queue.qsize()

    async def score(self, image: U8Array) -> float:
        score, _ = await self.score_in_batch(image)
        return score

    async def score_in_batch(self, image: U8Array, tag: str = "") -> tuple[float, int]:
        """The image's score and the size of the batch it was scored in; ``tag`` names its
        study in the batch's log line."""
        result = await self.score_image(image, tag)
        return result.score, result.batch_size

    async def score_image(self, image: U8Array, tag: str = "") -> ImageResult:
        """The image's score, the size of its batch and, when the model hands it out, its
        embedding."""
        job = _Job(image, concurrent.futures.Future(), tag)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _run(self) -> None:
        if self._nice:
            # Before the model loads, so the intra-op threads torch starts from this thread
            # inherit it.
            lower_priority()
        try:
            scorer = self._factory()
        except BaseException as exc:  # report any load failure to start(), then end
            self._ready.set_exception(exc if isinstance(exc, PxsgateError)
                                      else ModelError(f"cannot load the model: {exc}"))
            return
        self._scorer = scorer
        self._ready.set_result(scorer.info)
        try:
            while True:
                batch, stop = self._gather()
                if batch:
                    try:
                        self._run_batch(scorer, batch)
                    except Exception as exc:  # never let the worker die with images waiting
                        for job in batch:
                            _settle(job.future, ModelError(f"inference failed: {exc}"))
                if stop:
                    return
        finally:
            if isinstance(scorer, RemoteScorer):
                scorer.close()

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
        self._current = (time.monotonic(), batch)
        studies = sorted({job.tag for job in batch if job.tag})
        try:
            self._failpoints.hit("during-inference")
            scores, embeddings = _score(scorer, np.stack([job.image for job in batch]))
        except Exception as exc:  # a model failure fails these images, not the worker
            if len(batch) > 1:
                # One poison image must not fail the studies it shares a batch with: each
                # image alone, so only the guilty ones fail.
                log.warning("inference.isolating", batch_size=len(batch), studies=studies,
                            error=str(exc))
                for job in batch:
                    self._run_batch(scorer, [job])
                return
            _settle(batch[0].future, ModelError(f"inference failed: {exc}"))
            self._metrics.inference_failures.inc()
            log.error("inference.failed", batch_size=1, studies=studies, error=str(exc))
            return
        finally:
            self._current = None
        seconds = time.perf_counter() - started
        self._metrics.batch_size.observe(len(batch))
        self._metrics.inference_seconds.observe(seconds)
        for job, score, embedding in zip(batch, scores, embeddings, strict=True):
            _settle(job.future, ImageResult(score, len(batch), embedding))
        log.info("inference.batch", batch_size=len(batch), studies=studies,
                 duration_ms=round(seconds * 1000, 1))


def _score(scorer: Scorer, batch: U8Array
           ) -> tuple[list[float], Sequence[F32Array | None]]:
    """Scores and, from a model that has them, embeddings (one row per image)."""
    if isinstance(scorer, EmbeddingScorer):
        scores, embeddings = scorer.score_and_embed(batch)
        if len(embeddings) != len(scores):
            raise ModelError(f"the model gave {len(embeddings)} embeddings for "
                             f"{len(scores)} scores")
        return scores, list(embeddings)
    return scorer.score_batch(batch), [None] * len(batch)


def _settle(future: concurrent.futures.Future[ImageResult],
            outcome: ImageResult | Exception) -> None:
    """Answer a job unless the time limit already answered it (then the late score is
    dropped: its study was told to retry)."""
    try:
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass


class ModelGate:
    """Shared use of the model by studies, or one study alone (a readers-writer lock; a
    study waiting for the model alone goes before new shared users)."""

    def __init__(self) -> None:
        self._turn = asyncio.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._turn:
            await self._turn.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._shared += 1
        try:
            yield
        finally:
            async with self._turn:
                self._shared -= 1
                self._turn.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._turn:
            self._waiting_alone += 1
            try:
                await self._turn.wait_for(lambda: not self._alone and not self._shared)
            finally:
                self._waiting_alone -= 1
                self._turn.notify_all()
            self._alone = True
        try:
            yield
        finally:
            async with self._turn:
                self._alone = False
                self._turn.notify_all()
