"""An in-process Gateway with a fast stand-in model, for tests about what happens after
scoring (store, views, API, outbox): real DICOM reception, real SQLite file, real exporters;
only the DenseNet is replaced, by a model whose score is the image's mean brightness and
which fails on request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pxsgate.config import load_config
from pxsgate.errors import ModelError
from pxsgate.log import configure_logging
from pxsgate.results import ModelInfo
from pxsgate.service.gateway import Gateway
from pxsgate.store import ResultFilter
from pxsgate.tools.scu import send_datasets

from .conftest import write_config


class FastModel:
    info = ModelInfo("Fast", "2", "tests", "mean brightness, for tests",
                     "2026-01-01T00:00:00+00:00", "0" * 64)

    def __init__(self) -> None:
        self.fail = False
        self.seen: list[bytes] = []  # every image scored, its model input's bytes

    def score_batch(self, batch: np.ndarray) -> list[float]:
        return self.score_and_embed(batch)[0]

    def score_and_embed(self, batch: np.ndarray) -> tuple[list[float], np.ndarray]:
        """The score, and as the embedding a small deterministic vector of image
        statistics (the mean of each 4x4 block of tiles, and quantiles), like a real
        embedding a different vector for a different image."""
        if self.fail:
            raise ModelError("inference failed: the stand-in model was told to fail")
        self.seen.extend(img.tobytes() for img in batch)
        return [float(img.mean()) / 255 for img in batch], np.stack(
            [stand_in_embedding(img) for img in batch])


def stand_in_embedding(image: np.ndarray) -> np.ndarray:
    """FastModel's embedding of one 8-bit model image: 16 tile means and 5 quantiles, /255
    (float32, 21 dimensions)."""
    rows, cols = image.shape
    tiles = image[: rows - rows % 4, : cols - cols % 4].reshape(
        4, rows // 4, 4, cols // 4).mean(axis=(1, 3)).ravel()
    quantiles = np.quantile(image, [0.1, 0.25, 0.5, 0.75, 0.9])
    return (np.concatenate([tiles, quantiles]) / 255).astype(np.float32)


@asynccontextmanager
async def gateway(tmp: Path, extra: str = "", http_port: int = 0,
                  http_token_file: Path | None = None, *, extra_scp: str = "",
                  http_extra: str = "", min_free_mb: float = 16, settle: float = 0.2,
                  preprocess: str = "", storage: str = ""
                  ) -> AsyncIterator[tuple[Gateway, FastModel]]:
    """``http_extra``: more keys of the http section (indented two spaces);
    ``preprocess``: more keys of the preprocess section (indented two spaces); ``storage``:
    more of the storage section (the ``storage`` fixture: SQLite, or PostgreSQL)."""
    path = write_config(tmp / "pxsgate.yaml", tmp / "data", settle=settle,
                        http_port=http_port,
                        http_token_file=http_token_file, extra=extra, extra_scp=extra_scp,
                        min_free_mb=min_free_mb, storage=storage)
    text = path.read_text().replace("\nhttp:\n", "\nhttp:\n" + http_extra, 1)
    text += "preprocess:\n  workers: 1\n" + preprocess + "model:\n  device: cpu\n"
    if "\njobs:" not in text:  # a failing model's retries, quickly
        text += "jobs:\n  retry-backoff-seconds: 0.05\n"
    path.write_text(text, encoding="utf-8")
    # structlog prints to the sys.stdout of the moment it was configured; under pytest that
    # is a capture file closed after its test, so each in-process gateway configures anew.
    configure_logging("json", "info")
    model = FastModel()
    gw = Gateway(load_config(path), scorer_factory=lambda: model)
    await gw.start()
    try:
        yield gw, model
    finally:
        await gw.stop()


async def send(gw: Gateway, datasets: list[Any], calling_ae: str = "TESTSCU") -> None:
    result = await asyncio.to_thread(send_datasets, "127.0.0.1", gw.port, datasets,
                                     calling_ae=calling_ae)
    assert result.ok, result


async def eventually(check: Callable[[], Awaitable[Any]], limit_s: float = 60,
                     what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def result_of(gw: Gateway, study_uid: str, limit_s: float = 60) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        docs = await gw.store.results(ResultFilter(study_uid=study_uid))
        return docs[0] if docs else None
    doc: dict[str, Any] = await eventually(find, limit_s, f"the result of {study_uid[-8:]}")
    return doc
