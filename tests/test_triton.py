"""model.backend triton against a real Triton Inference Server (tests/tritonserver.py: the
tritonserver of PyPI's nvidia-pytriton wheel, CPU, on loopback ports), serving what
``pxsgate model export`` wrote: scores equal the local backend's, start-up refuses a model
that is not pxsgate's, and a Triton killed mid-stream makes studies retry (and /healthz
say so) until it is back. The ONNX export is checked with onnxruntime (this tritonserver
has only the Python backend)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from pxsgate.anchors import AnchorSet, anchor_images
from pxsgate.cli import main
from pxsgate.config import ModelConfig, load_config
from pxsgate.document import ModelInfo
from pxsgate.errors import ModelError
from pxsgate.infer import PxsScorer, Runtime, load_weights
from pxsgate.log import configure_logging
from pxsgate.preprocess import preprocess_pixels
from pxsgate.pxs import demo_embedding_net, pxs_scores
from pxsgate.service.gateway import Gateway
from pxsgate.tools import synth
from pxsgate.triton.export import model_config
from pxsgate.triton.scorer import check_signature

from . import tritonserver
from .conftest import free_port, write_config
from .inprocess import eventually, result_of, send
from .test_faults import state_of
from .test_lifecycle import ap_study

RELATIVE = 1e-5  # fp32 on both sides: the bound for scores through Triton
STUB_MODEL = """class TritonPythonModel:
    def execute(self, requests):
        raise RuntimeError("not pxsgate's model")
"""


def served_entry(source: Path, repository: Path, name: str, *, input_type: str | None = None,
                 input_dims: str | None = None, weights: str | None = None) -> None:
    """A copy of the exported entry under another name, its config.pbtxt altered."""
    entry = repository / name
    shutil.copytree(source, entry)
    text = (entry / "config.pbtxt").read_text()
    text = text.replace(f'name: "{source.name}"', f'name: "{name}"')
    if input_type is not None:
        text = text.replace("TYPE_UINT8", input_type)
    if input_dims is not None:
        text = text.replace("dims: [ 320, 320 ]", f"dims: {input_dims}")
    if weights is not None:
        start = text.index('string_value: "') + len('string_value: "')
        text = text[:start] + weights + text[start + 64:]
    (entry / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tritonserver.Triton]:
    """tritonserver with the exported demo model (python format), and two entries that are
    not pxsgate's: wrong input shapes, other weights."""
    tmp = tmp_path_factory.mktemp("triton")
    repository = tmp / "repository"
    config = write_config(tmp / "export.yaml", tmp / "data",
                          extra="model:\n  batch:\n    max-size: 4\n")
    assert main(["model", "export", "--config", str(config), "--out", str(repository),
                 "--format", "python"]) == 0
    exported = repository / "pxs_embedding"
    served_entry(exported, tmp, "wrong_shapes", input_type="TYPE_FP32",
                 input_dims="[ 3, 320, 320 ]")
    served_entry(exported, tmp, "other_weights", weights="ab" * 32)
    for name in ("wrong_shapes", "other_weights"):
        # Never asked to infer: a model.py without torch loads in a fraction of the time.
        (tmp / name / "1" / "model.pt").unlink()
        (tmp / name / "1" / "model.py").write_text(STUB_MODEL)
        shutil.move(tmp / name, repository / name)
    server = tritonserver.start(repository, tmp / "server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 8-bit model images as PNG files (synthetic patients' AP chests)."""
    folder = tmp_path_factory.mktemp("pngs")
    feed = synth.hospital_feed(seed=23, rows=400, cols=360, prefix="TRT")
    paths = []
    for i, study in enumerate(feed[:2]):
        ds = study.datasets[0]
        image = preprocess_pixels(ds.pixel_array, str(ds.PhotometricInterpretation))
        paths.append(folder / f"ap{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def anchors_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the demo anchors as PNG files: a small pool keeps the CPU runs short."""
    folder = tmp_path_factory.mktemp("anchors")
    for name, image in anchor_images("demo")[:3]:
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


def score_config(tmp: Path, anchors: Path, model: str = "") -> Path:
    return write_config(tmp / "pxsgate.yaml", tmp / "data", extra=(
        f"model:\n  device: cpu\n  anchors: {anchors}\n  batch:\n    max-size: 4\n" + model))


def triton_model(server: tritonserver.Triton, protocol: str = "grpc",
                 name: str = "pxs_embedding") -> str:
    return (f"  backend: triton\n  triton:\n    url: {server.url(protocol)}\n"
            f"    protocol: {protocol}\n    model-name: {name}\n    timeout-seconds: 20\n")


def score(config: Path, files: list[Path], capsys: pytest.CaptureFixture[str]
          ) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["score", "--config", str(config), *map(str, files)])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else [], out.err


@pytest.fixture(scope="module")
def local_scores(tmp_path_factory: pytest.TempPathFactory, radiographs: list[Path],
                 anchors_dir: Path) -> list[dict[str, Any]]:
    """`pxsgate score` with the local backend (torch in process)."""
    import contextlib
    import io

    config = score_config(tmp_path_factory.mktemp("local"), anchors_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["score", "--config", str(config), *map(str, radiographs)]) == 0
    docs: list[dict[str, Any]] = json.loads(out.getvalue())
    return docs


# --- the export ---------------------------------------------------------------------------------


def test_export_serves_uint8_images_and_float_embeddings(triton: tritonserver.Triton) -> None:
    """What Triton reads from the exported entry: one uint8 image tensor in (the batch
    dimension is the dynamic batcher's), 1000 floats out, the weights' sha256 recorded."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url)
    meta = client.get_model_metadata("pxs_embedding")
    assert [(t["datatype"], t["shape"]) for t in meta["inputs"]] == [("UINT8", [-1, 320, 320])]
    assert [(t["datatype"], t["shape"]) for t in meta["outputs"]] == [("FP32", [-1, 1000])]
    config = client.get_model_config("pxs_embedding")
    assert config["max_batch_size"] == 4
    assert "dynamic_batching" in config
    sha = demo_embedding_net()[1]
    assert config["parameters"]["pxsgate_weights_sha256"]["string_value"] == sha
    client.close()


def test_onnx_and_torchscript_exports_give_the_local_scores(
        triton: tritonserver.Triton, tmp_path: Path) -> None:
    """The onnxruntime and pytorch entries (for NGC's Triton) compute from the same uint8
    images the embeddings, and so the scores, of the local backend (scored here against
    a pool of two anchors embedded locally). The TorchScript file is the one the served
    python entry runs (the same trace as the torchscript format's)."""
    config = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data")
    assert main(["model", "export", "--config", str(config), "--out", str(tmp_path),
                 "--format", "onnx"]) == 0
    onnx_config = (tmp_path / "pxs_embedding" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in onnx_config
    assert "dynamic_batching" in onnx_config
    assert 'platform: "pytorch_libtorch"' in model_config("m", "torchscript", "0" * 64, 4, 5)

    net, sha, created = load_weights(ModelConfig(), torch.device("cpu"))
    local = PxsScorer(net.to(memory_format=torch.channels_last),
                      AnchorSet(torch.empty(0, 1000), (), sha),
                      Runtime(torch.device("cpu"), channels_last=True),
                      ModelInfo("PxsScore", "0.1", "", "", created, sha))
    demo = [img for _, img in anchor_images("demo")[:4]]
    anchors = local.embed(np.stack(demo[:2]))
    images = np.stack([*demo[2:], np.full((320, 320), 7, np.uint8)])
    expected = pxs_scores(local.embed(images), anchors).tolist()
    session = onnxruntime.InferenceSession(
        str(tmp_path / "pxs_embedding" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"])
    onnx_embeddings = torch.from_numpy(session.run(None, {"IMAGES__0": images})[0])
    scripted = torch.jit.load(str(triton.repository / "pxs_embedding" / "1" / "model.pt"))
    with torch.inference_mode():
        script_embeddings = scripted(torch.from_numpy(images))
    for embeddings in (onnx_embeddings, script_embeddings):
        got = pxs_scores(embeddings, anchors).tolist()
        np.testing.assert_allclose(got, expected, rtol=RELATIVE)
    assert len(set(expected)) == len(expected), "different images, different scores"


# --- scores through Triton ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_scores_through_triton_equal_the_local_backend(
        triton: tritonserver.Triton, tmp_path: Path, radiographs: list[Path],
        anchors_dir: Path, local_scores: list[dict[str, Any]], protocol: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = score_config(tmp_path, anchors_dir, triton_model(triton, protocol))
    code, docs, err = score(config, radiographs, capsys)
    assert code == 0, err
    assert [d["file"] for d in docs] == [d["file"] for d in local_scores]
    np.testing.assert_allclose([d["value"] for d in docs],
                               [d["value"] for d in local_scores], rtol=RELATIVE)
    assert len({d["value"] for d in docs}) == len(docs), "different images, different scores"
    model, local_model = docs[0]["model"], local_scores[0]["model"]
    assert model["weightsSha256"] == local_model["weightsSha256"]
    assert model["anchorCount"] == local_model["anchorCount"] == 3
    assert model["runtime"]["device"] == "triton:pxs_embedding"


def test_startup_refuses_a_model_with_other_shapes(
        triton: tritonserver.Triton, tmp_path: Path, radiographs: list[Path],
        anchors_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = score_config(tmp_path, anchors_dir, triton_model(triton, "grpc", "wrong_shapes"))
    code, docs, err = score(config, radiographs[:1], capsys)
    assert (code, docs) == (1, [])
    assert "'wrong_shapes' takes IMAGES__0 FP32 [-1, 3, 320, 320]" in err
    assert "pxsgate sends UINT8 [-1, 320, 320]" in err
    assert "pxsgate model export" in err


def test_startup_refuses_a_model_with_other_weights(
        triton: tritonserver.Triton, tmp_path: Path, radiographs: list[Path],
        anchors_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = score_config(tmp_path, anchors_dir, triton_model(triton, "http", "other_weights"))
    code, _, err = score(config, radiographs[:1], capsys)
    assert code == 1
    assert "holds weights sha256 abababababababab..." in err


def test_startup_says_when_triton_is_unreachable(
        tmp_path: Path, radiographs: list[Path], anchors_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    config = score_config(tmp_path, anchors_dir, "  backend: triton\n  triton:\n"
                          f"    url: 127.0.0.1:{port}\n    timeout-seconds: 2\n")
    code, _, err = score(config, radiographs[:1], capsys)
    assert code == 1
    assert f"Triton at grpc://127.0.0.1:{port}" in err


def test_the_signature_check_takes_both_image_layouts_and_names_a_mismatch() -> None:
    """What a served model must take and give, as Triton's metadata says it (gRPC's JSON
    gives the dimensions as strings)."""
    out = [{"name": "E", "datatype": "FP32", "shape": ["-1", "1000"]}]
    for dims, request in (([-1, 320, 320], [1, 320, 320]),
                          (["-1", "1", "320", "320"], [1, 1, 320, 320])):
        meta = {"inputs": [{"name": "I", "datatype": "UINT8", "shape": dims}], "outputs": out}
        assert check_signature(meta, "m") == ("I", request, "E")
    for inputs, outputs in (
            ([{"name": "I", "datatype": "UINT8", "shape": [320, 320]}], out),  # no batching
            ([{"name": "I", "datatype": "UINT8", "shape": [-1, 224, 224]}], out),
            ([{"name": "I", "datatype": "UINT8", "shape": [-1, 320, 320]}],
             [{"name": "E", "datatype": "FP16", "shape": [-1, 1000]}])):
        with pytest.raises(ModelError, match=r"m takes I UINT8 .* and gives E FP"):
            check_signature({"inputs": inputs, "outputs": outputs}, "m")


# --- Triton going away --------------------------------------------------------------------------


async def test_triton_killed_mid_stream_studies_retry_and_finish_when_it_is_back(
        triton: tritonserver.Triton, tmp_path: Path, anchors_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A study scored; Triton killed (SIGKILL, server and stubs); /healthz 503 naming it
    (and `pxsgate status`);
    the next studies fail their tries and retry; Triton restarted on the same ports; they
    finish, and /healthz is 200 again."""
    http_port = free_port()
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", settle=0.2,
                        http_port=http_port, extra=(
                            "preprocess:\n  workers: 1\n"
                            "jobs:\n  max-attempts: 10\n  retry-backoff-seconds: 0.1\n"
                            f"model:\n  anchors: {anchors_dir}\n  batch:\n    max-size: 4\n"
                            + triton_model(triton)))
    configure_logging("json", "info")
    gw = Gateway(load_config(path))
    await gw.start()

    async def healthz() -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{http_port}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()

    try:
        first = ap_study(601, "TRTA")
        await send(gw, first)
        assert (await result_of(gw, str(first[0].StudyInstanceUID)))["status"] == "SUCCEEDED"
        status, body = await healthz()
        assert (status, body["model"]["ok"], body["model"]["backend"]) == (200, True, "triton")

        await asyncio.to_thread(triton.kill)
        status, body = await healthz()
        assert (status, body["ok"], body["model"]["ok"]) == (503, False, False)
        assert f"Triton at grpc://{triton.grpc_url}" in body["model"]["error"]
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["status", "--config", str(path)]) == 1
        assert f"failing: model (Triton at grpc://{triton.grpc_url}" in capsys.readouterr().out

        later = [ap_study(602, "TRTB"), ap_study(603, "TRTC")]
        for study in later:
            await send(gw, study)
        uids = [str(study[0].StudyInstanceUID) for study in later]

        async def retrying() -> bool:
            attempts = [(await state_of(gw, uid))["attempts"] for uid in uids]
            return min(attempts) >= 2

        await eventually(retrying, 30, "both studies to retry")
        await asyncio.to_thread(triton.start)
        docs = [await result_of(gw, uid, 60) for uid in uids]
        assert [d["status"] for d in docs] == ["SUCCEEDED", "SUCCEEDED"]
        status, body = await healthz()
        assert (status, body["model"]["ok"]) == (200, True)
    finally:
        await gw.stop(grace=5)
        if not triton.ready():
            await asyncio.to_thread(triton.start)
