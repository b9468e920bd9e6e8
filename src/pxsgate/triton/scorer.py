"""The PXS score with the embedding network on a Triton Inference Server (model.backend
triton): another Scorer for the same InferenceWorker.

Each image goes to Triton as a request of its own, uint8 [1, 320, 320] (100 KB), as soon as
the worker has it; Triton's dynamic batcher gathers them into forward passes. At most
``model.batch.max-size`` requests are in flight (the worker hands over at most that many at
a time and waits for their answers). The anchors are embedded through Triton at start-up
(or read from an anchors file made with the same weights) and kept here; the median
distance and the change are computed here, in float64, as with the local backend.

Start-up refuses a served model that is not ready, whose input or output is not what
``pxsgate model export`` writes (uint8 [-1, 320, 320] or [-1, 1, 320, 320] in, float32
[-1, 1000] out), or whose config.pbtxt names other weights than ``model.weights``. Triton
unreachable or failing later is a ModelError: the images fail, their studies retry
(jobs.max-attempts, jobs.retry-backoff-seconds), and /healthz reports the backend down.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import structlog
import torch
from torch import Tensor

from pxsgate import anchors as anchor_pool
from pxsgate import pxs
from pxsgate.config import ModelConfig, TritonConfig
from pxsgate.document import ModelInfo
from pxsgate.errors import ModelError
from pxsgate.infer import DEMO_NOTE, F32Array, load_weights
from pxsgate.preprocess import CROP_TO, U8Array
from pxsgate.pxs import EMBEDDING_DIM
from pxsgate.triton.export import WEIGHTS_PARAMETER

log = structlog.get_logger("pxsgate.triton")

PROBE_TIMEOUT_S = 2.0  # /healthz's question to Triton
EXPORT_HINT = "write the entry with: pxsgate model export --out DIR"
_MAX_MESSAGE = 2**31 - 1  # tritonclient's own default message limits, kept
# gRPC waits before reconnecting to a server it lost, up to 120 s by default: a Triton
# back from a restart is found again within 2 s.
GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", _MAX_MESSAGE),
                     ("grpc.max_receive_message_length", _MAX_MESSAGE),
                     ("grpc.initial_reconnect_backoff_ms", 500),
                     ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class Transport(Protocol):
    """What the scorer needs of a Triton client (tritonclient's grpc or http)."""

    def ready(self) -> None:
        """Raise ModelError unless the server is live and the model ready."""
        ...

    def metadata(self) -> dict[str, Any]:
        """The model's metadata (KServe v2: name, inputs, outputs with datatype, shape)."""
        ...

    def parameters(self) -> dict[str, str]:
        """The string parameters of the model's config.pbtxt."""
        ...

    def infer_each(self, images: Sequence[U8Array], input_name: str, input_shape: list[int],
                   output_name: str) -> list[F32Array]:
        """One request per image, all in flight at once; each one's output rows."""
        ...

    def close(self) -> None: ...


def _problem(exc: BaseException) -> str:
    """tritonclient's error in one short line (its messages carry no image data)."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Client:
    """tritonclient's grpc or http client, their common ground. Not thread-safe (the http
    client runs gevent greenlets on the calling thread): one per thread."""

    def __init__(self, config: TritonConfig, concurrency: int,
                 timeout: float | None = None) -> None:
        self._config = config
        self._timeout = config.timeout_seconds if timeout is None else timeout
        self._where = f"Triton at {config.protocol}://{config.url}"
        self._grpc = config.protocol == "grpc"
        try:
            if self._grpc:
                import tritonclient.grpc as grpcclient

                self._module: Any = grpcclient
                self._client: Any = grpcclient.InferenceServerClient(
                    config.url, channel_args=GRPC_CHANNEL_ARGS)
            else:
                import tritonclient.http as httpclient

                self._module = httpclient
                self._client = httpclient.InferenceServerClient(
                    config.url, concurrency=concurrency, connection_timeout=self._timeout,
                    network_timeout=self._timeout)
        except ImportError:
            raise ModelError("model.backend triton needs tritonclient: "
                             "pip install 'pxsgate[triton]'") from None
        except Exception as exc:  # a malformed url, among others
            raise ModelError(f"{self._where}: {_problem(exc)}") from exc

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._grpc:
            kwargs["client_timeout"] = self._timeout
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # connection refused, deadline, server errors
            raise ModelError(f"{self._where} ({what}): {_problem(exc)}") from exc

    def ready(self) -> None:
        name, version = self._config.model_name, self._config.model_version
        if not self._call("is the server live", self._client.is_server_live):
            raise ModelError(f"{self._where} is not live")
        if not self._call("is the model ready", self._client.is_model_ready, name, version):
            label = f"{name!r}" + (f" version {version}" if version else "")
            raise ModelError(f"{self._where}: the model {label} is not ready "
                             "(not in its model repository, or failed to load)")

    def metadata(self) -> dict[str, Any]:
        kwargs = {"as_json": True} if self._grpc else {}
        data: dict[str, Any] = self._call(
            "model metadata", self._client.get_model_metadata, self._config.model_name,
            self._config.model_version, **kwargs)
        return data

    def parameters(self) -> dict[str, str]:
        kwargs = {"as_json": True} if self._grpc else {}
        data: dict[str, Any] = self._call(
            "model config", self._client.get_model_config, self._config.model_name,
            self._config.model_version, **kwargs)
        config = data.get("config", data) if self._grpc else data
        params = config.get("parameters") or {}
        return {str(k): str((v or {}).get("string_value", "")) for k, v in params.items()}

    def infer_each(self, images: Sequence[U8Array], input_name: str, input_shape: list[int],
                   output_name: str) -> list[F32Array]:
        requests = []
        for image in images:
            tensor = self._module.InferInput(input_name, input_shape, "UINT8")
            tensor.set_data_from_numpy(np.ascontiguousarray(image).reshape(input_shape))
            requests.append([tensor])
        outputs = [self._module.InferRequestedOutput(output_name)]
        name, version = self._config.model_name, self._config.model_version
        try:
            if self._grpc:
                futures: list[concurrent.futures.Future[Any]] = []
                for inputs in requests:
                    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                    futures.append(future)
                    self._client.async_infer(name, inputs, functools.partial(_answer, future),
                                             model_version=version, outputs=outputs,
                                             client_timeout=self._timeout)
                # Each request has its own deadline; this wait only guards against a lost
                # callback.
                results = [f.result(timeout=self._timeout + 5) for f in futures]
            else:
                pending = [self._client.async_infer(name, inputs, model_version=version,
                                                    outputs=outputs) for inputs in requests]
                results = [p.get_result(block=True, timeout=self._timeout) for p in pending]
            arrays = [np.asarray(r.as_numpy(output_name), dtype=np.float32) for r in results]
        except Exception as exc:  # connection refused, deadline, server errors
            raise ModelError(f"{self._where} (inference): {_problem(exc)}") from exc
        return arrays

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:  # closing a dead connection: nothing to do about it
            log.debug("triton.close_failed", error=_problem(exc))


def _answer(future: concurrent.futures.Future[Any], result: Any, error: Any) -> None:
    """tritonclient.grpc's callback, on its thread."""
    if error is not None:
        future.set_exception(error if isinstance(error, BaseException)
                             else ModelError(str(error)))
    else:
        future.set_result(result)


def _connect(config: TritonConfig, concurrency: int, timeout: float | None = None
             ) -> Transport:
    return _Client(config, concurrency, timeout)


class TritonScorer:
    """The PXS score against cached anchors, the embeddings from Triton."""

    def __init__(self, transport: Transport, config: ModelConfig, anchors: anchor_pool.AnchorSet,
                 info: ModelInfo, input_shape: list[int], input_name: str, output_name: str,
                 connect: Callable[[TritonConfig, int, float | None], Transport] = _connect
                 ) -> None:
        self._transport = transport
        self._config = config
        self.anchors = anchors
        self.info = info
        self._input_shape = input_shape  # one image: [1, 320, 320] or [1, 1, 320, 320]
        self._input_name = input_name
        self._output_name = output_name
        self._connect = connect
        self._in_flight = config.batch.max_size

    @classmethod
    def load(cls, config: ModelConfig, *, jpeg_roundtrip: bool = False,
             connect: Callable[[TritonConfig, int, float | None], Transport] = _connect
             ) -> TritonScorer:
        """Connect, check the served model, embed (or load) the anchors."""
        triton = config.triton
        where = f"Triton at {triton.protocol}://{triton.url}"
        # The weights are read here as well: their sha256 names every result, and the served
        # model must be the same weights (config.pbtxt says which).
        _, sha, created = load_weights(config, torch.device("cpu"))
        transport = connect(triton, config.batch.max_size, None)
        try:
            transport.ready()
            input_name, input_shape, output_name = check_signature(
                transport.metadata(), f"{where}: the model {triton.model_name!r}")
            served = transport.parameters().get(WEIGHTS_PARAMETER)
            if not served:
                raise ModelError(f"{where}: the model {triton.model_name!r} does not say which "
                                 f"weights it holds (no {WEIGHTS_PARAMETER} parameter in its "
                                 f"config.pbtxt); {EXPORT_HINT}")
            if served != sha:
                raise ModelError(f"{where}: the model {triton.model_name!r} holds weights "
                                 f"sha256 {served[:16]}..., but model.weights is "
                                 f"{sha[:16]}...; export these weights (pxsgate model export) "
                                 "or point model.weights at the served ones")
            info = ModelInfo(name=config.name, version=config.version, author=config.author,
                             description=config.description, created_at=created,
                             weights_sha256=sha, device=f"triton:{triton.model_name}",
                             precision="fp32")
            scorer = cls(transport, config, anchor_pool.AnchorSet(torch.empty(0, 1000), (), sha),
                         info, input_shape, input_name, output_name, connect)
            pool, _ = anchor_pool.load_or_embed(config.anchors, scorer.embed, sha,
                                                chunk=config.batch.max_size,
                                                jpeg_roundtrip=jpeg_roundtrip)
        except BaseException:
            transport.close()
            raise
        scorer.anchors = pool
        demo = config.weights == "demo" or config.anchors == "demo"
        description = f"{config.description} ({DEMO_NOTE})" if demo else config.description
        scorer.info = replace(info, description=description, anchors_sha256=pool.sha256,
                              anchor_count=len(pool))
        log.info("model.loaded", backend="triton", protocol=triton.protocol,
                 model_name=triton.model_name, weights_sha256=sha[:16], anchors=len(pool),
                 anchors_sha256=pool.sha256[:16])
        return scorer

    def embed(self, images: U8Array) -> Tensor:
        """Embeddings [N, 1000] (float32, CPU) of 8-bit model images [N, 320, 320], at most
        model.batch.max-size requests in flight."""
        rows: list[F32Array] = []
        for i in range(0, len(images), self._in_flight):
            chunk = list(images[i : i + self._in_flight])
            for out in self._transport.infer_each(chunk, self._input_name, self._input_shape,
                                                  self._output_name):
                if out.shape != (1, EMBEDDING_DIM):
                    raise ModelError(f"Triton answered an embedding of shape {out.shape}, "
                                     f"not (1, {EMBEDDING_DIM})")
                rows.append(out)
        if not rows:
            return torch.empty(0, EMBEDDING_DIM)
        return torch.from_numpy(np.concatenate(rows))

    def score_batch(self, batch: U8Array) -> list[float]:
        return self.score_and_embed(batch)[0]

    def score_and_embed(self, batch: U8Array) -> tuple[list[float], F32Array]:
        embeddings = self.embed(batch)
        scores = pxs.pxs_scores(embeddings, self.anchors.embeddings)
        return [float(s) for s in scores], embeddings.numpy()

    def problem(self) -> str | None:
        """Why the backend cannot score now (Triton down, the model unloaded), or None.
        Asked from other threads (/healthz): its own short-lived client."""
        try:
            transport = self._connect(self._config.triton, 1, PROBE_TIMEOUT_S)
        except ModelError as exc:
            return str(exc)
        try:
            transport.ready()
            return None
        except ModelError as exc:
            return str(exc)
        finally:
            transport.close()

    def close(self) -> None:
        self._transport.close()


def check_signature(metadata: dict[str, Any], what: str) -> tuple[str, list[int], str]:
    """(input name, one image's request shape, output name) of a served model that takes
    uint8 [-1, 320, 320] or [-1, 1, 320, 320] and gives float32 [-1, 1000]; else a
    ModelError saying what it takes and gives instead."""
    inputs = metadata.get("inputs") or []
    outputs = metadata.get("outputs") or []

    def describe(tensors: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t.get('name')} {t.get('datatype')} "
                         f"{[int(d) for d in t.get('shape', [])]}" for t in tensors) or "nothing"

    image_shapes = ([-1, CROP_TO, CROP_TO], [-1, 1, CROP_TO, CROP_TO])
    good_in = (len(inputs) == 1 and inputs[0].get("datatype") == "UINT8"
               and [int(d) for d in inputs[0].get("shape", [])] in image_shapes)
    good_out = (len(outputs) == 1 and outputs[0].get("datatype") == "FP32"
                and [int(d) for d in outputs[0].get("shape", [])] == [-1, EMBEDDING_DIM])
    if not (good_in and good_out):
        raise ModelError(
            f"{what} takes {describe(inputs)} and gives {describe(outputs)}; pxsgate sends "
            f"UINT8 [-1, {CROP_TO}, {CROP_TO}] (or [-1, 1, {CROP_TO}, {CROP_TO}]) images and "
            f"needs FP32 [-1, {EMBEDDING_DIM}] embeddings (the twin DenseNet-121 with the "
            f"ToTensor step inside); {EXPORT_HINT}")
    shape = [1, *[int(d) for d in inputs[0]["shape"][1:]]]
    return str(inputs[0]["name"]), shape, str(outputs[0]["name"])
