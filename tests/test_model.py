"""The scorer the service runs: batches, anchors files, the weights pin, precision, `score`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import ComputedRadiographyImageStorage

from pxsgate.anchors import anchor_images, load_anchor_file
from pxsgate.cli import main
from pxsgate.config import BatchConfig, ModelConfig
from pxsgate.errors import ModelError, PreprocessError
from pxsgate.infer import InferenceWorker, PxsScorer, batch_buckets, batch_tensor
from pxsgate.preprocess import (
    center_crop,
    preprocess_image_file,
    preprocess_pixels,
    resize_shorter,
    to_model_input,
)
from pxsgate.pxs import demo_embedding_net, file_sha256
from pxsgate.tools import synth

from .conftest import write_config


@pytest.fixture(scope="module")
def scorer() -> PxsScorer:
    return PxsScorer.load(ModelConfig(device="cpu", batch=BatchConfig(max_size=4)))


@pytest.fixture(scope="module")
def model_images() -> np.ndarray:
    """Six 8-bit model images: three synthetic patients' AP views and three anchors."""
    feed = synth.hospital_feed(seed=11, rows=400, cols=360, prefix="MDL")
    images = [preprocess_pixels(ds.pixel_array, str(ds.PhotometricInterpretation))
              for study in feed[:3] for ds in study.datasets[:1]]
    images += [img for _, img in anchor_images("demo")[:3]]
    return np.stack(images)


def config_file(tmp_path: Path, model: str = "") -> Path:
    """A service config on loopback; ``model`` is extra YAML lines for the model section."""
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data")
    if model:
        path.write_text(path.read_text() + "model:\n" + model, encoding="utf-8")
    return path


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


# --- the model input ----------------------------------------------------------------------------


def test_batch_tensor_is_totensor_of_each_image(model_images: np.ndarray) -> None:
    for channels_last in (False, True):
        x = batch_tensor(model_images, torch.device("cpu"), channels_last=channels_last)
        assert x.shape == (6, 3, 320, 320)
        assert x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        expected = np.stack([to_model_input(img) for img in model_images])
        np.testing.assert_array_equal(x.numpy(), expected)


def test_batch_buckets_are_powers_of_two_and_max_size() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)


# --- batching -----------------------------------------------------------------------------------


def test_batches_score_as_one_image_at_a_time(scorer: PxsScorer,
                                              model_images: np.ndarray) -> None:
    singles = [scorer.score_batch(img[None])[0] for img in model_images]
    together = scorer.score_batch(model_images)
    np.testing.assert_allclose(together, singles, rtol=1e-5)
    assert len(set(np.round(singles, 6))) == len(singles)  # six different images


def test_padding_to_compiled_batch_sizes_keeps_the_scores(scorer: PxsScorer,
                                                          model_images: np.ndarray) -> None:
    padded = PxsScorer(scorer._net, scorer.anchors, scorer.runtime, scorer.info,
                       buckets=(1, 2, 4, 8))
    np.testing.assert_allclose(padded.score_batch(model_images[:3]),
                               scorer.score_batch(model_images[:3]), rtol=1e-5)
    np.testing.assert_allclose(padded.score_batch(model_images),  # 6 -> 8
                               scorer.score_batch(model_images), rtol=1e-5)


def test_worker_forms_micro_batches_with_the_same_scores(scorer: PxsScorer,
                                                         model_images: np.ndarray) -> None:
    sizes: list[int] = []

    class Recording:
        info = scorer.info

        def score_batch(self, batch: np.ndarray) -> list[float]:
            sizes.append(len(batch))
            return scorer.score_batch(batch)

    worker = InferenceWorker(Recording, BatchConfig(max_size=4, max_delay_ms=500))
    worker.start()

    async def all_at_once() -> list[float]:
        return list(await asyncio.gather(*(worker.score(img) for img in model_images)))

    try:
        scores = asyncio.run(all_at_once())
    finally:
        worker.stop()
    assert sizes == [4, 2]  # max-size caps the first batch; the rest go after the delay
    singles = [scorer.score_batch(img[None])[0] for img in model_images]
    np.testing.assert_allclose(scores, singles, rtol=1e-5)


def test_a_failing_batch_fails_its_images_not_the_worker(scorer: PxsScorer,
                                                         model_images: np.ndarray) -> None:
    calls = 0

    class FailsOnce:
        info = scorer.info

        def score_batch(self, batch: np.ndarray) -> list[float]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return scorer.score_batch(batch)

    worker = InferenceWorker(FailsOnce, BatchConfig(max_size=4, max_delay_ms=0))
    worker.start()

    async def twice() -> float:
        with pytest.raises(ModelError, match="illegal memory access"):
            await worker.score(model_images[0])
        return await worker.score(model_images[0])

    try:
        assert asyncio.run(twice()) == pytest.approx(scorer.score_batch(model_images[:1])[0])
    finally:
        worker.stop()


# --- the weights pin ----------------------------------------------------------------------------


def test_pinned_sha256_loads_and_a_mismatch_refuses(tmp_path: Path) -> None:
    net, _ = demo_embedding_net()
    weights = tmp_path / "pxs.pth"
    torch.save({f"cnn0.{k}": v for k, v in net.state_dict().items()}, weights)
    sha = file_sha256(weights)
    config = ModelConfig(weights=str(weights), sha256=sha, device="cpu")
    assert PxsScorer.load(config).info.weights_sha256 == sha
    wrong = "0" * 64
    with pytest.raises(ModelError) as info:
        PxsScorer.load(replace(config, sha256=wrong))
    assert sha in str(info.value)
    assert wrong in str(info.value)


def test_serve_refuses_to_start_with_other_weights_than_pinned(tmp_path: Path) -> None:
    # The real command, as systemd runs it: it must exit (not hang) with the reason.
    config = config_file(tmp_path, f"  sha256: {'ab' * 32}\n")
    proc = subprocess.run([sys.executable, "-m", "pxsgate", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert "model.sha256 pins " + "ab" * 32 in proc.stderr
    assert "refusing to load" in proc.stderr


def test_check_config_rejects_a_malformed_pin(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, "  sha256: not-a-hash\n")
    assert main(["check-config", "--config", str(config)]) == 2
    assert "model.sha256" in capsys.readouterr().err


# --- anchors ------------------------------------------------------------------------------------


def test_image_file_anchors_are_read_as_the_published_code_reads_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(20, 230, size=(500, 410), dtype=np.uint8)
    png = save_png(tmp_path / "a.png", pixels)
    # Resize and crop only: no rescaling and no second equalisation of an 8-bit file.
    np.testing.assert_array_equal(preprocess_image_file(png),
                                  center_crop(resize_shorter(pixels)))
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as jpg:
        decoded = np.asarray(jpg)
    np.testing.assert_array_equal(preprocess_image_file(tmp_path / "a.jpg"),
                                  center_crop(resize_shorter(decoded)))
    grey_rgb = np.repeat(pixels[..., None], 3, axis=2)
    save_png(tmp_path / "rgb.png", grey_rgb)
    np.testing.assert_array_equal(preprocess_image_file(tmp_path / "rgb.png"),
                                  preprocess_image_file(png))


def test_colour_and_16_bit_image_files_are_refused(tmp_path: Path) -> None:
    colour = np.zeros((400, 400, 3), dtype=np.uint8)
    colour[..., 0] = 200
    with pytest.raises(PreprocessError, match="colour"):
        preprocess_image_file(save_png(tmp_path / "c.png", colour))
    Image.fromarray(np.full((400, 400), 4000, dtype=np.uint16)).save(tmp_path / "d.png")
    with pytest.raises(PreprocessError, match="8-bit"):
        preprocess_image_file(tmp_path / "d.png")
    (tmp_path / "e.png").write_bytes(b"not a png")
    with pytest.raises(PreprocessError, match="not a readable image"):
        preprocess_image_file(tmp_path / "e.png")


@pytest.fixture(scope="module")
def anchor_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normal radiographs as a site gives them: DICOM files, a PNG, and a stray README."""
    folder = tmp_path_factory.mktemp("anchors")
    for i, pixels in enumerate(synth.normal_chest_anchors(99, 3, rows=420, cols=380)):
        ds = synth.make_image_dataset(pixels, sop_class_uid=ComputedRadiographyImageStorage,
                                      modality="CR", study=synth.make_study(i + 1, prefix="ANC"),
                                      view_position="AP")
        # PACS exports name files by UID: the second one has no .dcm suffix.
        name = "1.2.840.99.1.320" if i == 1 else f"normal{i}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    save_png(folder / "normal9.png",
             preprocess_pixels(synth.normal_chest_anchors(98, 1, rows=420, cols=380)[0],
                               "MONOCHROME2"))
    (folder / "README.txt").write_text("normal CXRs from the 2019 validation set\n")
    return folder


def test_anchors_build_file_scores_as_the_folder(tmp_path: Path, anchor_folder: Path,
                                                 model_images: np.ndarray,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path)
    out = tmp_path / "anchors.pt"
    assert main(["anchors", "build", str(anchor_folder), "-o", str(out),
                 "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "4 anchors" in printed
    from_folder = PxsScorer.load(ModelConfig(anchors=str(anchor_folder), device="cpu"))
    from_file = PxsScorer.load(ModelConfig(anchors=str(out), device="cpu"))
    assert from_file.anchors.sources == ("1.2.840.99.1.320", "normal0.dcm", "normal2.dcm",
                                         "normal9.png")  # not README.txt
    assert from_file.info.anchors_sha256 == from_folder.info.anchors_sha256
    assert from_file.info.anchor_count == 4
    assert from_file.score_batch(model_images) == from_folder.score_batch(model_images)
    # The file keeps the anchor images too, as real radiographs to check a precision on.
    probe = from_file.anchors.probe_images()
    assert [name for name, _ in probe] == list(from_file.anchors.sources)
    np.testing.assert_array_equal(probe[3][1], preprocess_image_file(anchor_folder /
                                                                     "normal9.png"))


def test_anchors_file_of_other_weights_is_refused(tmp_path: Path, anchor_folder: Path) -> None:
    config = config_file(tmp_path)
    out = tmp_path / "anchors.pt"
    assert main(["anchors", "build", str(anchor_folder), "-o", str(out),
                 "--config", str(config)]) == 0
    other, _ = demo_embedding_net(seed=1)
    weights = tmp_path / "other.pth"
    torch.save(other.state_dict(), weights)
    with pytest.raises(ModelError, match="was built with weights sha256"):
        PxsScorer.load(ModelConfig(weights=str(weights), anchors=str(out), device="cpu"))
    with pytest.raises(ModelError, match="rebuild"):
        load_anchor_file(out, file_sha256(weights))
    with pytest.raises(ModelError, match="jpeg-roundtrip"):
        load_anchor_file(out, from_demo_weights_sha(), jpeg_roundtrip=True)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not an anchors file"):
        load_anchor_file(tmp_path / "junk.pt", file_sha256(weights))


def from_demo_weights_sha() -> str:
    return demo_embedding_net()[1]


def test_an_unreadable_anchor_is_named_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(b"")
    with pytest.raises(ModelError, match=r"good\.png"):
        anchor_images(str(tmp_path))
    with pytest.raises(ModelError, match="neither a folder"):
        anchor_images(str(tmp_path / "missing"))


# --- precision ----------------------------------------------------------------------------------


def test_reduced_precision_is_used_only_when_it_agrees_with_fp32(
    scorer: PxsScorer, model_images: np.ndarray
) -> None:
    loose = PxsScorer.load(ModelConfig(device="cpu", precision="bf16",
                                       precision_tolerance=0.5))
    assert loose.runtime.precision == "bf16"
    assert loose.info.block()["runtime"] == {"device": "cpu", "precision": "bf16"}
    np.testing.assert_allclose(loose.score_batch(model_images),
                               scorer.score_batch(model_images), rtol=0.5)
    strict = PxsScorer.load(ModelConfig(device="cpu", precision="bf16",
                                        precision_tolerance=1e-9))
    assert strict.runtime.precision == "fp32"
    assert strict.score_batch(model_images) == scorer.score_batch(model_images)
    assert scorer.runtime.precision == "fp32"  # auto on a CPU


# --- pxsgate score ------------------------------------------------------------------------------


def test_score_command_prints_scores_and_errors_per_file(
    tmp_path: Path, anchor_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 10)
    files = [anchor_folder / "normal0.dcm", broken, anchor_folder / "normal9.png"]
    assert main(["score", "--config", str(config), *map(str, files)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [entry["file"] for entry in out] == [str(f) for f in files]
    assert "error" in out[1]
    assert "value" not in out[1]
    model = out[0]["model"]
    assert model["weightsSha256"]
    assert model["anchorsSha256"]
    assert model["anchorCount"] == 8
    assert "not for clinical use" in model["description"]
    assert out[0]["value"] > 0
    assert out[2]["value"] > 0
