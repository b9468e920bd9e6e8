"""The PXS Structured Report: built from real radiograph headers, sent to a real DCMTK
storescp, read back as a PACS would, and compared with the result document."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from pxsgate.delivery.sr import (
    PXS_SCORE,
    SendError,
    SrError,
    build_pxs_sr,
    send_dataset,
    uid_from_id,
)
from pxsgate.errors import ExportError, PermanentExportError

from .conftest import SAMPLES, dcmtk, free_port

UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
DEMO_DESCRIPTION = "PXS score model on chest x-rays (demonstration weights, not for clinical use)"
RESULT_ID = "5f0c8a7e-2b1d-4c3e-9f00-6a7b8c9d0e1f"
DELIVERY_ID = "delivery-7d2e-0001"


def _header(name: str) -> Dataset:
    return pydicom.dcmread(SAMPLES / name, stop_before_pixels=True)


@pytest.fixture
def sources() -> list[Dataset]:
    """Two real CR headers made into one study of one patient, as a portable-chest study
    with two AP images is."""
    first, second = _header("RG2_JPLL.dcm"), _header("RG1_J2KI.dcm")
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        setattr(second, keyword, first.get(keyword))
    return [first, second]


def _result(source: Dataset, value: str) -> dict[str, Any]:
    ref = [{"refSeriesInstanceUid": str(source.SeriesInstanceUID),
            "refSopInstanceUid": [str(source.SOPInstanceUID)]}]
    return {"code": "partners.clara.pxs.score", "value": value, "description": "PXS Score",
            "derivedFrom": ref, "presentOn": ref, "refEntities": []}


def _document(sources: list[Dataset], values: tuple[str, ...] = ("0.160909", "2.75"), *,
              description: str = "PXS score model on chest x-rays",
              flags: tuple[str, ...] = (), status: str = "SUCCEEDED") -> dict[str, Any]:
    headline = sources[0]
    return {
        "version": "0.2.4", "id": RESULT_ID, "status": status,
        "studyInstanceUid": str(headline.StudyInstanceUID),
        "patientId": str(headline.PatientID), "accessionNumber": "", "siteId": "Hospital",
        "createdAt": "2026-11-26T10:00:01.123+00:00",
        "updatedAt": "2026-11-26T10:00:01.456+00:00",
        "exitCode": 0, "errorMessage": "",
        "model": {"id": "PxsScore-0.1", "name": "PxsScore", "displayName": "PxsScore",
                  "version": "0.1", "author": "Data Science", "description": description,
                  "weightsSha256": "ab12" * 16, "anchorCount": 10},
        "results": [_result(src, value) for src, value in zip(sources, values, strict=False)],
        "entities": [],
        "pxsgate": {"version": "0.1.0", "flags": list(flags),
                    "headline": {"sopInstanceUid": str(headline.SOPInstanceUID),
                                 "value": values[0]}},
    }


def _build(document: dict[str, Any], sources: list[Dataset]) -> Dataset:
    return build_pxs_sr(document, sources, sop_instance_uid=uid_from_id(DELIVERY_ID),
                        series_instance_uid=uid_from_id(RESULT_ID), device_serial="gw-01")


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _comments(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in sr.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]


# --- a real storage SCP ----------------------------------------------------------------------


@contextlib.contextmanager
def _storescp(out: Path, *extra: str, port: int | None = None) -> Iterator[int]:
    """DCMTK's storescp (by absolute path: pynetdicom ships a namesake) on ``port`` or a free
    one, AE title PACS, writing what it receives into ``out``; killed on exit."""
    out.mkdir()
    port = port or free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(out), "-dhl", "-ta", "10", "-td", "10",
         *extra, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"storescp exited ({proc.returncode}): "
                                     f"{proc.stdout.read() if proc.stdout else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("storescp did not listen within 15 s") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes the pipe


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.dcmtk
def test_sr_round_trip_through_storescp(sources: list[Dataset], tmp_path: Path) -> None:
    document = _document(sources)
    sr = _build(document, list(reversed(sources)))  # sources in any order
    _encode(sr)  # a valid Part 10 file: file meta complete, little endian

    with _storescp(tmp_path / "pacs") as port:
        status = send_dataset(sr, host="127.0.0.1", port=port, called_ae="PACS",
                              calling_ae="PXSGATE", timeout=10)
    assert status == 0x0000
    received = list((tmp_path / "pacs").iterdir())
    assert len(received) == 1

    raw = pydicom.dcmread(received[0])
    headline = sources[0]
    assert raw.SOPClassUID == ComprehensiveSRStorage
    assert raw.SOPInstanceUID == uid_from_id(DELIVERY_ID)
    assert raw.SeriesInstanceUID == uid_from_id(RESULT_ID)
    assert raw.StudyInstanceUID == headline.StudyInstanceUID
    assert raw.PatientID == headline.PatientID
    assert raw.PatientName == headline.PatientName
    assert raw.StudyDate == headline.StudyDate
    assert raw.Modality == "SR"
    assert raw.SeriesDescription == "PXS score"
    assert _comments(raw) == []
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {ref.ReferencedSOPInstanceUID
                for study in raw.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == {str(src.SOPInstanceUID) for src in sources}

    # DCMTK's SR reader checks the Comprehensive SR relationship constraints and aborts on
    # invalid content items.
    dump = subprocess.run([dcmtk("dsrdump"), "+Pu", "+Pl", str(received[0])],
                          capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert not re.search(r"^[EW]:", dump.stderr, re.MULTILINE), dump.stderr
    assert all(str(src.SOPInstanceUID) in dump.stdout for src in sources)

    parsed = hd.sr.srread(received[0])
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    assert isinstance(parsed.content, hd.sr.MeasurementReport)
    groups = parsed.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group, result, source in zip(groups, document["results"], sources, strict=True):
        assert group.tracking_uid is not None
        assert group.finding_sites[0].value == codes.SCT.Lung
        (measurement,) = group.get_measurements(name=PXS_SCORE)
        assert measurement.value == float(result["value"])
        (image,) = measurement.referenced_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID
    assert len({g.tracking_uid for g in groups}) == 2


def test_demo_weights_and_flags_are_visible(sources: list[Dataset]) -> None:
    document = _document(sources, description=DEMO_DESCRIPTION, flags=("multiple-ap-images",))
    sr = _build(document, sources)
    assert sr.SeriesDescription == "PXS score (demonstration weights, not for clinical use)"
    comments = _comments(sr)
    assert any("NOT FOR CLINICAL USE" in c for c in comments)
    assert "Review flags: multiple-ap-images" in comments


def test_algorithm_identification(sources: list[Dataset]) -> None:
    sr = hd.sr.ComprehensiveSR.from_dataset(_build(_document(sources[:1]), sources))
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    (group,) = sr.content.get_image_measurement_groups()
    (measurement,) = group.get_measurements()
    names = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in measurement[0].ContentSequence if item.ValueType == "TEXT"}
    assert names["Algorithm Name"] == "PxsScore"
    assert names["Algorithm Version"] == "0.1"


def test_rebuild_is_identical_and_leaves_sources_alone(sources: list[Dataset]) -> None:
    del sources[0].AccessionNumber  # Type 2, yet left out by some modalities
    before = [copy.deepcopy(src) for src in sources]
    first = _encode(_build(_document(sources), sources))
    time.sleep(0.01)
    assert _encode(_build(_document(sources), sources)) == first
    assert sources == before


@pytest.mark.filterwarnings("ignore:The value length")  # its hashed accession number
def test_messy_real_header() -> None:
    """966_fixed.dcm, a real DX header: hashed birth date (not a date), one-component name."""
    source = _header("966_fixed.dcm")
    del source.PatientSex
    sr = _build(_document([source], ("1.25",)), [source])
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert not sr.PatientBirthDate  # not a date: left empty rather than copied
    assert "PatientSex" not in source


@pytest.mark.parametrize("change", ["failed", "no-results", "missing-source", "other-study",
                                    "bad-value"])
def test_unusable_document_raises(sources: list[Dataset], change: str) -> None:
    document = _document(sources)
    given = sources
    if change == "failed":
        document.update(status="FAILED", exitCode=3, errorMessage="model error")
    elif change == "no-results":
        document["results"] = []
    elif change == "missing-source":
        given = sources[:1]
    elif change == "other-study":
        document["studyInstanceUid"] = "1.2.3.4"
    else:
        document["results"][1]["value"] = "n/a"
    with pytest.raises(SrError) as raised:
        _build(document, given)
    assert isinstance(raised.value, PermanentExportError)  # a retry builds the same nothing
    message = str(raised.value)
    assert str(sources[0].PatientID) not in message
    assert str(sources[0].PatientName) not in message
    # No UIDs either: these messages reach the logs and `pxsgate status`.
    assert str(sources[1].SOPInstanceUID) not in message
    assert str(sources[0].StudyInstanceUID) not in message
    if change == "missing-source":
        assert "no source image header for result 2" in message


def test_uid_from_id() -> None:
    ids = ["5f0c8a7e-2b1d-4c3e-9f00-6a7b8c9d0e1f", "delivery-1", "delivery-2", "", "x" * 500]
    uids = [uid_from_id(i) for i in ids]
    assert uids == [uid_from_id(i) for i in ids]
    assert len(set(uids)) == len(ids)
    for uid in uids:
        assert UID_SYNTAX.match(uid), uid
        assert len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid


def test_send_to_closed_port_raises_promptly(sources: list[Dataset]) -> None:
    sr = _build(_document(sources), sources)
    port = free_port()  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(SendError, match=f"PACS@127.0.0.1:{port}") as raised:
        send_dataset(sr, host="127.0.0.1", port=port, called_ae="PACS", calling_ae="PXSGATE",
                     timeout=5)
    assert time.monotonic() - started < 5
    # Retryable, and a ConnectionError to code that knows nothing of pxsgate.
    assert isinstance(raised.value, ExportError)
    assert not isinstance(raised.value, PermanentExportError)
    assert isinstance(raised.value, ConnectionError)


@pytest.mark.dcmtk
@pytest.mark.parametrize(("flags", "what"), [
    (("--refuse",), "was rejected"),
    (("--abort-after",), "aborted before the C-STORE response"),
    (("--sleep-during", "10"), "no C-STORE response .* within 1.5 s"),
], ids=["rejects", "aborts", "silent"])
def test_failing_peer_raises(sources: list[Dataset], tmp_path: Path, flags: tuple[str, ...],
                             what: str) -> None:
    sr = _build(_document(sources), sources)
    with _storescp(tmp_path / "pacs", *flags) as port, pytest.raises(SendError, match=what):
        send_dataset(sr, host="127.0.0.1", port=port, called_ae="PACS", calling_ae="PXSGATE",
                     timeout=1.5)


def test_stow_rs_failure_reasons_are_read_from_the_store_instances_response() -> None:
    """PS3.18 10.5.3: a 202 or 409 answer lists each failed instance with its reason."""
    from pxsgate.delivery.dicomweb import failure_reason, multipart_related, stored

    answer = json.dumps({
        "00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.33"]},
             "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
             "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.5"]}}]},
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.6"]}}]},
    }).encode()
    assert failure_reason(answer, "1.2.3.4") == 0xA700
    assert failure_reason(answer, "1.2.3.5") == 0, "listed without a reason"
    assert failure_reason(answer, "1.2.3.6") is None, "stored"
    assert failure_reason(b"<html>busy</html>", "1.2.3.4") is None
    assert failure_reason(b"[" + answer + b"]", "1.2.3.4") == 0xA700
    assert stored(answer, "1.2.3.6")
    assert not stored(answer, "1.2.3.4")
    odd = json.dumps({"00081198": {"Value": [{"00081155": {"Value": "1.2.3.4"}}]},
                      "00081199": "x"}).encode()
    assert failure_reason(odd, "1.2.3.4") is None, "a UID string is no list: no substring match"
    assert not stored(odd, "1.2.3.4")

    body, content_type = multipart_related([b"DICM-one", b"DICM-two"])
    boundary = content_type.split("boundary=")[1]
    assert content_type.startswith('multipart/related; type="application/dicom"; ')
    assert body.startswith(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    assert body.count(f"--{boundary}\r\n".encode()) == 2
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
