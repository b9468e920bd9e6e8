"""The gateway's PXS score equals a plain computation of the published algorithm.

The plain computation here shares no code with the gateway's fast path except the network
definition: the published preprocessing is written out again (QTIM-Lab/PXS-score,
PXS_preprocessing.py ``dcm2img`` + torchvision's Resize(336)/CenterCrop(320)/ToTensor), the
anchors are embedded again for every image, and each distance takes two forward passes of
the Siamese network (``reference_pxs_score``), as the published code does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom import Dataset

from pxsgate.anchors import DEMO_ANCHOR_COUNT, DEMO_ANCHOR_SEED
from pxsgate.cli import main
from pxsgate.pxs import PxsSiamese, demo_embedding_net, reference_pxs_score
from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets

from .conftest import SAMPLES, Service, write_config


def equalize_like_opencv(img: np.ndarray) -> np.ndarray:
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return img.copy()
    scale = np.float32(255.0) / np.float32(total - hist[first])
    lut = np.zeros(256, np.uint8)
    running = 0
    for level in range(first + 1, 256):
        running += int(hist[level])
        lut[level] = min(255, int(np.rint(np.float32(running) * scale)))
    return lut[img]


def published_input(pixels: np.ndarray, photometric: str, bits_stored: int, high_bit: int
                    ) -> torch.Tensor:
    x = np.bitwise_and(pixels.astype(np.int64),
                       2 ** (high_bit + 1) - 2 ** (high_bit - bits_stored + 1))
    x = x - x.min()
    x = (x / x.max() * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        x = 255 - x
    x = equalize_like_opencv(x)
    img = Image.fromarray(x)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(336 * long / short)
    img = img.resize((336, new_long) if w <= h else (new_long, 336), Image.Resampling.BILINEAR)
    w, h = img.size
    top, left = round((h - 320) / 2.0), round((w - 320) / 2.0)
    arr = np.asarray(img.crop((left, top, left + 320, top + 320)), dtype=np.float32) / 255.0
    return torch.from_numpy(np.repeat(arr[None], 3, axis=0))


def published_file_input(path: Path) -> torch.Tensor:
    """PXS_test.py ``img_processing(Image.open(path))`` for an 8-bit greyscale file."""
    with Image.open(path) as img:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(336 * long / short)
        img = img.resize((336, new_long) if w <= h else (new_long, 336),
                         Image.Resampling.BILINEAR)
        w, h = img.size
        top, left = round((h - 320) / 2.0), round((w - 320) / 2.0)
        arr = np.asarray(img.crop((left, top, left + 320, top + 320)), dtype=np.float32) / 255.0
    return torch.from_numpy(np.repeat(arr[None], 3, axis=0))


def demo_reference() -> tuple[PxsSiamese, torch.Tensor]:
    net, _ = demo_embedding_net()
    anchor_pixels = synth.normal_chest_anchors(DEMO_ANCHOR_SEED, DEMO_ANCHOR_COUNT)
    anchors = torch.stack([published_input(a, "MONOCHROME2", 16, 15) for a in anchor_pixels])
    return PxsSiamese(net), anchors


def dataset_input(ds: Dataset) -> torch.Tensor:
    return published_input(ds.pixel_array, str(ds.PhotometricInterpretation),
                           int(ds.BitsStored), int(ds.HighBit))


def test_gateway_score_matches_the_uncached_published_computation(service: Service) -> None:
    feed = synth.hospital_feed(seed=303, rows=700, cols=600, prefix="REF")
    scored = [s for s in feed if s.expected == "scored"]
    for study in scored:
        assert send_datasets("127.0.0.1", service.port, list(study.datasets)).ok
    docs = service.wait_for([str(s.datasets[0].StudyInstanceUID) for s in scored])

    siamese, anchors = demo_reference()
    compared = 0
    for study in scored:
        doc = docs[str(study.datasets[0].StudyInstanceUID)]
        by_sop = {str(ds.SOPInstanceUID): ds for ds in study.datasets}
        for result in doc["results"]:
            sop = result["derivedFrom"][0]["refSopInstanceUid"][0]
            expected = reference_pxs_score(siamese, dataset_input(by_sop[sop]), anchors)
            assert abs(float(result["value"]) - expected) < 1e-4, (study.key, expected)
            compared += 1
    assert compared >= 3


def test_score_command_matches_the_published_computation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Real vendor files (JPEG 2000 MONOCHROME1 15-bit CR, JPEG lossless, JPEG-LS) and an
    # 8-bit PNG as the published test set was stored.
    files = [SAMPLES / "RG1_J2KI.dcm", SAMPLES / "RG2_JPLL.dcm", SAMPLES / "RG1_JLSN.dcm"]
    png = tmp_path / "test.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (700, 560), np.uint8)).save(png)
    config = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data")
    assert main(["score", "--config", str(config), *map(str, files), str(png)]) == 0
    scored = json.loads(capsys.readouterr().out)

    siamese, anchors = demo_reference()
    inputs = [dataset_input(pydicom.dcmread(f)) for f in files] + [published_file_input(png)]
    for entry, x in zip(scored, inputs, strict=True):
        expected = reference_pxs_score(siamese, x, anchors)
        assert abs(entry["value"] - expected) < 1e-4, (entry["file"], expected)
