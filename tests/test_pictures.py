"""Pictures for the pages (pxsgate.pictures): each scored image's exact model input and every
instance's thumbnail, made when the study is processed, kept after retention deletes the
DICOM files, named without UIDs; a picture that cannot be made never fails a study."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pxsgate.pictures import FilePictures, StudyPicture, pictures_of_study, study_pictures
from pxsgate.preprocess import preprocess_file, thumbnail_pixels
from pxsgate.service.gateway import Gateway
from pxsgate.tools import synth

from .inprocess import FastModel, gateway, result_of, send
from .test_lifecycle import ap_study

MAX_BYTES = 60_000  # a thumbnail
# A model input is lossless: an equalised image compresses little (PNG of 320 x 320 bytes).
MAX_INPUT_BYTES = 320 * 320 + 4096


def recording(model: FastModel) -> list[np.ndarray]:
    """Every image the stand-in model is given, as it was given."""
    seen: list[np.ndarray] = []
    score = model.score_and_embed

    def record(batch: np.ndarray) -> tuple[list[float], np.ndarray]:
        seen.extend(np.array(img, copy=True) for img in batch)
        return score(batch)

    model.score_and_embed = record  # type: ignore[method-assign]
    return seen


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def check_thumbnail(path: Path | None) -> tuple[int, int]:
    assert path is not None, "every instance has a thumbnail"
    assert path.stat().st_size < MAX_BYTES
    with Image.open(path) as img:
        img.load()
        assert max(img.size) <= 256
        return img.size


async def pictures_of(gw: Gateway, study_uid: str) -> list[StudyPicture]:
    assert gw.pictures is not None
    found = await pictures_of_study(gw.store, gw.pictures, study_uid)
    assert found is not None
    return found


async def test_a_study_keeps_its_pictures_after_the_spool(tmp_path: Path) -> None:
    """The feed's AP film with its CATH copy and screenshot, a study of two AP films and
    another patient's, and a PA + lateral study (skipped): each scored image's model input
    is exactly what the model scored, every instance (used or not) has a small thumbnail,
    no path names a UID, and all of it stays when retention deletes the spool's files."""
    feed = {s.key: s for s in synth.hospital_feed(seed=22, rows=600, cols=512,
                                                  prefix="PICS")}
    studies = [feed["portable-ap-cath"], feed["repeat-ap-wrong-patient"], feed["pa-lateral"]]
    async with gateway(tmp_path) as (gw, model):
        seen = recording(model)
        assert gw.pictures is not None
        assert gw.thumbnails is not None
        for study in studies:
            await send(gw, list(study.datasets))
        docs = {s.key: await result_of(gw, str(s.datasets[0].StudyInstanceUID))
                for s in studies}
        assert [docs[s.key]["status"] for s in studies] == ["SUCCEEDED", "SUCCEEDED",
                                                             "SKIPPED"]
        await gw.thumbnails.wait_idle()

        spool_files: dict[str, Path] = {}
        for study in studies:
            uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
            spool_files.update(await gw.store.instance_paths(uids))
        # The model inputs: exactly the arrays the model scored, and the preprocessing of
        # the spool's file; none for an image that was not scored.
        scored = {str(u) for s in studies for u in s.expected_inputs}
        assert len(scored) == 3
        for uid in scored:
            path = gw.pictures.model_input(uid)
            assert path is not None
            assert path.suffix == ".png"
            assert path.stat().st_size < MAX_INPUT_BYTES
            with Image.open(path) as img:
                saved = np.asarray(img)
            assert saved.dtype == np.uint8
            assert saved.shape == (320, 320)
            np.testing.assert_array_equal(saved, preprocess_file(spool_files[uid]))
            assert any(np.array_equal(saved, s) for s in seen), "what the model scored"
            np.testing.assert_array_equal(gw.pictures.load_model_input(uid), saved)
        for uid in set(spool_files) - scored:
            assert gw.pictures.model_input(uid) is None

        before = {}
        for study in studies:
            listed = await pictures_of(gw, str(study.datasets[0].StudyInstanceUID))
            assert [p.sop_instance_uid for p in listed] == \
                [str(ds.SOPInstanceUID) for ds in study.datasets], "every instance, in order"
            for picture in listed:
                check_thumbnail(picture.thumbnail)
                assert (picture.model_input is not None) == (picture.sop_instance_uid in scored)
                assert picture.selected == (picture.sop_instance_uid in scored)
                assert picture.rule
                before[picture.sop_instance_uid] = picture
        cath = feed["portable-ap-cath"]
        not_used = [before[str(ds.SOPInstanceUID)] for ds in cath.datasets[1:]]
        assert all(not p.selected and p.reason for p in not_used), "the copy, the screenshot"

        # No UID (study, series, instance, nor the patient's) in any name under pictures/.
        pictures_dir = gw.config.pictures_dir
        names = [str(p.relative_to(pictures_dir)) for p in all_files(pictures_dir)]
        assert len(names) == len(spool_files) + len(scored) + 1  # and the secret
        for study in studies:
            for ds in study.datasets:
                for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                              ds.PatientID, ds.AccessionNumber):
                    assert not [n for n in names if str(value) in n]
        assert all(p.key in str(p.thumbnail) for p in before.values())
        assert gw.pictures.by_key(next(iter(before.values())).key, "thumbnail") is not None
        assert gw.pictures.by_key("../../secret", "thumbnail") is None

        # Retention deletes the DICOM files; the pictures stay, and the pages still list them.
        assert await gw.retention.run(now=time.time() + 25 * 3600) == len(studies)
        assert not any(p.exists() for p in spool_files.values())
        for study in studies:
            listed = await pictures_of(gw, str(study.datasets[0].StudyInstanceUID))
            assert listed == [before[p.sop_instance_uid] for p in listed]
            assert all(p.thumbnail is not None and p.thumbnail.exists() for p in listed)


async def test_an_image_that_cannot_be_decoded_leaves_the_result_as_it_was(
        tmp_path: Path) -> None:
    """A study whose only image cannot be decoded is FAILED as before; a study with one
    broken image of two is scored on the other (image-failed); no crash, and the pictures
    that can be made are made."""
    broken = ap_study(2201, "PICBAD")
    broken[0].PixelData = b"\x00\x01" * 8
    half = ap_study(2202, "PICHALF", images=2)
    half[1].PixelData = b"\x00\x01" * 8
    async with gateway(tmp_path) as (gw, _):
        assert gw.pictures is not None
        assert gw.thumbnails is not None
        await send(gw, broken + half)
        failed = await result_of(gw, str(broken[0].StudyInstanceUID))
        scored = await result_of(gw, str(half[0].StudyInstanceUID))
        await gw.thumbnails.wait_idle()
        assert failed["status"] == "FAILED"
        assert scored["status"] == "SUCCEEDED"
        assert "image-failed" in scored["pxsgate"]["flags"]
        assert gw.pictures.thumbnail(str(broken[0].SOPInstanceUID)) is None
        assert gw.pictures.model_input(str(broken[0].SOPInstanceUID)) is None
        good, bad = (str(ds.SOPInstanceUID) for ds in half)
        assert gw.pictures.model_input(good) is not None
        check_thumbnail(gw.pictures.thumbnail(good))
        assert gw.pictures.model_input(bad) is None
        assert gw.pictures.thumbnail(bad) is None
        assert gw.thumbnails.failed == 2
        listed = await pictures_of(gw, str(half[0].StudyInstanceUID))
        assert [(p.selected, p.rule) for p in listed] == [(True, listed[0].rule),
                                                          (False, "unscorable")]


async def test_a_picture_that_cannot_be_written_never_fails_the_study(
        tmp_path: Path) -> None:
    """pictures/ is a file (a broken mount): the study is scored all the same."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pictures").write_text("not a folder")
    study = ap_study(2203, "PICRO")
    async with gateway(tmp_path) as (gw, _):
        assert gw.thumbnails is not None
        await send(gw, study)
        doc = await result_of(gw, str(study[0].StudyInstanceUID))
        await gw.thumbnails.wait_idle()
        assert doc["status"] == "SUCCEEDED"
        assert gw.thumbnails.made == 0


async def test_pictures_can_be_switched_off(tmp_path: Path) -> None:
    study = ap_study(2204, "PICOFF")
    async with gateway(tmp_path, "pictures:\n  enabled: false\n") as (gw, _):
        assert gw.pictures is None
        assert gw.thumbnails is None
        await send(gw, study)
        assert (await result_of(gw, str(study[0].StudyInstanceUID)))["status"] == "SUCCEEDED"
        assert not gw.config.pictures_dir.exists()


async def test_keep_days_removes_old_pictures_only(tmp_path: Path) -> None:
    """pictures.keep-days: retention removes the pictures made longer ago (at most once an
    hour), and the temporary files a crash left; newer ones stay."""
    async with gateway(tmp_path, "pictures:\n  keep-days: 30\n") as (gw, _):
        pictures = gw.pictures
        assert pictures is not None
        image = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48).astype(np.uint8)
        old, new = pictures.save_thumbnail("1.2.3.1", image), pictures.save_thumbnail(
            "1.2.3.2", image)
        kept_input = pictures.save_model_input("1.2.3.2", image)
        assert old is not None
        assert new is not None
        assert kept_input is not None
        leftover = old.parent / ".tmp-0123456789abcdef"
        leftover.write_bytes(b"half a picture")
        long_ago = time.time() - 31 * 86400
        os.utime(old, (long_ago, long_ago))
        os.utime(leftover, (long_ago, long_ago))
        assert await gw.retention.prune_pictures(time.time(), force=True) == 1
        assert not old.exists()
        assert not leftover.exists()
        assert new.exists()
        assert kept_input.exists()
        assert pictures.thumbnail("1.2.3.1") is None
        assert await gw.retention.prune_pictures(time.time()) == 0, "once an hour"


def test_a_thumbnail_is_the_normalised_film_made_small(tmp_path: Path) -> None:
    """min-max to 8 bits (no equalisation), MONOCHROME1 inverted, longest side 256; a
    constant image is black."""
    rng = np.random.default_rng(22)
    pixels = rng.integers(100, 4000, size=(1500, 1200), dtype=np.uint16)
    pixels[:750] = 100  # the top half at the minimum, the bottom half noise
    mono2 = thumbnail_pixels(pixels, "MONOCHROME2")
    mono1 = thumbnail_pixels(pixels, "MONOCHROME1")
    assert mono2.shape in ((256, 204), (256, 205))
    assert mono2.dtype == np.uint8
    assert np.abs(mono1.astype(int) - (255 - mono2.astype(int))).max() <= 1, "inverted"
    assert mono2[:100].max() == 0, "the minimum is black"
    assert 100 < mono2[160:].mean() < 155, "the noise is mid-grey"
    assert thumbnail_pixels(np.full((300, 300), 7, np.uint16), "MONOCHROME2").max() == 0
    assert thumbnail_pixels(pixels[:100, :90], "MONOCHROME2").shape == (100, 90), \
        "a small image is not enlarged"


def test_study_pictures_leaves_out_pxsgates_own_objects(tmp_path: Path) -> None:
    pictures = FilePictures(tmp_path / "pictures")
    image = np.zeros((32, 32), np.uint8)
    pictures.save_thumbnail("1.2.1", image)
    detail: dict[str, Any] = {
        "instances": [{"sop_instance_uid": "1.2.1", "series_instance_uid": "1.2", "kind":
                       "image"},
                      {"sop_instance_uid": "1.2.2", "series_instance_uid": "1.2", "kind":
                       "image"},
                      {"sop_instance_uid": "1.9.1", "series_instance_uid": "1.9", "kind":
                       "own"}],
        "decisions": [{"sop_instance_uid": None, "selected": 1, "rule": "r", "reason": ""},
                      {"sop_instance_uid": "1.2.1", "selected": 1, "rule": "ap",
                       "reason": "AP"}],
    }
    first, second = study_pictures(detail, pictures)
    assert (first.selected, first.rule, first.model_input) == (True, "ap", None)
    assert first.thumbnail is not None
    assert first.key in first.thumbnail.name
    assert (second.selected, second.thumbnail) == (None, None)
    assert FilePictures(tmp_path / "pictures").key("1.2.1") == first.key, "a stable secret"
    assert FilePictures(tmp_path / "other").key("1.2.1") != first.key


async def test_retention_waits_for_a_studys_thumbnails(tmp_path: Path) -> None:
    """A study's files stay while its thumbnails are being made; then retention deletes
    them and the thumbnails stay."""
    study = ap_study(2205, "PICWAIT")
    uid = str(study[0].StudyInstanceUID)
    async with gateway(tmp_path) as (gw, _):
        thumbnails = gw.thumbnails
        assert thumbnails is not None
        go = asyncio.Event()
        make = thumbnails._make

        async def held(path: Path) -> np.ndarray:
            await go.wait()
            return await make(path)

        thumbnails._make = held  # type: ignore[method-assign]
        await send(gw, study)
        await result_of(gw, uid)
        later = time.time() + 25 * 3600
        assert thumbnails.pending(uid)
        assert await gw.retention.run(now=later) == 0, "kept for its thumbnails"
        go.set()
        await thumbnails.wait_idle()
        assert await gw.retention.run(now=later) == 1
        assert gw.pictures is not None
        check_thumbnail(gw.pictures.thumbnail(str(study[0].SOPInstanceUID)))
