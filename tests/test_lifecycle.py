"""Study completion and rules over a service's life: late instances re-open a scored study
(rescored, history kept), rules reload on SIGHUP without dropping associations (and an
invalid file keeps the old ones), per-AE-title timings, and deadlines that survive a restart.
Each test runs its own ``pxsgate serve`` process against real DICOM peers."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from pxsgate.tools import synth
from pxsgate.tools.scu import echo, send_datasets

from .conftest import Service, start_service, stop_service


def ap_study(index: int, prefix: str, images: int = 1, **tags: Any) -> list[Any]:
    st = synth.make_study(index, seed=index, prefix=prefix, description="XR CHEST PORTABLE")
    out = []
    for i in range(images):
        px = synth.chest_radiograph(np.random.default_rng([index, i]), rows=256,
                                    cols=256, view="AP")
        ds = synth.make_image_dataset(
            px, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=st,
            series_description=tags.get("series_description", "CHEST AP PORTABLE"),
            view_position="AP", body_part="CHEST", series_number=i + 1)
        out.append(ds)
    return out


def wait_until(predicate: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def events(service: Service, name: str) -> list[dict[str, Any]]:
    return [e for e in service.logs if e.get("event") == name]


def test_late_instance_rescores_and_keeps_history(tmp_path: Path) -> None:
    svc = start_service(tmp_path)
    try:
        first, late = ap_study(1, "LATE", images=2)
        uid = str(first.StudyInstanceUID)
        assert send_datasets("127.0.0.1", svc.port, [first]).ok
        doc1 = svc.wait_for([uid])[uid]
        assert (doc1["status"], doc1["pxsgate"]["flags"]) == ("SUCCEEDED", [])
        assert send_datasets("127.0.0.1", svc.port, [late]).ok
        wait_until(lambda: len(svc.results("--study-uid", uid, "--history")) == 2,
                   what="the second result")
        current = svc.results("--study-uid", uid)
        assert len(current) == 1, "one current result per study"
        doc2 = current[0]
        assert doc2["id"] != doc1["id"]
        assert doc2["pxsgate"]["flags"] == ["multiple-ap-images", "rescored"]
        assert len(doc2["results"]) == 2
        history = svc.results("--study-uid", uid, "--history")
        assert [d["id"] for d in history] == [doc1["id"], doc2["id"]], "earlier stays"
        assert {d["id"] for d in svc.results("--flagged")} == {doc2["id"]}
    finally:
        assert stop_service(svc) == 0


def _non_image(study: Any, sop_class: str, modality: str) -> Any:
    """A minimal non-image object of ``study`` (what a PACS routes with a study: a key
    object selection, a presentation state)."""
    from pydicom import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate"):
        setattr(ds, keyword, getattr(study, keyword))
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    return ds


def test_non_image_objects_and_resends_do_not_reopen_a_scored_study(tmp_path: Path) -> None:
    """A key object selection and a presentation state routed with a scored study are
    stored and indexed, and the study is not scored again; the same image sent again is
    logged once, as instance.duplicate; `pxsgate trace` lists it under both associations.
    An image that could change the score still re-opens the study."""
    from pynetdicom.sop_class import (
        GrayscaleSoftcopyPresentationStateStorage,
        KeyObjectSelectionDocumentStorage,
    )

    from .conftest import pxsgate

    svc = start_service(tmp_path)
    try:
        first, late = ap_study(2, "NONIMG", images=2)
        uid = str(first.StudyInstanceUID)
        assert send_datasets("127.0.0.1", svc.port, [first], calling_ae="ROUTER-A").ok
        doc1 = svc.wait_for([uid])[uid]
        others = [_non_image(first, KeyObjectSelectionDocumentStorage, "KO"),
                  _non_image(first, GrayscaleSoftcopyPresentationStateStorage, "PR")]
        assert send_datasets("127.0.0.1", svc.port, [*others, first],
                             calling_ae="ROUTER-B").ok
        wait_until(lambda: len(events(svc, "instance.duplicate")) == 1, what="the re-send")
        time.sleep(2.0)  # settle-seconds is 0.3: a re-opened study would be scored by now
        assert [d["id"] for d in svc.results("--study-uid", uid, "--history")] == [doc1["id"]]
        stored = [e for e in events(svc, "instance.stored") if e.get("study") == doc1_key(svc)]
        assert [(e["kind"], e["reopens"]) for e in stored] == [
            ("image", True), ("other", False), ("other", False)]
        [duplicate] = events(svc, "instance.duplicate")
        assert duplicate["sop_class"] == "Computed Radiography Image Storage"
        with sqlite3.connect(svc.data_dir / "pxsgate.sqlite3") as db:
            kinds = sorted(r[0] for r in db.execute(
                "SELECT kind FROM instances WHERE study_instance_uid = ?", (uid,)))
        assert kinds == ["image", "other", "other"]
        trace = pxsgate("trace", uid, "--config", svc.config).stdout
        first_tail = str(first.SOPInstanceUID)[-20:]
        lines = [line for line in trace.splitlines()
                 if first_tail in line and "Computed Radiography" in line]
        assert len(lines) == 2, trace  # under ROUTER-A's association and ROUTER-B's
        assert "again: the same bytes" in lines[1]
        assert "ROUTER-A → PxsScore" in trace
        assert "ROUTER-B → PxsScore" in trace
        # An image still re-opens it.
        assert send_datasets("127.0.0.1", svc.port, [late]).ok
        wait_until(lambda: len(svc.results("--study-uid", uid, "--history")) == 2,
                   what="the rescore")
    finally:
        assert stop_service(svc) == 0


def doc1_key(svc: Service) -> str:
    """The log's study key of the first stored instance (one study per service here)."""
    return str(events(svc, "instance.stored")[0]["study"])


def _rules_config(svc: Service, image_rules: str) -> None:
    text = svc.config.read_text()
    head = text.split("selection:")[0]
    svc.config.write_text(head + "selection:\n  image-rules:\n" + image_rules)


def test_sighup_reloads_rules_without_dropping_associations(tmp_path: Path) -> None:
    svc = start_service(tmp_path)
    try:
        # An association held open across the reload keeps working.
        ae = AE(ae_title="ROUTER")
        ae.add_requested_context(Verification)
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", svc.port, ae_title="PxsScore")
        assert assoc.is_established

        # New rules: only images whose SeriesDescription names PORTABLE are model input.
        _rules_config(svc, "    - name: portable-only\n"
                           "      select: {tag: SeriesDescription, contains-token: PORTABLE}\n")
        svc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: events(svc, "config.reloaded"), what="config.reloaded")
        reloaded = events(svc, "config.reloaded")[-1]
        assert (reloaded["image_rules"], reloaded["changed_rules"]) == (1, True)

        held = ap_study(2, "HUP", series_description="CHEST AP")  # AP, but not PORTABLE
        assert assoc.send_c_store(held[0]).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        uid = str(held[0].StudyInstanceUID)
        doc = svc.wait_for([uid])[uid]
        assert doc["status"] == "SKIPPED"
        assert "portable-only" in doc["errorMessage"], doc["errorMessage"]

        # An invalid file: logged with its key path, the running rules stay.
        _rules_config(svc, "    - name: broken\n"
                           "      select: {tag: NoSuchKeyword, equals: AP}\n")
        svc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: events(svc, "config.reload_failed"), what="config.reload_failed")
        failed = events(svc, "config.reload_failed")[-1]
        assert failed["key"] == "selection.image-rules[0].select.tag"
        assert echo("127.0.0.1", svc.port) == 0x0000
        # The file is made valid again for `pxsgate results`, with rules the service has
        # not loaded (no SIGHUP): what it decides next shows which rules it runs.
        _rules_config(svc, "    - name: never-loaded\n"
                           "      select: {tag: Modality, equals: CR}\n")
        portable = ap_study(3, "HUP")  # "CHEST AP PORTABLE": selected by portable-only
        assert send_datasets("127.0.0.1", svc.port, portable).ok
        uid = str(portable[0].StudyInstanceUID)
        doc = svc.wait_for([uid])[uid]
        assert doc["status"] == "SUCCEEDED"
        assert doc["pxsgate"]["selection"]["images"][0]["rule"] == "portable-only"
    finally:
        assert stop_service(svc) == 0


MAPPINGS = """  pipeline-mappings:
    - {name: fast, clara-ae-title: PxsScore}
    - {name: slow, clara-ae-title: PxsSlow}"""


def test_settle_time_per_called_ae_title(tmp_path: Path) -> None:
    svc = start_service(tmp_path, settle=0.2, ae_titles=("PxsScore", "PxsSlow"),
                        extra_scp=MAPPINGS)
    text = svc.config.read_text().replace("      - ae-title: PxsSlow",
                                          "      - ae-title: PxsSlow\n        settle-seconds: 4")
    svc.config.write_text(text)
    svc.process.send_signal(signal.SIGHUP)  # timings reload too
    wait_until(lambda: events(svc, "config.reloaded"), what="config.reloaded")
    try:
        fast, slow = ap_study(4, "AEF"), ap_study(5, "AES")
        started = time.monotonic()
        assert send_datasets("127.0.0.1", svc.port, slow, called_ae="PxsSlow").ok
        assert send_datasets("127.0.0.1", svc.port, fast, called_ae="PxsScore").ok
        fast_uid, slow_uid = str(fast[0].StudyInstanceUID), str(slow[0].StudyInstanceUID)
        svc.wait_for([fast_uid])
        assert not svc.results("--study-uid", slow_uid), "PxsSlow's study is still settling"
        svc.wait_for([slow_uid])
        assert time.monotonic() - started >= 4
    finally:
        assert stop_service(svc) == 0


def test_restart_resumes_pending_deadlines(tmp_path: Path) -> None:
    """A study received but not yet ready when the service stops is scored after the
    restart at the deadline kept in SQLite, with no new instance arriving, even though the
    restarted service's own settle time would hold it for ten minutes."""
    svc = start_service(tmp_path, settle=8)
    study = ap_study(6, "RESUME")
    uid = str(study[0].StudyInstanceUID)
    db = svc.data_dir / "pxsgate.sqlite3"

    def row() -> tuple[Any, ...] | None:
        with sqlite3.connect(db) as con:
            found: tuple[Any, ...] | None = con.execute(
                "SELECT state, deadline, released_at FROM studies WHERE study_instance_uid = ?",
                (uid,)).fetchone()
        return found

    try:
        assert send_datasets("127.0.0.1", svc.port, study).ok
        wait_until(lambda: (r := row()) is not None and r[2] is not None,
                   what="the release to be recorded")
    finally:
        assert stop_service(svc) == 0
    stored = row()
    assert stored is not None
    assert stored[0] == "receiving", "stopped before the settle time passed"
    assert stored[1] > time.time(), "the deadline (release + 8 s) is in SQLite"
    assert not svc.results("--study-uid", uid)

    again = start_service(tmp_path, settle=600)
    try:
        doc = again.wait_for([uid], timeout=60)[uid]
        assert doc["status"] == "SUCCEEDED"
        assert events(again, "studies.resumed")[0]["studies"] == 1
    finally:
        assert stop_service(again) == 0


def test_an_instance_sent_under_another_study_is_a_correction(tmp_path: Path) -> None:
    """Study A (patient 1) with images X and Y is scored; then X arrives under study B of
    patient 2 (a technologist moved a wrong-patient image in PACS). Both studies are scored
    again: A's new current result no longer claims X, B scores X; both are flagged
    instance-moved and wrong-patient; the move is logged; A's first result stays as history
    (issue 18.2)."""
    import copy

    from pydicom.uid import generate_uid

    svc = start_service(tmp_path)
    try:
        x, y = ap_study(3, "MOVED", images=2)
        study_a = str(x.StudyInstanceUID)
        assert send_datasets("127.0.0.1", svc.port, [x, y]).ok
        first = svc.wait_for([study_a])[study_a]
        assert first["status"] == "SUCCEEDED"
        claimed = {u for r in first["results"] for d in r["derivedFrom"]
                   for u in d["refSopInstanceUid"]}
        assert str(x.SOPInstanceUID) in claimed

        moved = copy.deepcopy(x)
        moved.StudyInstanceUID = study_b = generate_uid()
        moved.PatientID, moved.PatientName = "OTHER-PATIENT", "OTHER^PATIENT"
        assert send_datasets("127.0.0.1", svc.port, [moved]).ok
        wait_until(lambda: len(svc.results("--study-uid", study_a, "--history")) == 2,
                   what="study A scored again")
        b = svc.wait_for([study_b])[study_b]
        [a] = svc.results("--study-uid", study_a)
        now_claimed = {u for r in a["results"] for d in r["derivedFrom"]
                       for u in d["refSopInstanceUid"]}
        assert now_claimed == {str(y.SOPInstanceUID)}, "A no longer claims X"
        assert b["status"] == "SUCCEEDED"
        assert {u for r in b["results"] for d in r["derivedFrom"]
                for u in d["refSopInstanceUid"]} == {str(x.SOPInstanceUID)}
        for doc in (a, b):
            assert {"instance-moved", "wrong-patient"} <= set(doc["pxsgate"]["flags"])
        history = svc.results("--study-uid", study_a, "--history")
        assert history[0]["id"] == first["id"]
        [event] = events(svc, "instance.moved")
        assert event["patient_changed"] is True
        assert "OTHER" not in json.dumps(event)
    finally:
        assert stop_service(svc) == 0


def test_an_image_that_cannot_be_scored_does_not_fail_its_study(tmp_path: Path) -> None:
    """A 50-frame AP beside a valid AP: the valid one is scored (SUCCEEDED), the multi-frame
    one is recorded as not used with its reason and the study flagged image-failed, on the
    first try. A study of only such an image fails at once: its bytes will not change, so it
    is not tried again (issue 18.9)."""
    import numpy as np

    good, multi = ap_study(4, "MULTIFRAME", images=2)
    frames = np.stack([multi.pixel_array] * 50)
    multi.NumberOfFrames = 50
    multi.PixelData = frames.tobytes()
    alone = ap_study(5, "ONLYMULTI")[0]
    alone_frames = np.stack([alone.pixel_array] * 50)
    alone.NumberOfFrames = 50
    alone.PixelData = alone_frames.tobytes()
    svc = start_service(tmp_path)
    try:
        assert send_datasets("127.0.0.1", svc.port, [good, multi]).ok
        assert send_datasets("127.0.0.1", svc.port, [alone]).ok
        mixed_uid, alone_uid = str(good.StudyInstanceUID), str(alone.StudyInstanceUID)
        docs = svc.wait_for([mixed_uid, alone_uid])
        mixed, failed = docs[mixed_uid], docs[alone_uid]
        assert mixed["status"] == "SUCCEEDED"
        assert [r["derivedFrom"][0]["refSopInstanceUid"] for r in mixed["results"]] == [
            [str(good.SOPInstanceUID)]]
        assert "image-failed" in mixed["pxsgate"]["flags"]
        [entry] = [i for i in mixed["pxsgate"]["selection"]["images"]
                   if i["sopInstanceUid"] == str(multi.SOPInstanceUID)]
        assert (entry["selected"], entry["rule"]) == (False, "unscorable")
        assert "multi-frame" in entry["reason"]
        assert mixed["pxsgate"]["inference"]["attempts"] == 1
        assert (failed["status"], failed["exitCode"]) == ("FAILED", 1)
        assert "multi-frame" in failed["errorMessage"]
        assert failed["pxsgate"]["inference"]["attempts"] == 1
        assert events(svc, "study.retry") == []
    finally:
        assert stop_service(svc) == 0


async def test_decode_slots_go_round_robin_between_studies() -> None:
    """FairSlots: a one-image study queued behind a big study's images gets the next slot
    but one, not the last (issue 18.10)."""
    import asyncio

    from pxsgate.pipeline import FairSlots

    slots = FairSlots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def image(study: str, n: int) -> None:
        async with slots.slot(study):
            order.append(f"{study}{n}")
            await release.wait()

    big = [asyncio.create_task(image("A", n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    small = asyncio.create_task(image("B", 1))
    await asyncio.sleep(0)
    assert order == ["A1"]
    release.set()
    await asyncio.gather(*big, small)
    assert order == ["A1", "A2", "B1", "A3", "A4", "A5"]


def test_a_study_of_many_images_is_capped(tmp_path: Path) -> None:
    """Twelve AP images with max-images-per-study 4: the latest four are scored, the rest
    recorded as not used (rule over-limit), the study flagged images-capped."""
    svc = start_service(tmp_path, extra="selection:\n  max-images-per-study: 4\n")
    try:
        study = ap_study(6, "CAPPED", images=12)
        for n, ds in enumerate(study):
            ds.AcquisitionDateTime = f"20260101{n:02d}0000"
        uid = str(study[0].StudyInstanceUID)
        assert send_datasets("127.0.0.1", svc.port, study).ok
        doc = svc.wait_for([uid])[uid]
        scored = [r["derivedFrom"][0]["refSopInstanceUid"][0] for r in doc["results"]]
        assert scored == [str(ds.SOPInstanceUID) for ds in reversed(study[-4:])]
        assert "images-capped" in doc["pxsgate"]["flags"]
        capped = [i for i in doc["pxsgate"]["selection"]["images"] if i["rule"] == "over-limit"]
        assert len(capped) == 8
    finally:
        assert stop_service(svc) == 0
