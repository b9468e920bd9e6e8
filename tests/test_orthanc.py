"""pxsgate between a real Orthanc 1.10 (tests/orthanc.py) and itself: Orthanc routes studies to
``pxsgate serve`` by C-STORE, pxsgate C-STOREs its Comprehensive SR back into Orthanc.

- An Orthanc auto-routing rule (Lua OnStableStudy -> /modalities/pxsgate/store) also routes
  the study back to pxsgate once pxsgate's SR has made it change: pxsgate must not score it again.
- What Orthanc transcodes to JPEG 2000 on the way out scores exactly like the uncompressed
  original sent directly.
- A rescore's SR supersedes the earlier one in the same series (PredecessorDocumentsSequence).

Orthanc accepts C-STORE only from the modalities it lists (DicomAlwaysAllowStore false,
DicomCheckModalityHost true), so pxsgate's exporter calling AE title is registered there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from pxsgate.delivery.sr import uid_from_id
from pxsgate.results import pxs_entries
from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets

from .conftest import Service, free_port, pxsgate, start_service, stop_service
from .orthanc import (
    GDCM_PLUGIN,
    JPEG2000_LOSSLESS,
    Orthanc,
    orthanc_binary,
    orthanc_dicomweb_plugin,
    orthanc_server,
)
from .test_lifecycle import ap_study

PXSGATE_AET = "PxsScore"          # pxsgate's SCP (called) AE title: Orthanc routes to it
EXPORTER_AET = "PXSGATE"          # the calling AE title of pxsgate's SR exporter
STABLE_AGE = 2                    # Orthanc's StableAge, seconds
SETTLE = 0.3                      # pxsgate's assembly.settle-seconds
# Orthanc's auto-routing of a stable study. Not SendToModality(studyId, ...): Lua's
# SendToModality() takes an instance id (Orthanc 1.10 logs "Unable to read attachment dicom
# of instance <the study id>" and sends nothing); a study goes through the REST API.
ROUTE_LUA = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/pxsgate/store', studyId)
end
"""
ACTIVE_STATES = ("receiving", "ready", "selected", "inferring")


def sr_exporter(orthanc_port: int, calling_aet: str = EXPORTER_AET,
                objects: str = "[sr]") -> str:
    return f"""exporters:
  - name: orthanc
    type: dicom
    host: 127.0.0.1
    port: {orthanc_port}
    ae-title: ORTHANC
    calling-ae-title: {calling_aet}
    objects: {objects}
    timeout-seconds: 10
    backoff-initial-seconds: 0.2
    backoff-max-seconds: 1
"""


@dataclass
class Pair:
    """``pxsgate serve`` and an Orthanc that know each other."""

    svc: Service
    orthanc: Orthanc
    http_port: int

    def api(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def history(self, study_uid: str) -> list[dict[str, Any]]:
        """Every result document of the study, earlier ones included, oldest first."""
        return self.svc.results("--study-uid", study_uid, "--history")

    def study(self, study_uid: str) -> dict[str, Any]:
        detail: dict[str, Any] = self.api(f"/studies/{study_uid}")
        return detail


@contextlib.contextmanager
def pxsgate_and_orthanc(tmp: Path, *, lua: str | None = None, export_sr: bool = True,
                        extra_scp: str = "", scu_preferred_syntax: str | None = None,
                        exporter_aet: str = EXPORTER_AET, objects: str = "[sr]"
                        ) -> Iterator[Pair]:
    """pxsgate first (its port is known only once it listens), its SR exporter aimed at the
    port Orthanc is about to take; then Orthanc, whose DicomModalities name pxsgate's SCP
    (``pxsgate``, for routing) and its exporter's calling AE (``pxsgate-sr``, store only)."""
    orthanc_binary()  # skips (fails under CI) before pxsgate starts, if Orthanc is missing
    orthanc_port = free_port()
    http_port = free_port()
    (tmp / "pxsgate").mkdir(parents=True)
    svc = start_service(tmp / "pxsgate", settle=SETTLE, http_port=http_port,
                        extra_scp=extra_scp, ae_titles=(PXSGATE_AET,),
                        extra=(sr_exporter(orthanc_port, exporter_aet, objects)
                               if export_sr else ""))
    modalities = {
        "pxsgate": {"AET": PXSGATE_AET, "Host": "127.0.0.1", "Port": svc.port,
                    "AllowStore": False, "AllowFind": False, "AllowMove": False,
                    "AllowGet": False},
        "pxsgate-sr": {"AET": EXPORTER_AET, "Host": "127.0.0.1", "Port": svc.port,
                       "AllowStore": True, "AllowFind": False, "AllowMove": False,
                       "AllowGet": False},
    }
    try:
        with orthanc_server(tmp / "orthanc", dicom_port=orthanc_port, modalities=modalities,
                            lua=lua, stable_age=STABLE_AGE,
                            scu_preferred_syntax=scu_preferred_syntax) as orthanc:
            yield Pair(svc, orthanc, http_port)
    except Exception:
        print("--- pxsgate log, last lines ---\n" + "\n".join(svc.raw_log[-40:]))
        raise
    finally:
        assert stop_service(svc) == 0


def poll(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def reuid(datasets: list[Dataset], label: str) -> tuple[list[Dataset], dict[str, str]]:
    """A copy of a study under new Study, Series and SOP Instance UIDs (same pixels, same
    patient); and the map from each original SOP Instance UID to its copy's."""
    study_uid = synth.synthetic_uid(label, datasets[0].StudyInstanceUID)
    copies, mapping = [], {}
    for ds in datasets:
        dup = copy.deepcopy(ds)
        dup.StudyInstanceUID = study_uid
        dup.SeriesInstanceUID = synth.synthetic_uid(label, ds.SeriesInstanceUID)
        dup.SOPInstanceUID = synth.synthetic_uid(label, ds.SOPInstanceUID)
        dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
        mapping[str(ds.SOPInstanceUID)] = str(dup.SOPInstanceUID)
        copies.append(dup)
    return copies, mapping


def scores(document: dict[str, Any]) -> dict[str, str]:
    """The PXS score of each scored image of a result document, by SOP Instance UID."""
    return {uid: str(entry["value"]) for entry in pxs_entries(document)
            for ref in entry["derivedFrom"] for uid in ref["refSopInstanceUid"]}


# --- (a) Orthanc routes the study back after pxsgate's SR arrived ------------------------------


def test_orthanc_autoroute_loop_scores_a_study_once(tmp_path: Path) -> None:
    study = ap_study(71, "ORTHLOOP", images=2)
    uid = str(study[0].StudyInstanceUID)
    with pxsgate_and_orthanc(tmp_path, lua=ROUTE_LUA) as pair:
        orthanc = pair.orthanc
        for ds in study:
            assert orthanc.upload(encode(ds))["Status"] == "Success"

        # Round 1: stable -> routed to pxsgate -> scored -> the SR C-STOREd into Orthanc.
        first = pair.svc.wait_for([uid], timeout=45)[uid]
        assert first["status"] == "SUCCEEDED", first["errorMessage"]
        [sr] = poll(lambda: orthanc.instances_of(uid, "SR"), 30, "the SR in Orthanc")
        # Round 2: the study changed (the SR), so it becomes stable again and Orthanc routes
        # all of it, the SR included, back to pxsgate.
        poll(lambda: any(i["sop_instance_uid"] == sr["SOPInstanceUID"]
                         for i in pair.study(uid)["instances"]),
             STABLE_AGE * 3 + 15, "Orthanc to route pxsgate's SR back to it")

        # Then a few more stable periods: each further SR would be routed back again. Stop
        # early once a second result or SR shows the loop.
        def looped() -> bool:
            return len(pair.history(uid)) > 1 or len(orthanc.instances_of(uid, "SR")) > 1
        deadline = time.monotonic() + 3 * STABLE_AGE + SETTLE + 8
        while time.monotonic() < deadline and not looped():
            time.sleep(0.3)
        if not looped():  # quiet: nothing of the study may still be on its way
            poll(lambda: pair.study(uid)["study"]["state"] not in ACTIVE_STATES, 30,
                 "pxsgate to finish with the study")

        history = pair.history(uid)
        srs = orthanc.instances_of(uid, "SR")
        stable = [c for c in orthanc.changes("StableStudy")
                  if c["ID"] == orthanc.study_id(uid)]
        received = pair.study(uid)["instances"]
    assert len(stable) >= 2, "Orthanc routed the study again after the SR arrived"
    assert any(i["sop_instance_uid"] == sr["SOPInstanceUID"] and i["calling_ae"] == "ORTHANC"
               for i in received)
    results, flags = len(history), [d["pxsgate"]["flags"] for d in history]
    assert results == 1, (
        f"{results} results for one study routed {len(stable)} times: pxsgate scored it "
        f"again when its own SR came back (flags {flags})")
    assert len(srs) == 1, f"{len(srs)} SRs in Orthanc for one study"
    assert history[0]["id"] == first["id"]


def readme_lua() -> str:
    """The Orthanc routing rule README.md recommends (its only ```lua block)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [block] = [part.split("```", 1)[0] for part in readme.split("```lua\n")[1:]]
    return block


def test_orthanc_readme_routing_rule_sends_images_not_pxsgates_sr(tmp_path: Path) -> None:
    """The README's rule, as written there: each CR/DX image goes to pxsgate as it arrives;
    pxsgate's SR, stored into Orthanc by the exporter, does not come back."""
    study = ap_study(72, "ORTHRULE")
    uid = str(study[0].StudyInstanceUID)
    with pxsgate_and_orthanc(tmp_path, lua=readme_lua()) as pair:
        orthanc = pair.orthanc
        assert orthanc.upload(encode(study[0]))["Status"] == "Success"
        first = pair.svc.wait_for([uid], timeout=45)[uid]
        assert first["status"] == "SUCCEEDED", first["errorMessage"]
        [sr] = poll(lambda: orthanc.instances_of(uid, "SR"), 30, "the SR in Orthanc")
        time.sleep(STABLE_AGE + 2 * SETTLE + 1)  # time enough for a rule that would route it
        received = [i["sop_instance_uid"] for i in pair.study(uid)["instances"]]
    assert received == [str(study[0].SOPInstanceUID)]
    assert sr["SOPInstanceUID"] not in received
    assert len(pair.history(uid)) == 1


# --- (b) JPEG 2000 from Orthanc scores like the uncompressed original ------------------------

# pxsgate takes uncompressed data only as Implicit VR Little Endian here: Orthanc then cannot
# send its Explicit VR Little Endian copy as it is, and its C-STORE SCU transcodes it to its
# DicomScuPreferredTransferSyntax, JPEG 2000 lossless (Orthanc 1.10 has no "Transcode" option
# for /modalities/{id}/store: it ignores one).
IMPLICIT_AND_J2K = f"""    transfer-syntaxes:
      - "{ImplicitVRLittleEndian}"
      - "{JPEG2000_LOSSLESS}\""""


def test_orthanc_jpeg2000_transcoded_study_scores_like_uncompressed(tmp_path: Path) -> None:
    original = ap_study(72, "ORTHJ2K", images=2)
    direct, copy_of = reuid(original, "direct")
    for ds in direct:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    uid, direct_uid = str(original[0].StudyInstanceUID), str(direct[0].StudyInstanceUID)
    assert uid != direct_uid

    with pxsgate_and_orthanc(tmp_path, export_sr=False, extra_scp=IMPLICIT_AND_J2K,
                             scu_preferred_syntax=JPEG2000_LOSSLESS) as pair:
        # The uncompressed copy, straight to pxsgate; then the original through Orthanc.
        assert send_datasets("127.0.0.1", pair.svc.port, direct, calling_ae="MODALITY").ok
        direct_doc = pair.svc.wait_for([direct_uid], timeout=45)[direct_uid]
        study_id = None
        for ds in original:
            answer = pair.orthanc.upload(encode(ds))
            assert answer["Status"] == "Success"
            study_id = answer["ParentStudy"]
        assert study_id is not None
        [stored] = {pair.orthanc.transfer_syntax(i["ID"])
                    for i in pair.orthanc.study_instances(study_id)}
        assert stored == "1.2.840.10008.1.2.1", "Orthanc keeps what it was given"
        job = pair.orthanc.store("pxsgate", [study_id])
        assert (job["InstancesCount"], job["FailedInstancesCount"]) == (len(original), 0)
        routed_doc = pair.svc.wait_for([uid], timeout=45)[uid]
        routed, plain = pair.study(uid)["instances"], pair.study(direct_uid)["instances"]
        paths = spool_paths(pair.svc.data_dir, [i["sop_instance_uid"] for i in routed])

    assert {(i["transfer_syntax_uid"], i["calling_ae"]) for i in routed} == {
        (JPEG2000_LOSSLESS, "ORTHANC")}, "what Orthanc sent arrived as JPEG 2000 lossless"
    assert {i["transfer_syntax_uid"] for i in plain} == {ImplicitVRLittleEndian}
    # Lossless: the very pixels of the original reached pxsgate's spool.
    for ds in original:
        received = pydicom.dcmread(paths[str(ds.SOPInstanceUID)])
        assert received.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
        assert np.array_equal(received.pixel_array, ds.pixel_array)

    assert routed_doc["status"] == direct_doc["status"] == "SUCCEEDED"
    routed_scores, direct_scores = scores(routed_doc), scores(direct_doc)
    assert len(routed_scores) == len(original)
    assert {copy_of[sop]: value for sop, value in routed_scores.items()} == direct_scores
    assert routed_doc["pxsgate"]["flags"] == direct_doc["pxsgate"]["flags"]


def spool_paths(data_dir: Path, sop_uids: list[str]) -> dict[str, Path]:
    """Where pxsgate spooled each instance (its SQLite store, read-only)."""
    db = sqlite3.connect(f"file:{data_dir / 'pxsgate.sqlite3'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(sop_uids))
        rows = db.execute("SELECT sop_instance_uid, path FROM instances "
                          f"WHERE sop_instance_uid IN ({marks})", sop_uids).fetchall()
    finally:
        db.close()
    return {uid: Path(path) for uid, path in rows}


# --- (c) a rescore's SR supersedes the first one ---------------------------------------------


def test_orthanc_rescore_sr_supersedes_the_first(tmp_path: Path) -> None:
    first_image, late_image = ap_study(73, "ORTHRESC", images=2)
    uid = str(first_image.StudyInstanceUID)
    with pxsgate_and_orthanc(tmp_path) as pair:
        orthanc = pair.orthanc
        assert send_datasets("127.0.0.1", pair.svc.port, [first_image]).ok
        doc1 = pair.svc.wait_for([uid], timeout=45)[uid]
        assert doc1["status"] == "SUCCEEDED", doc1["errorMessage"]
        [sr1] = poll(lambda: orthanc.instances_of(uid, "SR"), 30, "the first SR in Orthanc")

        # A late AP image of the same study: rescored, a second result, a second SR.
        assert send_datasets("127.0.0.1", pair.svc.port, [late_image]).ok
        poll(lambda: len(pair.history(uid)) == 2, 45, "the second result")
        later = poll(lambda: [t for t in orthanc.instances_of(uid, "SR")
                              if t["SOPInstanceUID"] != sr1["SOPInstanceUID"]],
                     30, "the second SR in Orthanc")
        assert len(later) == 1, f"{len(later) + 1} SRs for two results"
        [sr2_tags] = later
        sr1_file = pydicom.dcmread(BytesIO(orthanc.file(sr1["OrthancId"])))
        sr2 = pydicom.dcmread(BytesIO(orthanc.file(sr2_tags["OrthancId"])))
        history = pair.history(uid)

    assert history[0]["id"] == doc1["id"], "the first result stays in the history"
    assert "PredecessorDocumentsSequence" not in sr1_file, "the first SR supersedes nothing"
    assert sr2.SeriesInstanceUID == sr1_file.SeriesInstanceUID, "the rescore's SR joins the series"
    assert int(sr2.InstanceNumber) == int(sr1_file.InstanceNumber) + 1
    assert "PredecessorDocumentsSequence" in sr2, "(0040,A360) names the SR it supersedes"
    [predecessor] = sr2.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == uid
    [series] = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sr1_file.SeriesInstanceUID
    [ref] = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == sr1_file.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == sr1_file.SOPClassUID



# --- (d) an exporter whose calling AE title Orthanc does not know ------------------------------


def test_orthanc_unknown_exporter_ae_title_is_named_in_the_error(tmp_path: Path) -> None:
    """Orthanc (DicomAlwaysAllowStore off) accepts the association of a calling AE title it
    does not list and aborts it at the C-STORE: the delivery's error says what to check."""
    study = ap_study(73, "ORTHAET")
    uid = str(study[0].StudyInstanceUID)
    with pxsgate_and_orthanc(tmp_path, exporter_aet="STRANGER") as pair:
        assert send_datasets("127.0.0.1", pair.svc.port, study).ok
        assert pair.svc.wait_for([uid], timeout=45)[uid]["status"] == "SUCCEEDED"

        def failed() -> str:
            out = pxsgate("outbox", "list", "--json", "--config", pair.svc.config).stdout
            rows: list[dict[str, Any]] = json.loads(out)
            return next((str(r["last_error"]) for r in rows if r["last_error"]), "")
        error = poll(failed, 30, "a failed delivery")
        assert not pair.orthanc.instances_of(uid, "SR")
    assert "aborted before the C-STORE response" in error
    assert "calling AE title it does not know" in error
    assert "lists STRANGER" in error


# --- (e) the SR into a DICOMweb archive by STOW-RS ---------------------------------------------


def dicomweb_exporter(url: str) -> str:
    return f"""exporters:
  - name: archive
    type: dicomweb
    url: {url}
    timeout-seconds: 10
    max-attempts: 2
    backoff-initial-seconds: 0.2
    backoff-max-seconds: 1
"""


def test_orthanc_dicomweb_exporter_stores_the_sr_by_stow_rs(tmp_path: Path) -> None:
    """Orthanc's DICOMweb plugin as the archive: the SR arrives by STOW-RS, the same
    instance the dicom exporter would C-STORE (its UID derived from the result and the
    exporter). An exporter aimed at a path that is no STOW-RS service (HTTP 404) is dead
    at once, with the answer in its error."""
    plugin = orthanc_dicomweb_plugin()
    study = ap_study(74, "ORTHSTOW")
    uid = str(study[0].StudyInstanceUID)
    with orthanc_server(tmp_path / "orthanc", extra={
            "Plugins": [str(GDCM_PLUGIN), str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}) as orthanc:
        base = f"http://127.0.0.1:{orthanc.http_port}"
        exporters = dicomweb_exporter(f"{base}/dicom-web") + dicomweb_exporter(
            f"{base}/not-dicom-web").replace("exporters:\n", "").replace("archive", "wrong")
        (tmp_path / "pxsgate").mkdir()
        svc = start_service(tmp_path / "pxsgate", settle=SETTLE, extra=exporters)
        try:
            assert send_datasets("127.0.0.1", svc.port, study).ok
            doc = svc.wait_for([uid], timeout=45)[uid]
            assert doc["status"] == "SUCCEEDED", doc["errorMessage"]
            [sr] = poll(lambda: orthanc.instances_of(uid, "SR"), 30, "the SR in Orthanc")

            def settled() -> list[dict[str, Any]] | None:
                rows: list[dict[str, Any]] = json.loads(pxsgate(
                    "outbox", "list", "--json", "--config", svc.config).stdout)
                done = len(rows) == 2 and all(r["state"] != "pending" for r in rows)
                return rows if done else None

            deliveries = poll(settled, 30, "both deliveries settled")
        finally:
            assert stop_service(svc) == 0
        sr_file = pydicom.dcmread(BytesIO(orthanc.file(sr["OrthancId"])))

    states = {d["exporter"]: d for d in deliveries}
    assert states["archive"]["state"] == "delivered"
    assert states["wrong"]["state"] == "dead"
    assert states["wrong"]["attempts"] == 1, "a 404 is not tried again"
    assert "HTTP 404" in states["wrong"]["last_error"]
    assert sr_file.SOPInstanceUID == uid_from_id(f"{doc['id']}/archive/sr")
    assert sr_file.StudyInstanceUID == uid
    assert sr_file.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


# --- (e) the score as an image any viewer shows ------------------------------------------------


def test_orthanc_secondary_capture_files_into_the_study_and_renders(tmp_path: Path) -> None:
    """objects: [sr, secondary-capture]: the SC joins the study in Orthanc (the router sent
    the image there too), Orthanc renders it, dciodvfy finds no error, its picture is the
    exact model input under the burned-in score, and a rescore's SC is the next in its
    series."""
    from pxsgate.preprocess import preprocess_file

    from .test_dciodvfy import unexpected_errors

    first_image, late_image = ap_study(74, "ORTHSC", images=2)
    uid = str(first_image.StudyInstanceUID)
    source = tmp_path / "first.dcm"
    source.write_bytes(encode(first_image))
    with pxsgate_and_orthanc(tmp_path, objects="[sr, secondary-capture]") as pair:
        orthanc = pair.orthanc
        assert orthanc.upload(source)["Status"] == "Success"
        assert send_datasets("127.0.0.1", pair.svc.port, [first_image]).ok
        doc = pair.svc.wait_for([uid], timeout=45)[uid]
        assert doc["status"] == "SUCCEEDED", doc["errorMessage"]
        [sc1] = poll(lambda: orthanc.instances_of(uid, "OT"), 30, "the SC in Orthanc")
        study_id = orthanc.study_id(uid)
        assert study_id is not None
        in_study = {i["ID"] for i in orthanc.study_instances(study_id)}
        preview = orthanc.request("GET", f"/instances/{sc1['OrthancId']}/preview")
        sc1_file = tmp_path / "sc1.dcm"
        sc1_file.write_bytes(orthanc.file(sc1["OrthancId"]))
        poll(lambda: orthanc.instances_of(uid, "SR"), 30, "the SR in Orthanc")

        assert send_datasets("127.0.0.1", pair.svc.port, [late_image]).ok
        poll(lambda: len(pair.history(uid)) == 2, 45, "the second result")
        later = poll(lambda: [t for t in orthanc.instances_of(uid, "OT")
                              if t["SOPInstanceUID"] != sc1["SOPInstanceUID"]],
                     30, "the second SC in Orthanc")

    assert sc1["OrthancId"] in in_study, "filed into the study"
    assert len(in_study) >= 2, "beside the image the router sent"
    assert preview[:8] == b"\x89PNG\r\n\x1a\n", "Orthanc renders it"
    assert not unexpected_errors(sc1_file, "1.2.840.10008.5.1.4.1.1.7")
    sc = pydicom.dcmread(sc1_file)
    assert sc.StudyInstanceUID == uid
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription.startswith("PXS score image")
    assert doc["pxsgate"]["headline"]["value"] in sc.ImageComments
    pixels = sc.pixel_array
    band = pixels.shape[0] - 640
    assert band > 0, "a text band above the image"
    assert pixels[:band].max() == 255, "text burned into the band"
    # Below the band: the exact model input, each pixel shown 2x2.
    model_input = preprocess_file(source)
    np.testing.assert_array_equal(pixels[band:][::2, ::2], model_input)
    np.testing.assert_array_equal(pixels[band:][1::2, 1::2], model_input)
    [sc2] = later
    assert sc2["SeriesInstanceUID"] == sc1["SeriesInstanceUID"], "its own series, continued"
    assert int(sc2["InstanceNumber"]) == int(sc1["InstanceNumber"]) + 1
