"""Decode on arrival (preprocess.decode-on-arrival, issue 24), from outside: real
associations into the in-process gateway (tests/inprocess.py), the real decode processes,
the real selection; the stand-in model records the bytes of every model input it scores.

The promise: the same model input bytes, hence the same scores, whether an image was
decoded while its study settled or once it was ready; an early decode that failed leaves
the study scored, or FAILED, exactly as without decode on arrival; the selected image is
decoded once, not again when its study is ready."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from pxsgate.errors import ModelError
from pxsgate.preprocess import preprocess_file
from pxsgate.service.gateway import Gateway

from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

OFF = "  decode-on-arrival: false\n"
SETTLE = 1.0  # time enough for a small image's decode on arrival, even on a busy machine


def sample(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def decodes(gw: Gateway) -> dict[str, float]:
    """Model inputs decoded, on arrival and at ready time, and early decodes by outcome."""
    counts = {stage: sample(gw, "pxsgate_model_input_decodes_total", stage=stage)
              for stage in ("arrival", "ready")}
    counts |= {outcome: sample(gw, "pxsgate_early_decodes_total", outcome=outcome)
               for outcome in ("used", "unused", "failed", "skipped", "evicted")}
    return {k: v for k, v in counts.items() if v}


def j2k(datasets: list[Any]) -> list[Any]:
    for ds in datasets:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return datasets


def syntax(name: str, index: int, prefix: str, images: int = 1) -> list[Any]:
    study = ap_study(index, prefix, images=images)
    return j2k(study) if name == "j2k" else study


async def scored(tmp: Path, study: list[Any], preprocess: str = ""
                 ) -> tuple[dict[str, Any], list[bytes], dict[str, float]]:
    """The study sent to a gateway of its own: its result, the model inputs the model
    scored, and the decodes counted."""
    async with gateway(tmp, settle=SETTLE, preprocess=preprocess) as (gw, model):
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        return doc, model.seen, decodes(gw)


@pytest.mark.parametrize("name", ["explicit", "j2k"])
async def test_decoded_on_arrival_or_when_ready_the_model_input_is_the_same(
        tmp_path: Path, name: str) -> None:
    study = syntax(name, 2401, "EARLY")
    for folder in ("on", "off"):
        (tmp_path / folder).mkdir()
    on, seen_on, counted_on = await scored(tmp_path / "on", study)
    off, seen_off, counted_off = await scored(tmp_path / "off", study, OFF)
    # Decoded while the study settled, used when it was ready, not decoded again.
    assert counted_on == {"arrival": 1, "used": 1}
    assert counted_off == {"ready": 1}
    assert len(seen_on) == len(seen_off) == 1
    assert seen_on[0] == seen_off[0], "the same model input bytes"
    assert on["status"] == off["status"] == "SUCCEEDED"
    assert on["results"] == off["results"], "the same scores"


async def test_only_what_could_be_selected_is_decoded_on_arrival(tmp_path: Path) -> None:
    """Two AP images, a lateral (the image rules exclude it: never decoded) and an AP image
    under another PatientID (its header could be chosen, so it is decoded; the study's
    wrong-patient check leaves it out when ready: dropped, unused)."""
    ap1, ap2, lateral, other = ap_study(2402, "MIXED", images=4)
    lateral.SeriesDescription = "CHEST LAT"
    lateral.ViewPosition = "LL"
    other.PatientID = "SOMEONE-ELSE"
    async with gateway(tmp_path, settle=SETTLE) as (gw, model):
        await send(gw, [ap1, ap2, lateral, other])
        doc = await result_of(gw, str(ap1.StudyInstanceUID))
        assert doc["status"] == "SUCCEEDED"
        assert "wrong-patient" in doc["pxsgate"]["flags"]
        assert {i["sopInstanceUid"] for i in doc["pxsgate"]["selection"]["images"]
                if i["selected"]} == {str(ap1.SOPInstanceUID), str(ap2.SOPInstanceUID)}
        assert decodes(gw) == {"arrival": 3, "used": 2, "unused": 1}
        assert len(model.seen) == 2
        assert gw._early is not None
        assert gw._early.held_bytes == 0, "nothing kept"


def kill_decode_processes(before: set[Any]) -> int:
    """Kill the gateway's decode processes, as a codec crashing would: the children this
    test process has that it did not have ``before`` the gateway started (its thumbnail
    process starts with the first thumbnail, after a result)."""
    children = [c for c in multiprocessing.active_children() if c not in before]
    for child in children:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
    for child in children:
        child.join(10)
    return len(children)


@pytest.mark.parametrize("name", ["explicit", "j2k"])
async def test_an_early_decode_that_failed_leaves_the_study_scored_as_today(
        tmp_path: Path, name: str) -> None:
    """The decode process dies under the decode on arrival: the study is scored all the
    same, from a decode when ready, with the bytes a gateway without decode on arrival
    gives the model, at its first try."""
    study = syntax(name, 2403, "DIED")
    for folder in ("on", "off"):
        (tmp_path / folder).mkdir()
    off, seen_off, _ = await scored(tmp_path / "off", study, OFF)
    before = set(multiprocessing.active_children())
    async with gateway(tmp_path / "on", settle=SETTLE) as (gw, model):
        assert kill_decode_processes(before) == 1, "preprocess.workers: 1"
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        assert decodes(gw) == {"arrival": 1, "failed": 1, "ready": 1}
        assert model.seen == seen_off
        assert (doc["status"], doc["results"]) == ("SUCCEEDED", off["results"])
        detail = await gw.store.study_detail(str(study[0].StudyInstanceUID))
        assert detail is not None
        assert detail["study"]["attempts"] == 1


def truncated(datasets: list[Any]) -> list[Any]:
    """JPEG 2000 whose codestream is cut short: stored (the header is sound), undecodable."""
    for ds in j2k(datasets):
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[:200]])
    return datasets


async def test_an_image_that_does_not_decode_fails_its_study_as_today(
        tmp_path: Path) -> None:
    study = truncated(ap_study(2404, "BROKEN"))
    for folder in ("on", "off"):
        (tmp_path / folder).mkdir()
    on, seen_on, counted_on = await scored(tmp_path / "on", study)
    off, seen_off, counted_off = await scored(tmp_path / "off", study, OFF)
    assert counted_on == {"arrival": 1, "failed": 1, "ready": 1}
    assert counted_off == {"ready": 1}
    assert seen_on == seen_off == []
    assert (on["status"], on["exitCode"]) == ("FAILED", 1)
    for key in ("status", "exitCode", "errorMessage", "results"):
        assert on[key] == off[key], key
    assert "cannot decode pixel data" in on["errorMessage"]
    for key in ("flags", "selection"):
        assert on["pxsgate"][key] == off["pxsgate"][key], key


async def test_the_decode_on_arrival_cache_is_bounded(tmp_path: Path) -> None:
    """A cache smaller than one model input: each image is evicted as soon as it is made,
    and decoded again when its study is ready, giving the same bytes."""
    study = ap_study(2405, "EVICT")
    study[0].save_as(tmp_path / "image.dcm", enforce_file_format=True)
    async with gateway(tmp_path, settle=SETTLE,
                       preprocess="  on-arrival-cache-mb: 0.01\n") as (gw, model):
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        assert doc["status"] == "SUCCEEDED"
        assert decodes(gw) == {"arrival": 1, "evicted": 1, "ready": 1}
        assert model.seen == [preprocess_file(tmp_path / "image.dcm").tobytes()]


async def test_a_second_try_decodes_when_ready_and_gets_the_same_bytes(tmp_path: Path) -> None:
    """The model fails the first try, which had the image decoded on arrival; the second
    try decodes the file when ready, as without decode on arrival, and the model is given
    the same bytes both times."""
    study = syntax("j2k", 2406, "RETRY")
    async with gateway(tmp_path, settle=SETTLE) as (gw, model):
        tries: list[bytes] = []
        score_and_embed = model.score_and_embed

        def fails_once(batch: Any) -> Any:
            tries.append(batch[0].tobytes())
            if len(tries) == 1:
                raise ModelError("inference failed: the first try, on purpose")
            return score_and_embed(batch)

        model.score_and_embed = fails_once  # type: ignore[method-assign]
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        assert doc["status"] == "SUCCEEDED"
        assert doc["pxsgate"]["inference"]["attempts"] == 2
        assert decodes(gw) == {"arrival": 1, "used": 1, "ready": 1}
        assert len(tries) == 2
        assert tries[0] == tries[1], "decoded on arrival, then when ready: the same bytes"
