"""Reception a hospital can trust: every syntax, idempotent re-sends, and abuse that leaves
the service answering C-ECHO (issue 3's checks), against a real ``pxsgate serve``."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from pxsgate.tools import synth
from pxsgate.tools.scu import echo, send_datasets

from .conftest import SAMPLES, Service, dcmtk, pxsgate, start_service, stop_service

LIMITS = """    max-associations: 2
    max-dataset-mb: 16
    acse-timeout: 1
    artim-timeout: 1
    network-timeout: 2
    dimse-timeout: 2"""
CR = "1.2.840.10008.5.1.4.1.1.1"
# DCMTK storescu's option that proposes each compressed syntax the samples carry.
PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12-bit)
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("reception"), extra_scp=LIMITS)
    yield service
    assert stop_service(service) == 0


def still_answers(service: Service) -> None:
    assert echo("127.0.0.1", service.port) == 0x0000


def instance_rows(service: Service, study_uid: str) -> list[sqlite3.Row]:
    with sqlite3.connect(service.data_dir / "pxsgate.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM instances WHERE study_instance_uid = ?",
                          (study_uid,)).fetchall()


def one_ap_study(seed: int, prefix: str) -> synth.FeedStudy:
    return synth.hospital_feed(seed=seed, rows=384, cols=320, prefix=prefix)[0]


def part10(payload: bytes, sop_class: str, sop_uid: str, path: Path) -> Path:
    """A Part-10 file whose file meta names ``sop_uid`` and whose data set is ``payload``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buffer = BytesIO()
    write_file_meta_info(buffer, meta)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + payload)
    return path


def raw_store(port: int, path: Path) -> int:
    """C-STORE a file's data set bytes as they are (pynetdicom streams them undecoded)."""
    ae = AE(ae_title="ABUSER")
    ae.add_requested_context(CR, "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PxsScore")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def cut_off_store(port: int, ds: Dataset, pdus: int) -> None:
    """Send only the first ``pdus`` P-DATA PDUs of a C-STORE, then drop the TCP connection
    without an A-ABORT: a peer that stops mid-dataset."""
    ae = AE(ae_title="ABUSER")
    ae.add_requested_context(str(ds.SOPClassUID), "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PxsScore", max_pdu=4096)
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    sock = assoc.dul.socket
    assert sock is not None
    for i, primitive in enumerate(msg.encode_msg(assoc.accepted_contexts[0].context_id, 4096)):
        if i >= pdus:
            break
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.send(pdu.encode())
    time.sleep(0.1)
    sock.close()
    assoc.kill()


@pytest.fixture(autouse=True)
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # send_c_store(path) then streams the file's bytes without decoding them; monkeypatch
    # restores pynetdicom's global flag after each test.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_duplicate_resend_is_stored_once_and_recorded(svc: Service) -> None:
    study = one_ap_study(501, "DUP")
    uid = str(study.datasets[0].StudyInstanceUID)
    assert send_datasets("127.0.0.1", svc.port, list(study.datasets)).ok
    svc.wait_for([uid])
    assert send_datasets("127.0.0.1", svc.port, list(study.datasets)).ok  # the router retries
    time.sleep(1.5)  # longer than the settle time: a re-opened study would be scored again
    rows = instance_rows(svc, uid)
    assert len(rows) == 1
    assert rows[0]["receive_count"] == 2
    assert len(list((svc.data_dir / "spool" / uid).glob("*.dcm"))) == 1
    assert len(svc.results("--study-uid", uid)) == 1, "identical bytes do not re-open a study"


def test_malformed_dataset_gets_cannot_understand(svc: Service, tmp_path: Path) -> None:
    garbage = b"\x08\x00\x16\x00\xff\xff" + b"\x00" * 40  # a tag with a bogus length
    status = raw_store(svc.port, part10(garbage, CR, "1.2.3.4.5", tmp_path / "bad.dcm"))
    assert status == 0xC210
    still_answers(svc)


def test_identifiers_that_differ_from_the_request(svc: Service, tmp_path: Path) -> None:
    ds = one_ap_study(502, "MISMATCH").datasets[0]
    payload = encode(ds, False, True)  # explicit VR little endian, as the context says
    assert payload is not None
    path = part10(payload, str(ds.SOPClassUID), "1.2.3.999", tmp_path / "mismatch.dcm")
    status = raw_store(svc.port, path)
    assert status == 0xA900
    assert instance_rows(svc, str(ds.StudyInstanceUID)) == []
    still_answers(svc)


def test_dataset_cut_off_mid_transfer_frees_the_slot(svc: Service) -> None:
    ds = one_ap_study(503, "CUTOFF").datasets[0]
    cut_off_store(svc.port, ds, pdus=3)
    time.sleep(0.5)
    assert instance_rows(svc, str(ds.StudyInstanceUID)) == []
    assert not list((svc.data_dir / "spool").glob(f"*/.{ds.SOPInstanceUID}*"))
    # max-associations is 2: both slots must be free again.
    aes = [AE(ae_title=f"PROBE{i}") for i in range(2)]
    assocs = []
    for ae in aes:
        ae.add_requested_context("1.2.840.10008.1.1")
        assocs.append(ae.associate("127.0.0.1", svc.port, ae_title="PxsScore"))
    try:
        assert all(a.is_established for a in assocs)
    finally:
        for a in assocs:
            a.release()
    still_answers(svc)


def test_silent_tcp_connection_is_dropped(svc: Service) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=15) as sock:
        data = sock.recv(1024)  # never send an A-ASSOCIATE-RQ
    assert data == b"", "the server closes the connection"
    assert time.monotonic() - started < 10  # artim-timeout is 1 s
    still_answers(svc)


@pytest.mark.parametrize("syntax_flag", ["-xi", "-xe", "-xb"])
def test_dcmtk_uncompressed_syntaxes(svc: Service, tmp_path: Path, syntax_flag: str) -> None:
    study = one_ap_study(510 + ["-xi", "-xe", "-xb"].index(syntax_flag), f"TS{syntax_flag}")
    files = synth.write_feed([study], tmp_path)
    result = subprocess.run([dcmtk("storescu"), syntax_flag, "-aec", "PxsScore", "127.0.0.1",
                             str(svc.port), *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    uid = str(study.datasets[0].StudyInstanceUID)
    doc = svc.wait_for([uid])[uid]
    assert doc["status"] == "SUCCEEDED", doc["errorMessage"]
    expected = {"-xi": "1.2.840.10008.1.2", "-xe": "1.2.840.10008.1.2.1",
                "-xb": "1.2.840.10008.1.2.2"}[syntax_flag]
    assert instance_rows(svc, uid)[0]["transfer_syntax_uid"] == expected


def test_compressed_samples_are_received_as_they_are_and_decode(svc: Service) -> None:
    samples = sorted(SAMPLES.glob("*.dcm"))
    assert len(samples) >= 6
    stored: list[Path] = []
    for sample in samples:
        ds = dcmread(sample, stop_before_pixels=True)
        # storescu proposes a compressed syntax only when told which: no conversion happens.
        flag = PROPOSE[str(ds.file_meta.TransferSyntaxUID)]
        result = subprocess.run([dcmtk("storescu"), "-R", flag, "-aec", "PxsScore",
                                 "127.0.0.1", str(svc.port), str(sample)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        rows = [r for r in instance_rows(svc, str(ds.StudyInstanceUID))
                if r["sop_instance_uid"] == ds.SOPInstanceUID]
        assert len(rows) == 1, sample.name
        assert rows[0]["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID, sample.name
        stored.append(Path(rows[0]["path"]))
    # Decoded from the spool by the same code path the service uses.
    scored = pxsgate("score", "--config", svc.config, *stored, timeout=300)
    values: list[dict[str, Any]] = json.loads(scored.stdout)
    assert all("value" in v for v in values), values


def test_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    full = start_service(tmp_path, min_free_mb=10**9)  # a floor no disk can meet
    try:
        study = one_ap_study(520, "FULL")
        report = send_datasets("127.0.0.1", full.port, list(study.datasets))
        assert report.statuses == (0xA700,)
        # The reason reaches the log (and the peer's ErrorComment), not "internal error":
        # the refusal leaves Spool.writing's block intact.
        refused = [e for e in full.logs if e.get("event") == "instance.refused"]
        assert [e["status"] for e in refused] == ["0xA700"]
        assert "below its floor" in refused[0]["reason"]
        assert not [e for e in full.logs if e.get("event") == "instance.error"]
        assert not list((full.data_dir / "spool").rglob("*.dcm"))
        assert not list((full.data_dir / "spool").rglob(".*.tmp"))
        assert instance_rows(full, str(study.datasets[0].StudyInstanceUID)) == []
        still_answers(full)
    finally:
        assert stop_service(full) == 0


def test_dataset_over_the_size_limit(tmp_path: Path) -> None:
    small = start_service(tmp_path, extra_scp="    max-dataset-mb: 0.1")
    try:
        ds: Dataset = one_ap_study(521, "BIG").datasets[0]  # 384x320x2 bytes > 0.1 MB
        assert send_datasets("127.0.0.1", small.port, [ds]).statuses == (0xA700,)
        still_answers(small)
    finally:
        assert stop_service(small) == 0


def test_a_multi_valued_patient_id_is_kept_as_dicom_writes_it(tmp_path: Path) -> None:
    """PatientID is single-valued, but a sender may write "A\\B": it is stored, searched and
    hashed as those bytes say (DICOM's encoding), not as Python's list text."""
    svc = start_service(tmp_path)
    try:
        ds: Dataset = one_ap_study(522, "MULTI").datasets[0]
        ds.PatientID = ["MRN-A", "MRN-B"]
        assert send_datasets("127.0.0.1", svc.port, [ds]).ok
        uid = str(ds.StudyInstanceUID)
        doc = svc.wait_for([uid])[uid]
        assert doc["patientId"] == "MRN-A\\MRN-B"
        assert [d["id"] for d in svc.results("--patient-id", "MRN-A\\MRN-B")] == [doc["id"]]
        with sqlite3.connect(svc.data_dir / "pxsgate.sqlite3") as db:
            (patient_id,) = db.execute("SELECT patient_id FROM results").fetchone()
        assert patient_id == "MRN-A\\MRN-B"
    finally:
        assert stop_service(svc) == 0


# --- what a data set becomes, and its whole header, before Success (issue 18.1, 18.12) -------

DEFLATED = "1.2.840.10008.1.2.1.99"


def _explicit_le(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_deflate_bomb_is_refused_within_bounded_memory(svc: Service, tmp_path: Path) -> None:
    """A 0.4 MB Deflated data set that inflates to 400 MB gets 0xA700 (max-dataset-mb is
    16 here), nothing is spooled, and the service's peak RSS grows by far less than 400 MB."""
    import zlib

    header = one_ap_study(523, "BOMB").datasets[0]
    del header.PixelData
    header.Rows, header.Columns = 10, 10  # the header does not give it away
    inflated = 400 * 2**20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [compressor.compress(_explicit_le(header)),
            compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + inflated.to_bytes(4, "little"))]
    zeros = bytes(2**20)
    body += [compressor.compress(zeros) for _ in range(inflated // len(zeros))]
    body.append(compressor.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.SOPClassUID
    meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    buffer = BytesIO()
    write_file_meta_info(buffer, meta)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + b"".join(body))
    assert path.stat().st_size < 2**20

    before = _peak_rss_kib(svc.process.pid)
    ae = AE(ae_title="ABUSER")
    ae.add_requested_context(str(header.SOPClassUID), DEFLATED)
    assoc = ae.associate("127.0.0.1", svc.port, ae_title="PxsScore")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status.Status == 0xA700
    assert "inflated" in str(status.get("ErrorComment", ""))
    grown_mib = (_peak_rss_kib(svc.process.pid) - before) / 1024
    assert grown_mib < 150, f"the service's peak RSS grew by {grown_mib:.0f} MiB"
    assert instance_rows(svc, str(header.StudyInstanceUID)) == []
    still_answers(svc)


def test_pixel_data_too_large_once_decoded_is_refused(svc: Service) -> None:
    """Rows x Columns x frames x bytes, from the header, before any decoding."""
    ds: Dataset = one_ap_study(524, "HUGE").datasets[0]
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4096, 4096, 2  # 64 MiB at 16 bits, > 16 MB
    report = send_datasets("127.0.0.1", svc.port, [ds])
    assert report.statuses == (0xA700,)
    assert instance_rows(svc, str(ds.StudyInstanceUID)) == []


def test_a_header_damaged_after_the_series_uid_is_refused(svc: Service, tmp_path: Path) -> None:
    """An element after (0020,000E) whose declared length runs past the end: 0xC210 now,
    not Success and a study later found unreadable."""
    import struct

    ds: Dataset = one_ap_study(525, "DAMAGE").datasets[0]
    del ds.PixelData
    payload = _explicit_le(ds)
    at = payload.find(b"\x28\x00\x10\x00US")  # Rows, well after SeriesInstanceUID
    assert at > payload.find(b"\x20\x00\x0e\x00UI") > 0
    damaged = payload[:at + 6] + struct.pack("<H", 0xFFF0) + payload[at + 8:]
    path = part10(damaged, str(ds.SOPClassUID), str(ds.SOPInstanceUID), tmp_path / "cut.dcm")
    assert raw_store(svc.port, path) == 0xC210
    assert instance_rows(svc, str(ds.StudyInstanceUID)) == []
    still_answers(svc)


@pytest.mark.filterwarnings("ignore:The value length \\(65\\) exceeds:UserWarning")  # ours
def test_a_65_character_uid_in_the_request_gets_0xc210(svc: Service) -> None:
    """A C-STORE request whose command set names a 65-character SOP Instance UID (pynetdicom
    would drop the association without a word while decoding it) is answered 0xC210 and
    logged as instance.refused; the association goes on (issue 18.13)."""
    ds: Dataset = one_ap_study(526, "LONGUID").datasets[0]
    long_uid = "1.2." + "3" * 61
    assert len(long_uid) == 65
    ae = AE(ae_title="ABUSER")
    ae.add_requested_context(str(ds.SOPClassUID), "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", svc.port, ae_title="PxsScore")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 7
        req.AffectedSOPClassUID = ds.SOPClassUID
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        ds.SOPInstanceUID = long_uid
        req.DataSet = BytesIO(encode(ds, False, True))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        msg.command_set.AffectedSOPInstanceUID = long_uid  # past what pynetdicom would send
        [context] = [c for c in assoc.accepted_contexts
                     if c.abstract_syntax == ds.SOPClassUID]
        # Pause the association's reactor, as pynetdicom's own send_c_echo does, so that
        # it does not take the response first ("unexpected C-STORE service message").
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            for primitive in msg.encode_msg(context.context_id,
                                            assoc.acceptor.maximum_length):
                assoc.dul.send_pdu(primitive)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None
        assert rsp.Status == 0xC210
        assert rsp.MessageIDBeingRespondedTo == 7
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000  # the association goes on
    finally:
        assoc.release()
    deadline = time.monotonic() + 10
    while not [e for e in svc.logs if e.get("event") == "instance.refused"
               and e.get("reason") == "invalid UID in the C-STORE request"]:
        assert time.monotonic() < deadline, "the refusal is logged"
        time.sleep(0.05)


def test_no_data_set_value_reaches_the_log(svc: Service, tmp_path: Path) -> None:
    """A UID element whose declared length runs over PatientName and PatientID: pydicom
    warns with the whole value. The warning reaches the log as a JSON line without it
    (logging.include-phi is off), and every line the service writes is JSON (issue 18.3,
    18.4)."""
    import struct

    ds: Dataset = one_ap_study(527, "PHILOG").datasets[0]
    ds.PatientName, ds.PatientID = "SECRETNAME^PATIENT", "MRN-SECRET-77"
    del ds.PixelData
    payload = _explicit_le(ds)
    at = payload.find(b"\x08\x00\x18\x00UI")  # SOPInstanceUID
    end = payload.find(b"MRN-SECRET-77") + len(b"MRN-SECRET-77") + 1
    assert 0 < at < end
    swallowing = payload[:at + 6] + struct.pack("<H", end - (at + 8)) + payload[at + 8:]
    lines_before = len(svc.raw_log)
    path = part10(swallowing, str(ds.SOPClassUID), str(ds.SOPInstanceUID), tmp_path / "x.dcm")
    assert raw_store(svc.port, path) in (0xA900, 0xC210)
    still_answers(svc)
    time.sleep(0.5)
    written = svc.raw_log[lines_before:]
    assert any('"library.log"' in line and "py.warnings" in line for line in written), written
    for line in svc.raw_log:
        json.loads(line)  # every line
        assert "SECRETNAME" not in line
        assert "MRN-SECRET" not in line


def test_an_overlong_url_is_answered_and_logged_as_json(tmp_path: Path) -> None:
    """aiohttp's own error for a request line over 8,190 bytes (a traceback on stderr
    before) is one JSON line without the URL (issue 18.4)."""
    from .conftest import free_port

    http_port = free_port()
    svc = start_service(tmp_path, http_port=http_port)
    try:
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
            sock.sendall(b"GET /results?patient_id=SECRET-" + b"A" * 9000
                         + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.split(b" ")[1].startswith(b"4"), answer[:100]
        still_answers(svc)
        time.sleep(0.5)
    finally:
        assert stop_service(svc) == 0
    for line in svc.raw_log:
        json.loads(line)
        assert "SECRET-" not in line


def test_pixel_data_cut_short_is_refused(svc: Service, tmp_path: Path) -> None:
    """Pixel Data whose declared length runs past the end of the data set (the element
    most often cut short): 0xC210, not Success and a decode failure later."""
    ds: Dataset = one_ap_study(528, "CUTPIXELS").datasets[0]
    payload = _explicit_le(ds)
    cut = payload[:len(payload) - 15000]
    path = part10(cut, str(ds.SOPClassUID), str(ds.SOPInstanceUID), tmp_path / "cut.dcm")
    assert raw_store(svc.port, path) == 0xC210
    assert instance_rows(svc, str(ds.StudyInstanceUID)) == []
    whole = part10(payload, str(ds.SOPClassUID), str(ds.SOPInstanceUID), tmp_path / "ok.dcm")
    assert raw_store(svc.port, whole) == 0x0000  # the same data set, whole
