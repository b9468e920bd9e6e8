"""End to end: real DICOM peers (pynetdicom and DCMTK) -> pxsgate serve -> SQLite -> CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from pxsgate.tools import synth
from pxsgate.tools.scu import echo, send_datasets

from .conftest import Service, dcmtk

CATH_OR_SCREENSHOT = ("cath-copy", "screenshot")


def _uid(study: synth.FeedStudy) -> str:
    return str(study.datasets[0].StudyInstanceUID)


def check_outcomes(feed: list[synth.FeedStudy], docs: dict[str, dict[str, Any]]) -> None:
    for study in feed:
        doc = docs[_uid(study)]
        if study.expected == "scored":
            assert doc["status"] == "SUCCEEDED", (study.key, doc["errorMessage"])
            assert doc["exitCode"] == 0
            used = [uid for r in doc["results"] for d in r["derivedFrom"]
                    for uid in d["refSopInstanceUid"]]
            assert used == list(study.expected_inputs), "headline (latest acquired) first"
            assert doc["pxsgate"]["headline"]["sopInstanceUid"] == study.expected_inputs[0]
            for r in doc["results"]:
                assert r["code"] == "partners.clara.pxs.score"
                assert float(r["value"]) > 0
            assert "not for clinical use" in doc["model"]["description"]
        else:
            assert doc["status"] == "SKIPPED", study.key
            assert doc["results"] == []
            assert doc["errorMessage"], "a skipped study says why"
        assert doc["pxsgate"]["flags"] == list(study.expected_flags), study.key


def test_echo_pynetdicom(service: Service) -> None:
    assert echo("127.0.0.1", service.port) == 0x0000


def test_echo_dcmtk(service: Service) -> None:
    result = subprocess.run([dcmtk("echoscu"), "-aec", "PxsScore", "127.0.0.1",
                             str(service.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_unknown_called_ae_is_rejected(service: Service) -> None:
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", service.port, ae_title="NOT-PXS")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive is not None
    assert (assoc.acceptor.primitive.result_source, assoc.acceptor.primitive.diagnostic) == (1, 7)


@pytest.fixture(scope="module")
def pynetdicom_feed(service: Service) -> tuple[list[synth.FeedStudy], dict[str, dict[str, Any]]]:
    feed = synth.hospital_feed(seed=101, rows=768, cols=640, prefix="PYNET")
    for study in feed:
        report = send_datasets("127.0.0.1", service.port, list(study.datasets),
                               calling_ae="RMS")
        assert report.ok, (study.key, report.statuses)
    return feed, service.wait_for([_uid(s) for s in feed])


def test_feed_over_pynetdicom(pynetdicom_feed: tuple[list[synth.FeedStudy], Any]) -> None:
    feed, docs = pynetdicom_feed
    check_outcomes(feed, docs)


def test_cath_copy_and_screenshot_are_not_used(
        pynetdicom_feed: tuple[list[synth.FeedStudy], dict[str, dict[str, Any]]]) -> None:
    feed, docs = pynetdicom_feed
    study = next(s for s in feed if len(s.datasets) == 3 and s.expected == "scored")
    doc = docs[_uid(study)]
    decisions = {d["sopInstanceUid"]: d for d in doc["pxsgate"]["selection"]["images"]}
    left_out = [d for d in decisions.values() if not d["selected"]]
    assert sorted(d["rule"] for d in left_out) == sorted(CATH_OR_SCREENSHOT)
    assert len(doc["results"]) == 1


def test_skipped_studies_say_why(
        pynetdicom_feed: tuple[list[synth.FeedStudy], dict[str, dict[str, Any]]]) -> None:
    feed, docs = pynetdicom_feed
    reasons = {s.key: docs[_uid(s)]["errorMessage"] for s in feed if s.expected == "skipped"}
    assert any("KNEE" in r for r in reasons.values()), reasons
    assert any("CT" in r for r in reasons.values()), reasons
    assert "names PA" in reasons["pa-lateral"], reasons


def test_results_filters(service: Service,
                         pynetdicom_feed: tuple[list[synth.FeedStudy], Any]) -> None:
    feed, _ = pynetdicom_feed
    study = feed[0]
    patient = str(study.datasets[0].PatientID)
    by_patient = service.results("--patient-id", patient)
    assert {d["studyInstanceUid"] for d in by_patient} == {_uid(study)}
    by_uid = service.results("--study-uid", _uid(study))
    assert len(by_uid) == 1
    assert by_uid[0]["patientId"] == patient
    skipped = service.results("--status", "SKIPPED")
    assert all(d["status"] == "SKIPPED" for d in skipped)
    assert skipped


def test_feed_over_dcmtk_storescu(service: Service, storescu: str, tmp_path: Path) -> None:
    feed = synth.hospital_feed(seed=202, rows=640, cols=640, prefix="DCMTK")
    files = synth.write_feed(feed, tmp_path)
    result = subprocess.run(
        [storescu, "-aet", "DCMTKSCU", "-aec", "PxsScore", "127.0.0.1", str(service.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    docs = service.wait_for([_uid(s) for s in feed])
    check_outcomes(feed, docs)
    received = [e for e in service.logs if e.get("event") == "instance.stored"]
    assert len(received) >= len(files)


def test_logs_carry_no_phi(service: Service,
                           pynetdicom_feed: tuple[list[synth.FeedStudy], Any]) -> None:
    feed, _ = pynetdicom_feed
    text = "\n".join(service.raw_log)
    for study in feed:
        for ds in study.datasets:
            assert str(ds.PatientID) not in text
            assert str(ds.PatientName) not in text
        assert _uid(study) not in text  # full study UIDs are not logged either


def test_flagged_results(service: Service,
                         pynetdicom_feed: tuple[list[synth.FeedStudy], Any]) -> None:
    feed, _ = pynetdicom_feed
    flagged = service.results("--flagged")
    expected = {_uid(s) for s in feed if s.expected_flags}
    assert expected, "the feed has a study to flag"
    assert expected <= {d["studyInstanceUid"] for d in flagged}
    assert all(d["pxsgate"]["flags"] for d in flagged)
