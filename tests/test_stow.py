"""STOW-RS ingress (PS3.18 10.5): Orthanc's DICOMweb plugin pushes a study, and hostile
requests (cut short, not DICOM, too large, another study, no credentials) get the standard's
answer and leave nothing half-stored. An in-process gateway (tests/inprocess.py) on
ephemeral loopback ports; requests by aiohttp and raw sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from pydicom import Dataset

from pxsgate.delivery.dicomweb import multipart_related
from pxsgate.service.gateway import Gateway
from pxsgate.stow import is_loopback
from pxsgate.tools import synth

from .conftest import free_port
from .inprocess import gateway, result_of
from .orthanc import GDCM_PLUGIN, orthanc_dicomweb_plugin, orthanc_server
from .test_lifecycle import ap_study
from .test_orthanc import encode
from .test_tls import make_pki

REFERENCED = "00081199"
FAILED = "00081198"
REASON = "00081197"
SOP_INSTANCE = "00081155"
SOP_CLASS = "00081150"
TOKEN = "s" * 40


class Client:
    """POSTs to one gateway's STOW-RS endpoint."""

    def __init__(self, gw: Gateway, port: int) -> None:
        self.gw = gw
        self.port = port
        self.url = f"http://127.0.0.1:{port}/dicomweb/studies"

    async def post(self, parts: list[bytes] | bytes, study: str | None = None,
                   content_type: str | None = None, headers: dict[str, str] | None = None,
                   ssl_context: ssl.SSLContext | None = None, scheme: str = "http"
                   ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        if isinstance(parts, bytes):
            body, ctype = parts, content_type or ""
        else:
            body, ctype = multipart_related(parts)
        url = self.url.replace("http", scheme, 1) + (f"/{study}" if study else "")
        async with aiohttp.ClientSession() as session, session.post(
                url, data=body, ssl=ssl_context or False,
                headers={"Content-Type": content_type or ctype, **(headers or {})}) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else {}), r.headers

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.gw.config.spool_dir.rglob("*") if p.is_file())

    def instance_rows(self) -> set[str]:
        db = sqlite3.connect(f"file:{self.gw.config.db_path}?mode=ro", uri=True)
        try:
            return {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
        finally:
            db.close()

    def assert_holds_exactly(self, sop_uids: set[str]) -> None:
        """The spool and the store hold these instances, and nothing else (no temporary
        file, no row of a failed part)."""
        files = self.spool_files()
        assert {p.name for p in files} == {f"{uid}.dcm" for uid in sop_uids}, files
        assert self.instance_rows() == sop_uids


def referenced(answer: dict[str, Any]) -> list[str]:
    return [item[SOP_INSTANCE]["Value"][0]
            for item in answer.get(REFERENCED, {}).get("Value", [])]


def failures(answer: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(SOP Instance UID or None, FailureReason) of each failed part."""
    return [(item.get(SOP_INSTANCE, {}).get("Value", [None])[0], item[REASON]["Value"][0])
            for item in answer.get(FAILED, {}).get("Value", [])]


def uid(ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def large_image(index: int, prefix: str) -> Dataset:
    """A 1024x1024 16-bit AP chest radiograph (2 MiB of pixel data)."""
    st = synth.make_study(index, seed=index, prefix=prefix, description="XR CHEST PORTABLE")
    px = synth.chest_radiograph(np.random.default_rng(index), rows=1024, cols=1024, view="AP")
    return synth.make_image_dataset(
        px, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=st,
        series_description="CHEST AP PORTABLE", view_position="AP", body_part="CHEST")


@pytest.fixture
async def stow(tmp_path: Path) -> AsyncIterator[Client]:
    """A gateway whose data sets may have 1 MB at most (max-dataset-mb), and whose
    requests 6 MB (stow-max-request-mb)."""
    port = free_port()
    async with gateway(tmp_path, http_port=port, extra_scp="    max-dataset-mb: 1",
                       http_extra="  stow-max-request-mb: 6\n") as (gw, _):
        yield Client(gw, port)


# --- a real peer: Orthanc's DICOMweb plugin -----------------------------------------------------


async def test_orthanc_pushes_a_study_by_stow_rs_and_it_is_scored(tmp_path: Path) -> None:
    plugin = orthanc_dicomweb_plugin()
    study = ap_study(81, "STOWORTH", images=2)
    study_uid = str(study[0].StudyInstanceUID)
    port = free_port()
    (tmp_path / "pxsgate").mkdir()
    async with gateway(tmp_path / "pxsgate", http_port=port) as (gw, _):
        extra = {"Plugins": [str(GDCM_PLUGIN), str(plugin)],
                 "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                     "pxsgate": [f"http://127.0.0.1:{port}/dicomweb/"]}}}
        with orthanc_server(tmp_path / "orthanc", extra=extra) as orthanc:
            for ds in study:
                await asyncio.to_thread(orthanc.upload, encode(ds))
            orthanc_study = await asyncio.to_thread(orthanc.study_id, study_uid)
            assert orthanc_study is not None
            # Blocking REST calls run on a thread: the gateway answers on this loop.
            await asyncio.to_thread(orthanc.post, "/dicom-web/servers/pxsgate/stow",
                                    {"Resources": [orthanc_study]})
            doc = await result_of(gw, study_uid, 30)
        assert doc["status"] == "SUCCEEDED", doc.get("errorMessage")
        detail = await gw.store.study_detail(study_uid)
        assert detail is not None
        senders = {(i["calling_ae"], i["association_id"]) for i in detail["instances"]}
        assert {ae for ae, _ in senders} == {"STOW-RS"}
        assert all(assoc.startswith("stow-") for _, assoc in senders)
        assert gw.metrics.stow_instances.labels(outcome="stored")._value.get() == 2


# --- the answers of the standard -----------------------------------------------------------------


async def test_all_stored_is_200_with_the_referenced_sequence(stow: Client) -> None:
    study = ap_study(82, "STOWOK", images=2)
    status, answer, headers = await stow.post([encode(ds) for ds in study])
    assert status == 200
    assert headers["Content-Type"].startswith("application/dicom+json")
    assert sorted(referenced(answer)) == sorted(uid(ds) for ds in study)
    assert FAILED not in answer
    item = answer[REFERENCED]["Value"][0]
    assert item[SOP_CLASS]["Value"] == [synth.CR_IMAGE_STORAGE]
    assert "00081190" in item  # RetrieveURL: type 2, empty
    assert "00081190" in answer
    stow.assert_holds_exactly({uid(ds) for ds in study})


async def test_mixed_request_is_202_with_both_sequences(stow: Client) -> None:
    [good] = ap_study(83, "STOWMIX")
    status, answer, headers = await stow.post([encode(good), b"\x00" * 200 + b"not DICOM"])
    assert status == 202
    assert referenced(answer) == [uid(good)]
    assert failures(answer) == [(None, 0xC210)]
    assert "not a DICOM file" in headers["Warning"]
    stow.assert_holds_exactly({uid(good)})
    stored = stow.gw.metrics.stow_instances
    assert stored.labels(outcome="stored")._value.get() == 1
    assert stored.labels(outcome="failed")._value.get() == 1


async def test_non_dicom_parts_fail_and_none_stored_is_409(stow: Client) -> None:
    [ds] = ap_study(84, "STOWJUNK")
    text_part = (b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
    garbage = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00" * 128 + b"DICM" \
        + b"\xff" * 300 + b"\r\n"
    body = text_part + garbage + b"--b--\r\n"
    status, answer, _ = await stow.post(
        body, content_type='multipart/related; type="application/dicom"; boundary=b')
    assert status == 409
    assert [reason for _, reason in failures(answer)] == [0xC210, 0xC210]
    assert REFERENCED not in answer
    stow.assert_holds_exactly(set())
    # The wrong media type for the whole request.
    status, answer, _ = await stow.post(encode(ds), content_type="application/dicom")
    assert status == 415
    status, _, _ = await stow.post(
        body, content_type='multipart/related; type="application/dicom+xml"; boundary=b')
    assert status == 415
    stow.assert_holds_exactly(set())


async def test_oversize_part_fails_with_out_of_resources(stow: Client) -> None:
    big = large_image(85, "STOWBIG")
    [small] = ap_study(86, "STOWSMALL")
    status, answer, _ = await stow.post([encode(big), encode(small)])
    assert status == 202
    assert failures(answer) == [(None, 0xA700)]
    assert referenced(answer) == [uid(small)]
    stow.assert_holds_exactly({uid(small)})
    # The whole body is bounded too: a Content-Length over stow-max-request-mb is refused
    # before anything is read, a chunked one where it crosses the limit.
    status, _, _ = await stow.post([encode(small), b"\x00" * (7 * 2**20)])
    assert status == 413
    body, ctype = multipart_related([encode(large_image(87 + i, "STOWMANY")) for i in range(4)]
                                    )

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 2**20):
            yield body[start:start + 2**20]

    async with aiohttp.ClientSession() as session, session.post(
            stow.url, data=chunked(), headers={"Content-Type": ctype}) as r:
        # Each part is over max-dataset-mb; the body is cut off at 6 MB.
        assert r.status == 409
        answer = await r.json(content_type=None)
    assert {reason for _, reason in failures(answer)} == {0xA700}
    stow.assert_holds_exactly({uid(small)})


async def test_truncated_multipart_body_keeps_only_whole_parts(stow: Client) -> None:
    first, second = ap_study(88, "STOWCUT", images=2)
    body, ctype = multipart_related([encode(first), encode(second)])
    cut = body[:len(body) - 5000]  # the second part loses its end and the closing boundary
    status, answer, _ = await stow.post(cut, content_type=ctype)
    assert status == 202
    assert referenced(answer) == [uid(first)]
    assert failures(answer) == [(None, 0xC210)]
    stow.assert_holds_exactly({uid(first)})
    # Cut in the first part: nothing stored, a malformed body.
    status, answer, _ = await stow.post(body[:3000], content_type=ctype)
    assert status == 400
    stow.assert_holds_exactly({uid(first)})


async def test_peer_gone_mid_body_releases_what_was_stored(stow: Client) -> None:
    """A raw socket sends one whole part and half of the next, then closes: the first is
    stored, nothing of the second is, and the request's end releases the study (it is
    scored after the settle time, without waiting for the quiet timeout)."""
    first, second = ap_study(89, "STOWGONE", images=2)
    body, ctype = multipart_related([encode(first), encode(second)])
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    _, writer = await asyncio.open_connection("127.0.0.1", stow.port)
    writer.write(head)
    sent = body[:len(body) - len(encode(second)) // 2]
    for start in range(0, len(sent), 16384):  # as a sender sends: a piece at a time
        writer.write(sent[start:start + 16384])
        await writer.drain()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # the first part is stored while the connection is open
    writer.close()
    await writer.wait_closed()
    doc = await result_of(stow.gw, str(first.StudyInstanceUID), 20)
    assert doc["status"] == "SUCCEEDED"
    stow.assert_holds_exactly({uid(first)})


async def test_part_of_another_study_than_the_path_fails(stow: Client) -> None:
    [mine] = ap_study(90, "STOWPATH")
    [other] = ap_study(91, "STOWOTHER")
    study_uid = str(mine.StudyInstanceUID)
    status, answer, _ = await stow.post([encode(mine), encode(other)], study=study_uid)
    assert status == 202
    assert referenced(answer) == [uid(mine)]
    assert failures(answer) == [(uid(other), 0xA900)]
    stow.assert_holds_exactly({uid(mine)})
    status, answer, _ = await stow.post([encode(other)], study=study_uid)
    assert status == 409
    assert failures(answer) == [(uid(other), 0xA900)]
    status, _, _ = await stow.post([encode(other)], study="not-a-uid")
    assert status == 400
    stow.assert_holds_exactly({uid(mine)})


async def test_request_end_releases_the_study(stow: Client) -> None:
    """settle 0.2 s, quiet timeout 60 s: scored within seconds means the request's end
    was its association's release (no DIMSE association at all)."""
    study = ap_study(92, "STOWREL", images=2)
    status, _, _ = await stow.post([encode(ds) for ds in study])
    assert status == 200
    doc = await result_of(stow.gw, str(study[0].StudyInstanceUID), 10)
    assert doc["status"] == "SUCCEEDED"
    assert stow.gw.port  # the DICOM port was open, and never used


async def test_below_the_disk_floor_every_part_fails(tmp_path: Path) -> None:
    port = free_port()
    async with gateway(tmp_path, http_port=port, min_free_mb=2**40) as (gw, _):
        client = Client(gw, port)
        [ds] = ap_study(93, "STOWFULL")
        status, answer, _ = await client.post([encode(ds)])
        assert status == 409
        assert failures(answer) == [(uid(ds), 0xA700)]
        client.assert_holds_exactly(set())


# --- access ------------------------------------------------------------------------------------


async def test_token_is_required_when_configured(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    port = free_port()
    async with gateway(tmp_path, http_port=port, http_token_file=token) as (gw, _):
        client = Client(gw, port)
        [ds] = ap_study(94, "STOWTOKEN")
        status, _, _ = await client.post([encode(ds)])
        assert status == 401
        status, _, _ = await client.post([encode(ds)],
                                         headers={"Authorization": "Bearer wrong"})
        assert status == 401
        client.assert_holds_exactly(set())
        status, answer, _ = await client.post([encode(ds)],
                                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        assert referenced(answer) == [uid(ds)]


async def test_no_token_beyond_loopback_refuses_post(tmp_path: Path) -> None:
    port = free_port()
    async with gateway(tmp_path, http_port=port, http_extra="  host: 0.0.0.0\n") as (gw, _):
        client = Client(gw, port)
        [ds] = ap_study(95, "STOWOPEN")
        status, answer, _ = await client.post([encode(ds)])
        assert status == 403
        assert "http.bearer-token-file" in answer["error"]
        client.assert_holds_exactly(set())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_verified_client_certificate_stands_for_the_token(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    port = free_port()
    tls = (f"  tls:\n    certificate: {pki / 'server.pem'}\n"
           f"    private-key: {pki / 'server.key'}\n    ca-certificates: {pki / 'ca.pem'}\n")
    (tmp_path / "gw").mkdir()
    async with gateway(tmp_path / "gw", http_port=port, http_token_file=token,
                       http_extra=tls) as (gw, _):
        client = Client(gw, port)
        [ds] = ap_study(96, "STOWCERT")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        status, _, _ = await client.post([encode(ds)], ssl_context=ctx, scheme="https")
        assert status == 401  # HTTPS, no certificate, no token
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        status, answer, _ = await client.post([encode(ds)], ssl_context=ctx, scheme="https")
        assert status == 200
        assert referenced(answer) == [uid(ds)]
        detail = await gw.store.study_detail(str(ds.StudyInstanceUID))
        assert detail is not None
        assert detail["instances"][0]["calling_ae"] == "STOW-RS client"


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ("127.0.0.1", "::1", "localhost", "127.0.0.2")))
    assert not any(map(is_loopback, ("0.0.0.0", "10.1.2.3", "", "::")))
