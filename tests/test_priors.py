"""Priors from PACS (issue 20) against a real Orthanc (Debian's, DIMSE Q/R SCP and its
DICOMweb plugin): a patient's prior exam is in Orthanc only; the current exam is sent to
pxsgate; its result carries the change against the prior fetched from Orthanc, by C-GET,
C-MOVE and QIDO-RS/WADO-RS; the fetched prior makes no result and no export; the patient's
next study needs no query; a PACS that hangs or refuses never holds a result back."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from pxsgate import change
from pxsgate.preprocess import preprocess_file

from .conftest import free_port, pxsgate
from .inprocess import gateway, result_of, send, stand_in_embedding
from .orthanc import DICOMWEB_PLUGIN, GDCM_PLUGIN, Orthanc, orthanc_dicomweb_plugin, orthanc_server
from .test_change import change_of, visit
from .test_results import assert_valid

# Orthanc writes what its Lua callback prints to its log: one line per C-FIND it answers.
COUNT_FINDS = """
function IncomingFindRequestFilter(query, origin)
  print('PXSGATE-TEST C-FIND from ' .. origin['RemoteAet'])
  return query
end
"""
CALLING_AE = "PXSGATE"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    orthanc_dicomweb_plugin()
    with orthanc_server(
            tmp_path / "orthanc", lua=COUNT_FINDS,
            modalities={"pxsgate-scu": (CALLING_AE, "127.0.0.1", free_port())},
            extra={"Plugins": [str(GDCM_PLUGIN), str(DICOMWEB_PLUGIN)],
                   "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}) as orthanc:
        yield orthanc


def finds(orthanc: Orthanc) -> int:
    return orthanc.log_path.read_text(errors="replace").count("PXSGATE-TEST C-FIND")


def priors_yaml(orthanc: Orthanc, flavour: str, *, wait: float = 30, port: int | None = None
                ) -> str:
    if flavour == "dicomweb":
        source = (f"    type: dicomweb\n"
                  f"    url: http://127.0.0.1:{orthanc.http_port}/dicom-web\n")
    else:
        source = (f"    type: dimse\n    host: 127.0.0.1\n"
                  f"    port: {port or orthanc.dicom_port}\n"
                  f"    ae-title: {orthanc.aet}\n    calling-ae-title: {CALLING_AE}\n"
                  f"    retrieve: {flavour}\n")
    return (f"priors:\n  enabled: true\n  wait-seconds: {wait}\n  max-studies: 2\n"
            f"  source:\n{source}    timeout-seconds: 10\n"
            "exporters:\n  - name: results\n    type: http\n"
            "    url: http://127.0.0.1:9/results\n    max-attempts: 1\n")


def put_in_pacs(orthanc: Orthanc, tmp: Path, ds: Dataset) -> Path:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    orthanc.upload(path)
    return path


def rows(gw: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(gw.config.db_path) as db:
        return db.execute(sql, args).fetchall()


@pytest.mark.parametrize("flavour", ["c-get", "c-move", "dicomweb"])
async def test_the_prior_comes_from_the_pacs(tmp_path: Path, pacs: Orthanc,
                                            flavour: str) -> None:
    prior = visit(31, 1, "20200101", severity=0.6)
    lateral = visit(31, 1, "20200101", view="LL")  # the prior's other image: not picked
    lateral.SOPInstanceUID, lateral.SeriesInstanceUID = generate_uid(), generate_uid()
    prior_file = put_in_pacs(pacs, tmp_path, prior)
    put_in_pacs(pacs, tmp_path, lateral)
    other_patient = visit(32, 1, "20200115")
    put_in_pacs(pacs, tmp_path, other_patient)
    current, later = visit(31, 2, "20200301"), visit(31, 3, "20200401", severity=0.3)

    async with gateway(tmp_path, extra=priors_yaml(pacs, flavour)) as (gw, _):
        if flavour == "c-move":  # the PACS sends the C-MOVE's instances to pxsgate's SCP
            pacs.request("PUT", "/modalities/pxsgate", (
                f'{{"AET": "PxsScore", "Host": "127.0.0.1", "Port": {gw.port}}}').encode())
        await send(gw, [current])
        doc = await result_of(gw, str(current.StudyInstanceUID))
        assert_valid(doc)
        lookup = doc["pxsgate"]["priorLookup"]
        assert lookup["outcome"] == "found", lookup
        entry = change_of(doc)
        assert entry is not None, doc
        found = entry["change"]
        assert found["priorSource"] == "pacs"
        assert found["priorStudyInstanceUid"] == prior.StudyInstanceUID
        assert found["priorSopInstanceUid"] == prior.SOPInstanceUID, "the AP image"
        assert found["priorStudyDate"] == "2020-01-01T08:00:00"
        assert found["intervalDays"] == 60.0
        # The distance is the one between the two images' embeddings, each computed here
        # from its file with the service's preprocessing and the same stand-in model.
        path = (await gw.store.instance_paths([str(current.SOPInstanceUID)]))[
            str(current.SOPInstanceUID)]
        expected = change.distance(
            change.pack(stand_in_embedding(preprocess_file(path))),
            change.pack(stand_in_embedding(preprocess_file(prior_file))), 21)
        assert found["distance"] == pytest.approx(expected, abs=1e-9)

        # The fetched prior is no study of pxsgate's: no result, no instance, no delivery;
        # its files are gone once embedded; its embedding stays.
        assert rows(gw, "SELECT DISTINCT study_instance_uid FROM results") == [
            (str(current.StudyInstanceUID),)]
        assert rows(gw, "SELECT count(*) FROM instances WHERE study_instance_uid = ?",
                    str(prior.StudyInstanceUID)) == [(0,)]
        assert rows(gw, "SELECT count(*) FROM deliveries") == [(1,)]
        assert rows(gw, "SELECT study_instance_uid, sop_instance_uid FROM fetched_priors"
                    ) == [(str(prior.StudyInstanceUID), str(prior.SOPInstanceUID))]
        assert not any(gw.config.priors_dir.rglob("*.dcm"))
        queried = finds(pacs) if flavour != "dicomweb" else None

        # The patient's next study: its prior is the study pxsgate just scored; the PACS
        # is not asked again.
        await send(gw, [later])
        second = await result_of(gw, str(later.StudyInstanceUID))
        assert_valid(second)
        assert "priorLookup" not in second["pxsgate"]
        again = change_of(second)
        assert again is not None
        trace = await asyncio.to_thread(pxsgate, "trace", str(current.StudyInstanceUID),
                                        "--config", tmp_path / "pxsgate.yaml")
        assert "(fetched from the PACS)" in trace.stdout
        assert "found after" in trace.stdout
        assert again["change"]["priorSource"] == "pxsgate"
        assert again["change"]["priorStudyInstanceUid"] == current.StudyInstanceUID
        if queried is not None:
            assert queried == 1, pacs.log_tail()
            assert finds(pacs) == 1, "no second C-FIND"


async def test_a_patient_the_pacs_does_not_know(tmp_path: Path, pacs: Orthanc) -> None:
    current = visit(33, 2, "20200301")
    async with gateway(tmp_path, extra=priors_yaml(pacs, "c-get")) as (gw, _):
        await send(gw, [current])
        doc = await result_of(gw, str(current.StudyInstanceUID))
    assert_valid(doc)
    assert doc["pxsgate"]["priorLookup"]["outcome"] == "none-found"
    assert change_of(doc) is None


async def test_a_pacs_that_hangs_holds_no_result_back(tmp_path: Path, pacs: Orthanc) -> None:
    """Orthanc stopped (SIGSTOP: it accepts connections and never answers): the result is
    stored within wait-seconds, saying timeout."""
    put_in_pacs(pacs, tmp_path, visit(34, 1, "20200101"))
    current = visit(34, 2, "20200301")
    async with gateway(tmp_path, extra=priors_yaml(pacs, "c-get", wait=2)) as (gw, _):
        os.kill(pacs.process.pid, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            await send(gw, [current])
            doc = await result_of(gw, str(current.StudyInstanceUID), limit_s=20)
            waited = asyncio.get_running_loop().time() - started
        finally:
            os.kill(pacs.process.pid, signal.SIGCONT)
    assert_valid(doc)
    lookup = doc["pxsgate"]["priorLookup"]
    assert lookup["outcome"] == "timeout"
    assert 2 <= lookup["seconds"] < 3
    assert waited < 10
    assert change_of(doc) is None
    assert doc["status"] == "SUCCEEDED"


async def test_a_pacs_that_refuses(tmp_path: Path, pacs: Orthanc) -> None:
    """Nothing listens on the PACS's port (Orthanc down): refused, at once."""
    current = visit(35, 2, "20200301")
    extra = priors_yaml(pacs, "c-get", port=free_port())
    async with gateway(tmp_path, extra=extra) as (gw, _):
        await send(gw, [current])
        doc = await result_of(gw, str(current.StudyInstanceUID), limit_s=20)
    assert_valid(doc)
    lookup = doc["pxsgate"]["priorLookup"]
    assert lookup["outcome"] == "refused", lookup
    assert lookup["seconds"] < 5
    assert "detail" in lookup
    assert doc["status"] == "SUCCEEDED"
    trace = await asyncio.to_thread(pxsgate, "trace", str(current.StudyInstanceUID),
                                    "--config", tmp_path / "pxsgate.yaml")
    assert f"prior asked of {pacs.aet}@127.0.0.1:" in trace.stdout
    assert ": refused after " in trace.stdout


def test_a_retrieved_prior_file_is_the_one_in_the_pacs(tmp_path: Path, pacs: Orthanc) -> None:
    """The DICOMweb source writes what WADO-RS returned as Part-10 files pydicom reads."""
    from pxsgate.config import PriorSourceConfig
    from pxsgate.priors.source import DicomwebSource

    prior = visit(36, 1, "20200101")
    put_in_pacs(pacs, tmp_path, prior)
    source = DicomwebSource(PriorSourceConfig(
        type="dicomweb", url=f"http://127.0.0.1:{pacs.http_port}/dicom-web"))
    studies = source.find(str(prior.PatientID), None, "20200301")
    assert [s.study_instance_uid for s in studies] == [prior.StudyInstanceUID]
    into = tmp_path / "into"
    into.mkdir()
    assert source.retrieve(str(prior.StudyInstanceUID), into) == 1
    (got,) = into.iterdir()
    assert dcmread(got).SOPInstanceUID == prior.SOPInstanceUID


async def test_backfill_gives_stored_results_their_change(tmp_path: Path,
                                                          pacs: Orthanc) -> None:
    """A site that enabled priors late: results stored without a change get it, from a
    prior fetched from the PACS; the earlier result stays as history."""
    from io import StringIO

    from pxsgate.config import load_config
    from pxsgate.tools.backfill import backfill

    from .inprocess import FastModel

    prior = visit(37, 1, "20200101", severity=0.4)
    put_in_pacs(pacs, tmp_path, prior)
    current, alone = visit(37, 2, "20200301"), visit(38, 2, "20200301")
    async with gateway(tmp_path) as (gw, _):  # priors off
        await send(gw, [current])
        before = await result_of(gw, str(current.StudyInstanceUID))
        await send(gw, [alone])
        await result_of(gw, str(alone.StudyInstanceUID))
    assert change_of(before) is None

    config_path = tmp_path / "pxsgate.yaml"
    config_path.write_text(config_path.read_text() + priors_yaml(pacs, "c-get"))
    config = load_config(config_path)
    out = StringIO()
    tally = await backfill(config, out=out, scorer_factory=FastModel)
    assert (tally.results, tally.changed, tally.fetched, tally.no_prior) == (2, 1, 1, 1)
    assert "2/2 results" in out.getvalue()

    async with gateway(tmp_path) as (gw, _):
        after = await result_of(gw, str(current.StudyInstanceUID))
        history = rows(gw, "SELECT id, current FROM results WHERE study_instance_uid = ? "
                       "ORDER BY created_utc, rowid", str(current.StudyInstanceUID))
    assert_valid(after)
    assert after["id"] != before["id"]
    assert history == [(before["id"], 0), (after["id"], 1)]
    entry = change_of(after)
    assert entry is not None
    assert entry["change"]["priorSource"] == "pacs"
    assert entry["change"]["priorStudyInstanceUid"] == prior.StudyInstanceUID
    assert after["pxsgate"]["priorLookup"]["outcome"] == "found"
    assert after["results"][0] == before["results"][0], "the score is unchanged"
    # Again: nothing left to do for the patient with a prior; the other still has none.
    tally = await backfill(config, out=StringIO(), scorer_factory=FastModel)
    assert (tally.results, tally.changed) == (1, 0)
