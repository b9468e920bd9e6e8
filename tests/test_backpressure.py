"""Decoded images are bounded: a large study waits as files, not as arrays in memory.

An in-process Gateway with a deliberately slow model (0.4 s per image, far slower than
decoding a 256x256 image): with one decode
process and batches of one, the pipeline may hold 2 x 1 + 1 = 3 decoded images, so at
most 2 can ever wait in the model's queue, however many images the study has.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from pxsgate.config import load_config
from pxsgate.log import configure_logging
from pxsgate.results import ModelInfo
from pxsgate.service.gateway import Gateway
from pxsgate.store import ResultFilter
from pxsgate.tools.scu import send_datasets

from .conftest import write_config
from .test_lifecycle import ap_study


async def test_decoded_images_wait_in_a_bounded_queue(tmp_path: Path) -> None:
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", settle=0.2)
    path.write_text(path.read_text() + "preprocess:\n  workers: 1\nmodel:\n  device: cpu\n"
                    "  batch:\n    max-size: 1\n    max-delay-ms: 0\n", encoding="utf-8")
    config = load_config(path)
    waiting: list[int] = []
    gateway: Gateway | None = None

    class SlowModel:
        info = ModelInfo("Slow", "1", "tests", "a slow model", "2026-01-01T00:00:00+00:00",
                         "0" * 64)

        def score_batch(self, batch: np.ndarray) -> list[float]:
            assert gateway is not None
            waiting.append(gateway.worker.queued)
            time.sleep(0.4)
            return [float(img.mean()) / 255 for img in batch]

    configure_logging("json", "info")  # to this test's stdout (see tests/inprocess.py)
    gateway = Gateway(config, scorer_factory=SlowModel)
    await gateway.start()
    try:
        study = ap_study(41, "BOUND", images=8)
        result = await asyncio.to_thread(send_datasets, "127.0.0.1", gateway.port, study)
        assert result.ok
        uid = str(study[0].StudyInstanceUID)
        for _ in range(300):
            docs = await gateway.store.results(ResultFilter(study_uid=uid))
            if docs:
                break
            await asyncio.sleep(0.1)
        assert docs, "no result"
        assert docs[0]["status"] == "SUCCEEDED"
        assert len(docs[0]["results"]) == 8
    finally:
        await gateway.stop()
    assert len(waiting) == 8
    assert max(waiting) <= 2, waiting  # unbounded, all 8 decode at once and 7 would wait
