"""The HL7 v2 exporter: an ORU^R01 per scored study, sent by MLLP to a real listener
(python-hl7's asyncio MLLP server on loopback) that parses what it receives and answers
AA, AE, AR, nothing, or the ACK of another message, as each test chooses. Through the real
in-process gateway first, then the exporter alone for what a whole gateway adds nothing to
(a wrong MSA-2, a refused connection, TLS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message

from pxsgate.config import config_from_mapping
from pxsgate.delivery.hl7v2 import Demographics, Hl7Exporter, build_oru, control_id
from pxsgate.document import ResultDocument
from pxsgate.errors import ExportError, PermanentExportError

from .http_receiver import server_tls
from .inprocess import FastModel, gateway, result_of, send
from .test_change import visit
from .test_lifecycle import ap_study
from .test_outbox import settled
from .test_tls import make_pki

DELIMITERS = "|^~\\&"


@dataclass
class Listener:
    """An MLLP receiver: ``answers`` says how each message in turn is acknowledged
    ("AA", "AE", "AR", "CA", "silent": no ACK, "other": the ACK of another control id);
    once they are used up, AA."""

    port: int = 0
    answers: list[str] = field(default_factory=list)
    received: list[hl7.Message] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    async def handle(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(message)
                self.raw.append(str(message))
                answer = self.answers.pop(0) if self.answers else "AA"
                if answer == "silent":
                    continue
                if answer == "other":
                    ack = message.create_ack("AA")
                    text = str(ack).replace(field_of(message, "MSH", 10), "SOMEONEELSE")
                    writer.writemessage(text)
                else:
                    writer.writemessage(message.create_ack(answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def mllp_listener(**server: Any) -> AsyncIterator[Listener]:
    listener = Listener()
    srv = await start_hl7_server(listener.handle, "127.0.0.1", 0, encoding="utf-8",
                                 **server)
    listener.port = srv.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        srv.close()
        await srv.wait_closed()


def field_of(message: hl7.Message, segment: str, index: int, component: int = 1) -> str:
    """One component (1-based) of a parsed message's first repetition, unescaped by
    python-hl7: what the receiver reads."""
    return str(message[f"{segment}.F{index}.R1.C{component}"])


def v251_errors(er7: str, tmp: Path) -> list[str]:
    """What hl7apy's strict validation against HL7 v2.5.1 finds wrong with a message."""
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.name == "ORU_R01"
    report = tmp / "hl7apy-report.txt"
    with suppress(ValidationError):  # raised for the first error, after the report
        parsed.validate(report_file=str(report))
    lines = report.read_text().splitlines() if report.exists() else []
    return [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]


def hl7_exporter(port: int, name: str = "ris", **settings: Any) -> str:
    settings = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2,
                "patient_id_authority": "HOSP", "receiving_application": "RIS",
                **settings}
    lines = [f"  - name: {name}", "    type: hl7", "    host: 127.0.0.1", f"    port: {port}"]
    lines += [f"    {k.replace('_', '-')}: {v}" for k, v in settings.items()]
    return "exporters:\n" + "\n".join(lines) + "\n"


def headline(doc: dict[str, Any]) -> str:
    return str(doc["pxsgate"]["headline"]["value"])


async def test_one_oru_per_scored_study_with_the_score_and_the_patient(
        tmp_path: Path) -> None:
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        studies = [ap_study(81, "HL7A"), ap_study(82, "HL7B")]
        docs = []
        for study in studies:
            await send(gw, study)
            docs.append(await result_of(gw, str(study[0].StudyInstanceUID)))
        rows = await settled(gw, 2)
    assert [r.state for r in rows] == ["delivered", "delivered"]
    assert len(listener.received) == 2, "one ORU per study"
    by_accession = {field_of(m, "OBR", 3): m for m in listener.received}
    for doc in docs:
        message = by_accession[doc["accessionNumber"]]
        [row] = [r for r in rows if r.result_id == doc["id"]]
        assert field_of(message, "MSH", 9, component=1) == "ORU"
        assert field_of(message, "MSH", 9, component=2) == "R01"
        assert (field_of(message, "MSH", 3), field_of(message, "MSH", 5)) == ("PXSGATE", "RIS")
        assert field_of(message, "MSH", 12) == "2.5.1"
        assert field_of(message, "MSH", 10) == control_id(row.id)
        assert field_of(message, "PID", 3) == doc["patientId"]
        assert field_of(message, "PID", 3, component=4) == "HOSP"
        assert field_of(message, "PID", 5) == "", "no PHI beyond PID-3 unless include-phi"
        assert field_of(message, "OBR", 2) == doc["accessionNumber"]
        assert field_of(message, "OBR", 4) == "PXS"
        assert field_of(message, "OBR", 7).startswith(
            doc["pxsgate"]["studyDateTime"][:10].replace("-", ""))
        [obx] = message.segments("OBX")  # no prior: no change observation
        assert str(obx[2]) == "NM"
        assert [str(c) for c in obx[3][0]] == ["PXS", "PXS score", "L"]
        assert str(obx[5]) == headline(doc)
        assert float(str(obx[5])) == pytest.approx(float(doc["results"][0]["value"]))
        assert str(obx[11]) == "F"
        # hl7apy, parsing it against the v2.5.1 ORU_R01 definition, finds one thing
        # missing: the patient's name, which v2.5.1 requires and which only include-phi
        # sends (see the next test).
        assert v251_errors(str(message), tmp_path) == ["Missing required child PID.PID_5"]


async def test_include_phi_names_the_patient_and_the_message_is_valid_v251(
        tmp_path: Path) -> None:
    study = ap_study(89, "HL7PHI")
    study[0].PatientName = "Doe^Jane^Q^Dr^III"
    study[0].PatientBirthDate = "19600102"
    study[0].PatientSex = "F"
    async with mllp_listener() as listener, gateway(
            tmp_path, hl7_exporter(listener.port, include_phi="true")) as (gw, _):
        await send(gw, study)
        [row] = await settled(gw)
    assert row.state == "delivered"
    [message] = listener.received
    pid = message.segment("PID")
    assert [str(c) for c in pid[5][0]] == ["Doe", "Jane", "Q", "III", "Dr"]  # XPN order
    assert (str(pid[7]), str(pid[8])) == ("19600102", "F")
    assert v251_errors(str(message), tmp_path) == []


async def test_application_error_is_retried_then_delivered_under_one_control_id(
        tmp_path: Path) -> None:
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        listener.answers = ["AE", "CE"]
        await send(gw, ap_study(83, "HL7AE"))
        [row] = await settled(gw)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, "")
    ids = {field_of(m, "MSH", 10) for m in listener.received}
    assert ids == {control_id(row.id)}, "a re-delivery carries the same MSH-10"
    assert len(listener.received) == 3


async def test_application_reject_is_dead_at_once(tmp_path: Path) -> None:
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        listener.answers = ["AR"]
        await send(gw, ap_study(84, "HL7AR"))
        [row] = await settled(gw)
    assert (row.state, row.attempts) == ("dead", 1)
    assert "answered AR" in row.last_error
    assert len(listener.received) == 1


async def test_delimiters_in_patient_id_and_accession_round_trip(tmp_path: Path) -> None:
    ds = visit(85, 1, "20260110")
    # DICOM's own delimiter, the backslash, cannot be in a single-valued LO or SH, so the
    # study carries | ^ ~ & and the backslash comes in through the exporter test below.
    ds.PatientID = "P|1^2~3&4"
    ds.AccessionNumber = "A|^~&9"
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        await send(gw, [ds])
        doc = await result_of(gw, str(ds.StudyInstanceUID))
        [row] = await settled(gw)
    assert row.state == "delivered"
    assert (doc["patientId"], doc["accessionNumber"]) == ("P|1^2~3&4", "A|^~&9")
    [message] = listener.received
    assert field_of(message, "PID", 3) == doc["patientId"]
    assert field_of(message, "PID", 3, component=4) == "HOSP"
    assert field_of(message, "OBR", 2) == field_of(message, "OBR", 3) == "A|^~&9"
    assert len(message.segments("OBX")) == 1, "no field split by a delimiter in a value"


async def test_demonstration_weights_are_said_in_a_note_and_the_result_is_preliminary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FastModel, "info", replace(
        FastModel.info, description="stand-in; demonstration weights, not for clinical use"))
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        await send(gw, ap_study(86, "HL7DEMO"))
        [row] = await settled(gw)
    assert row.state == "delivered"
    [message] = listener.received
    notes = [str(message.unescape(str(s[3]))) for s in message.segments("NTE")]
    assert any("demonstration weights, not for clinical use" in n for n in notes), notes
    assert str(message.segment("OBX")[11]) == "P"
    assert str(message.segment("OBR")[25]) == "P"


async def test_no_ack_within_the_timeout_is_retried(tmp_path: Path) -> None:
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port, timeout_seconds=0.5)) as (gw, _):
        listener.answers = ["silent"]
        await send(gw, ap_study(87, "HL7SILENT"))
        [row] = await settled(gw)
    assert (row.state, row.attempts) == ("delivered", 2)
    assert len(listener.received) == 2
    assert len({field_of(m, "MSH", 10) for m in listener.received}) == 1


async def test_a_change_since_the_prior_is_a_second_observation(tmp_path: Path) -> None:
    async with mllp_listener() as listener, \
            gateway(tmp_path, hl7_exporter(listener.port)) as (gw, _):
        for number, date in ((1, "20260101"), (2, "20260131")):
            ds = visit(88, number, date, severity=0.3 * number)
            await send(gw, [ds])
            doc = await result_of(gw, str(ds.StudyInstanceUID))
        await settled(gw, 2)
    [change] = [r for r in doc["results"] if r["code"] == "pxs.change"]
    message = next(m for m in listener.received
                   if field_of(m, "OBR", 2) == doc["accessionNumber"])
    first, second = message.segments("OBX")
    assert str(first[5]) == headline(doc)
    assert str(second[3][0][0]) == "PXS-CHANGE"
    assert float(str(second[5])) == pytest.approx(change["change"]["distance"], abs=1e-6)
    notes = [str(message.unescape(str(s[3]))) for s in message.segments("NTE")]
    assert any("30 days earlier" in n for n in notes), notes


# --- the exporter alone, with a stored document --------------------------------------------


class CurrentStore:
    """The store as the exporter asks it: every result current, no images in the spool."""

    async def is_current(self, result_id: str) -> bool:
        return True

    async def instance_paths(self, uids: Any) -> dict[str, Path]:
        return {}


def document(patient_id: str = "PAT1", accession: str = "ACC1") -> ResultDocument:
    return ResultDocument.from_json({
        "id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "status": "SUCCEEDED",
        "studyInstanceUid": "1.2.3", "patientId": patient_id, "accessionNumber": accession,
        "createdAt": "2026-01-01T10:00:00+00:00", "updatedAt": "2026-01-01T10:00:01+00:00",
        "model": {"name": "PxsScore", "version": "1", "description": "tests"},
        "results": [{"code": "partners.clara.pxs.score", "value": "3.25"}],
        "pxsgate": {"version": "0", "flags": ["many-ap-images"],
                    "headline": {"sopInstanceUid": "1.2.3.4", "value": "3.25"},
                    "studyDateTime": "2025-12-31T08:30:00"}})


def exporter(port: int, **settings: Any) -> Hl7Exporter:
    entry = {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": port,
             "timeout-seconds": 1, **{k.replace("_", "-"): v for k, v in settings.items()}}
    [config] = config_from_mapping({"exporters": [entry]}).exporters
    return Hl7Exporter(config, CurrentStore(), "exporters[0]")  # type: ignore[arg-type]


async def test_every_delimiter_and_the_escape_character_round_trip() -> None:
    tricky = f"X{DELIMITERS}Y \\F\\ \\E\\ end\\"  # literal escape sequences too
    async with mllp_listener() as listener:
        ex = exporter(listener.port)
        await ex.start()
        await ex.deliver("7c9e6679-7425-40de-944b-e07fc1f90ae7", document(tricky, tricky))
    [message] = listener.received
    assert field_of(message, "PID", 3) == tricky
    assert field_of(message, "OBR", 2) == field_of(message, "OBR", 3) == tricky
    notes = [str(message.unescape(str(s[3]))) for s in message.segments("NTE")]
    assert notes == ["Review flags: many-ap-images"]


def test_demographics_only_with_include_phi_and_as_xpn() -> None:
    [config] = config_from_mapping({"exporters": [{
        "name": "ris", "type": "hl7", "host": "h", "port": 1, "include-phi": True}]}).exporters
    er7 = build_oru(document(), config, "C1", demo=False,
                    demographics=Demographics("Doe^Jane^Q^Dr^III", "19600102", "F"))
    message = hl7.parse(er7)
    pid = message.segment("PID")
    assert [str(c) for c in pid[5][0]] == ["Doe", "Jane", "Q", "III", "Dr"]
    assert (str(pid[7]), str(pid[8])) == ("19600102", "F")
    assert str(message.segment("OBR")[7]) == "20251231083000"


@pytest.mark.parametrize(("answer", "error", "words"), [
    ("other", ExportError, "acknowledges message control id 'SOMEONEELSE'"),
    ("silent", ExportError, "no ACK within 1 s"),
    ("AE", ExportError, "answered AE"),
    ("AR", PermanentExportError, "answered AR"),
])
async def test_acks_that_are_not_a_delivery(answer: str, error: type[Exception],
                                            words: str) -> None:
    async with mllp_listener() as listener:
        listener.answers = [answer]
        ex = exporter(listener.port)
        await ex.start()
        with pytest.raises(error) as info:
            await ex.deliver("7c9e6679-7425-40de-944b-e07fc1f90ae7", document())
    assert words in str(info.value)
    if answer != "AR":
        assert not isinstance(info.value, PermanentExportError), "tried again"
    assert "PAT1" not in str(info.value)


async def test_connection_refused_is_retried() -> None:
    async with mllp_listener() as listener:
        port = listener.port
    ex = exporter(port)  # closed again: nothing listens there
    await ex.start()
    with pytest.raises(ExportError) as info:
        await ex.deliver("7c9e6679-7425-40de-944b-e07fc1f90ae7", document())
    assert not isinstance(info.value, PermanentExportError)
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs openssl")
async def test_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    make_pki(tmp_path)
    async with mllp_listener(ssl=server_tls(tmp_path)) as listener:
        ex = exporter(listener.port, tls=True, ca_certificates=str(tmp_path / "ca.pem"),
                      client_certificate=str(tmp_path / "client.pem"),
                      client_key=str(tmp_path / "client.key"))
        await ex.start()
        await ex.deliver("7c9e6679-7425-40de-944b-e07fc1f90ae7", document())
        untrusted = exporter(listener.port, tls=True)  # the system's CAs: not this one
        await untrusted.start()
        with pytest.raises(ExportError) as info:
            await untrusted.deliver("7c9e6679-7425-40de-944b-e07fc1f90ae7", document())
    assert len(listener.received) == 1
    assert "certificate" in str(info.value).lower()
