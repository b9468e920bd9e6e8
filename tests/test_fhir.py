"""The FHIR exporter (issue 21): each SUCCEEDED result as a FHIR R4 transaction Bundle
POSTed to a FHIR base URL.

From outside: the in-process gateway (tests/inprocess.py) receiving real DICOM over
loopback, the real outbox, and a real HTTP server on loopback (tests/http_receiver.py)
answering as a FHIR server does: a ``transaction-response`` Bundle with a ``201 Created``
entry per entry, or an OperationOutcome. What it received is read back with fhir.resources,
the models the exporter's own output must satisfy.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from pxsgate.config import ExporterConfig
from pxsgate.delivery import build_exporters
from pxsgate.delivery.fhir import (
    Codes,
    FhirError,
    FhirExporter,
    build_bundle,
    fhir_datetime,
    if_none_exist,
)
from pxsgate.document import ResultDocument
from pxsgate.records import ScoredImage
from pxsgate.results import ModelInfo, StudyIdentity, build_document

from .http_receiver import Received, Receiver, http_receiver
from .inprocess import FastModel, eventually, gateway, result_of, send
from .test_change import change_of, visit
from .test_lifecycle import ap_study
from .test_outbox import settled

PATIENT_SYSTEM = "urn:oid:1.2.840.99999.1.1"
TOKEN = "fhir-s3cret-token"


def fhir_exporter(url: str, name: str = "ehr", **settings: Any) -> str:
    settings = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2,
                "patient_id_system": PATIENT_SYSTEM, **settings}
    lines = [f"  - name: {name}", "    type: fhir", f"    url: {url}"]
    lines += [f"    {k.replace('_', '-')}: {v}" for k, v in settings.items()]
    return "exporters:\n" + "\n".join(lines) + "\n"


def fhir_server(status: int, request: Received) -> tuple[bytes, str]:
    """What a FHIR server answers a transaction: a transaction-response Bundle, one entry
    per entry, each created (with a location), or an OperationOutcome."""
    if not 200 <= status < 300:
        outcome = {"resourceType": "OperationOutcome",
                   "issue": [{"severity": "error", "code": "invalid",
                              "diagnostics": "Patient MRN61 is not ours"}]}
        return json.dumps(outcome).encode(), "application/fhir+json"
    entries = [{"response": {"status": "201 Created",
                             "location": f"{e['request']['url']}/{n}/_history/1"}}
               for n, e in enumerate(request.document.get("entry") or (), 1)]
    answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    return json.dumps(answer).encode(), "application/fhir+json"


def fhir_receiver(receiver: Receiver) -> Receiver:
    receiver.reply = fhir_server
    receiver.token = TOKEN
    return receiver


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "fhir.token"
    path.write_text(TOKEN + "\n", encoding="utf-8")
    return path


def parsed(request: Received) -> Bundle:
    """The received body, read by fhir.resources (it raises on anything FHIR refuses)."""
    bundle = Bundle.model_validate(request.document)
    assert bundle.type == "transaction"
    return bundle


def resources(bundle: Bundle) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for entry in bundle.entry or ():
        assert entry.resource is not None
        found.setdefault(entry.resource.get_resource_type(), []).append(entry.resource)
    return found


def conditions(request: Received) -> list[tuple[str, str, str]]:
    """(fullUrl, POST url, ifNoneExist) of every entry: what a re-delivery must repeat."""
    return [(e["fullUrl"], e["request"]["url"], e["request"]["ifNoneExist"])
            for e in request.document["entry"]]


def identifier(resource: Any) -> tuple[str, str]:
    [ident] = resource.identifier
    return ident.system, ident.value


async def test_a_result_is_one_transaction_bundle(tmp_path: Path) -> None:
    with http_receiver() as receiver:
        fhir_receiver(receiver)
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            study = ap_study(71, "FHIR")
            await send(gw, study)
            doc = await result_of(gw, str(study[0].StudyInstanceUID))
            [row] = await settled(gw)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 1, "")
    [request] = receiver.requests
    assert request.status == 200, "the bearer token was sent"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert request.headers["X-Pxsgate-Result-Id"] == doc["id"]
    bundle = parsed(request)
    found = resources(bundle)
    assert sorted(found) == ["Device", "DiagnosticReport", "Observation"]
    [device], [score], [report] = found["Device"], found["Observation"], found["DiagnosticReport"]
    assert isinstance(score, Observation)
    assert isinstance(report, DiagnosticReport)
    assert isinstance(device, Device)

    # The score Observation: the stored headline score, of the Patient and the study.
    assert score.status == "final"
    assert score.valueQuantity.value == Decimal(doc["pxsgate"]["headline"]["value"])
    assert float(score.valueQuantity.value) == pytest.approx(
        float(doc["results"][0]["value"]))
    assert (score.subject.type, score.subject.reference) == ("Patient", None)
    assert (score.subject.identifier.system, score.subject.identifier.value) == (
        PATIENT_SYSTEM, study[0].PatientID)
    [derived] = score.derivedFrom
    assert derived.type == "ImagingStudy"
    assert (derived.identifier.system, derived.identifier.value) == (
        "urn:dicom:uid", f"urn:oid:{study[0].StudyInstanceUID}")
    [coding] = score.code.coding
    assert (coding.system, coding.code) == ("urn:pxsgate:codes", "pxs-score")
    assert [c.code for c in score.category[0].coding] == ["imaging"]
    assert identifier(score) == ("urn:pxsgate:result", doc["id"])
    # StudyDate/StudyTime as this host's local time, with its offset.
    assert score.effectiveDateTime == fhir_datetime(doc["pxsgate"]["studyDateTime"])
    assert score.effectiveDateTime.tzinfo is not None

    # Bundle-internal references: urn:uuid fullUrls.
    urls = {e.resource.get_resource_type(): e.fullUrl for e in bundle.entry or ()}
    assert all(u.startswith("urn:uuid:") for u in urls.values())
    assert score.device.reference == urls["Device"]
    assert [r.reference for r in report.result] == [urls["Observation"]]

    # The report: radiology, the conclusion in words, final.
    assert report.status == "final"
    assert {(c.system, c.code) for c in report.category[0].coding} >= {
        ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")}
    assert doc["pxsgate"]["headline"]["value"] in report.conclusion
    assert "NOT FOR CLINICAL USE" not in report.conclusion  # the stand-in model
    assert report.subject.identifier.value == study[0].PatientID

    # The model's Device: name, version, the weights' SHA-256.
    assert device.deviceName[0].name == FastModel.info.name
    assert device.version[0].value == FastModel.info.version
    assert ("urn:pxsgate:model-weights-sha256", FastModel.info.weights_sha256) in {
        (i.system, i.value) for i in device.identifier}

    # Conditional creates on identifiers derived from the result id.
    assert conditions(request) == [
        (urls["Device"], "Device", if_none_exist(device.identifier)),
        (urls["Observation"], "Observation", f"identifier=urn:pxsgate:result|{doc['id']}"),
        (urls["DiagnosticReport"], "DiagnosticReport",
         f"identifier=urn:pxsgate:result|{doc['id']}"),
    ]


async def test_a_redelivery_repeats_the_conditional_identifiers_and_full_urls(
        tmp_path: Path) -> None:
    with http_receiver() as receiver:
        fhir_receiver(receiver).answers = [503]  # down for the first try
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            await send(gw, ap_study(72, "FHIRAGAIN"))
            [row] = await settled(gw)
    assert (row.state, row.attempts) == ("delivered", 2)
    first, second = receiver.requests
    assert (first.status, second.status) == (503, 200)
    assert conditions(first) == conditions(second)
    assert first.document == second.document, "the same Bundle: the server creates it once"
    assert {r.headers["X-Pxsgate-Delivery-Id"] for r in receiver.requests} == {row.id}


async def test_demonstration_weights_make_it_preliminary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = ModelInfo("PxsScore", "demo", "pxsgate",
                     "PXS score model on chest x-rays (demonstration weights, not for "
                     "clinical use)", "2026-01-01T00:00:00+00:00", "1" * 64)
    monkeypatch.setattr(FastModel, "info", demo)
    with http_receiver() as receiver:
        fhir_receiver(receiver)
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            await send(gw, ap_study(73, "FHIRDEMO"))
            [row] = await settled(gw)
    assert row.state == "delivered"
    found = resources(parsed(receiver.requests[0]))
    [score], [report] = found["Observation"], found["DiagnosticReport"]
    assert (score.status, report.status) == ("preliminary", "preliminary")
    assert "NOT FOR CLINICAL USE" in report.conclusion
    assert any("NOT FOR CLINICAL USE" in n.text for n in score.note)


async def test_a_change_since_the_prior_study_is_its_own_observation(tmp_path: Path) -> None:
    with http_receiver() as receiver:
        fhir_receiver(receiver)
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            first = visit(81, 1, "20200301")
            await send(gw, [first])
            await result_of(gw, str(first.StudyInstanceUID))
            await settled(gw, 1)
            later = visit(81, 2, "20200311", severity=0.6)
            await send(gw, [later])
            doc = await result_of(gw, str(later.StudyInstanceUID))
            await settled(gw, 2)
    entry = change_of(doc)
    assert entry is not None, "the second visit has a change entry"
    requests = {r.document["entry"][1]["resource"]["derivedFrom"][0]["identifier"]["value"]:
                r for r in receiver.accepted()}
    before = parsed(requests[f"urn:oid:{first.StudyInstanceUID}"])
    assert len(resources(before)["Observation"]) == 1, "no prior, no change Observation"
    request = requests[f"urn:oid:{later.StudyInstanceUID}"]
    bundle = parsed(request)
    score, change = resources(bundle)["Observation"]
    assert identifier(score) == ("urn:pxsgate:result", doc["id"])
    assert identifier(change) == ("urn:pxsgate:result", f"{doc['id']}-change")
    assert change.code.coding[0].code == "pxs-change"
    assert float(change.valueQuantity.value) == pytest.approx(entry["change"]["distance"])
    interval = next(c for c in change.component
                    if c.code.coding[0].code == "pxs-change-interval")
    assert (interval.valueQuantity.code, float(interval.valueQuantity.value)) == (
        "d", pytest.approx(entry["change"]["intervalDays"]))
    assert float(interval.valueQuantity.value) == pytest.approx(10)
    assert [d.identifier.value for d in change.derivedFrom] == [
        f"urn:oid:{later.StudyInstanceUID}", f"urn:oid:{first.StudyInstanceUID}"]
    assert change.subject.identifier.value == later.PatientID
    [report] = resources(bundle)["DiagnosticReport"]
    urls = [e.fullUrl for e in bundle.entry or ()]
    assert [r.reference for r in report.result] == urls[1:3]
    assert "Change since the prior study" in report.conclusion
    assert conditions(request)[2][2] == f"identifier=urn:pxsgate:result|{doc['id']}-change"


@pytest.mark.parametrize(("status", "state", "attempts"), [
    (400, "dead", 1), (422, "dead", 1), (429, "delivered", 2), (500, "delivered", 2)],
    ids=["400", "422", "429", "500"])
async def test_a_4xx_is_dead_at_once_and_429_5xx_retried(
        tmp_path: Path, status: int, state: str, attempts: int) -> None:
    with http_receiver() as receiver:
        fhir_receiver(receiver).answers = [status]
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            await send(gw, ap_study(74, "FHIRREFUSED"))
            [row] = await settled(gw)
    assert (row.state, row.attempts) == (state, attempts)
    assert [r.status for r in receiver.requests][:1] == [status]
    if state == "dead":
        assert f"HTTP {status}" in row.last_error
        assert "OperationOutcome: error invalid" in row.last_error
        assert "MRN" not in row.last_error, "the diagnostics may quote the Bundle: left out"


async def test_an_answer_that_is_no_transaction_response_is_dead(tmp_path: Path) -> None:
    with http_receiver() as receiver:
        receiver.reply = lambda status, request: (b"<html>portal</html>", "text/html")
        async with gateway(tmp_path, fhir_exporter(receiver.url)) as (gw, _):
            await send(gw, ap_study(75, "FHIRNOTFHIR"))
            [row] = await settled(gw)
    assert (row.state, row.attempts) == ("dead", 1)
    assert "not a FHIR Bundle" in row.last_error
    assert "FHIR base" in row.last_error


async def test_a_missing_token_is_refused_as_unauthorized(tmp_path: Path) -> None:
    with http_receiver() as receiver:
        fhir_receiver(receiver)
        async with gateway(tmp_path, fhir_exporter(receiver.url)) as (gw, _):
            await send(gw, ap_study(76, "FHIRNOTOKEN"))
            [row] = await settled(gw)
    assert (row.state, row.attempts) == ("dead", 1)
    assert "HTTP 401" in row.last_error


async def test_until_the_server_has_the_device_one_delivery_at_a_time(tmp_path: Path) -> None:
    """Two transactions at once would both find no Device and both create it; from then on
    every conditional create would find two and be refused (412)."""
    with http_receiver() as receiver:
        fhir_receiver(receiver).hold.set()  # the first POST waits for release
        extra = fhir_exporter(receiver.url, bearer_token_file=token_file(tmp_path))
        async with gateway(tmp_path, extra) as (gw, _):
            one, two = ap_study(77, "FHIRONE"), ap_study(78, "FHIRTWO")
            await send(gw, one)
            await eventually(lambda: _true(receiver.arrived == 1), 30, "the first POST")
            await send(gw, two)
            await result_of(gw, str(two[0].StudyInstanceUID))
            await asyncio.sleep(1.0)  # the second is due and waiting
            assert receiver.arrived == 1, "the second waits for the first's Device"
            receiver.release.set()
            rows = await settled(gw, 2)
    assert [r.state for r in rows] == ["delivered", "delivered"]
    devices = {conditions(r)[0][2] for r in receiver.requests}
    assert len(devices) == 1, "one model, one Device search"


async def _true(value: bool) -> bool:
    return value


# --- the Bundle itself, without a gateway -------------------------------------------------

MODEL = ModelInfo("PxsScore", "1.0", "tests", "for tests", "2026-01-01T00:00:00+00:00",
                  "ab" * 32, anchors_sha256="cd" * 32)


def document(status: str = "SUCCEEDED", study_datetime: str | None = "2026-03-01",
             patient_id: str = "MRN|1,2") -> ResultDocument:
    uid = "1.2.826.0.1.3680043.10.1119.9"
    identity = StudyIdentity(uid, patient_id, "ACC9", study_datetime)
    created = "2026-03-01T11:00:00.000+01:00"
    scores = [ScoredImage(f"{uid}.1.1", f"{uid}.1", 0.123456)] if status == "SUCCEEDED" else []
    return build_document(status=status, identity=identity, site_id="TEST", model=MODEL,
                          created_at=created, updated_at=created, scores=scores)


def config(**settings: Any) -> ExporterConfig:
    return ExporterConfig(name="ehr", type="fhir", url="https://ehr.example.org/fhir/",
                          patient_id_system=PATIENT_SYSTEM, **settings)


def test_the_bundle_is_deterministic_and_valid_r4() -> None:
    doc = document()
    one = build_bundle(doc, Codes(config())).model_dump_json()
    assert one == build_bundle(doc, Codes(config())).model_dump_json()
    bundle = Bundle.model_validate_json(one)
    [score] = resources(bundle)["Observation"]
    assert score.valueQuantity.value == Decimal("0.123456")
    assert (score.valueQuantity.system, score.valueQuantity.code) == (
        "http://unitsofmeasure.org", "1")
    # A StudyDate without a time stays a date.
    assert json.loads(one)["entry"][1]["resource"]["effectiveDateTime"] == "2026-03-01"
    # The Device is shared by every result of the same model, weights and anchors.
    assert json.loads(one)["entry"][0]["request"]["ifNoneExist"] == (
        "identifier=urn:pxsgate:model|PxsScore-1.0"
        f"&identifier=urn:pxsgate:model-weights-sha256|{'ab' * 32}"
        f"&identifier=urn:pxsgate:model-anchors-sha256|{'cd' * 32}")


def test_configured_codes_and_search_escaping() -> None:
    bundle = build_bundle(document(), Codes(config(code_system="http://loinc.org",
                                                   score_code="99999-9")))
    [score] = resources(bundle)["Observation"]
    assert (score.code.coding[0].system, score.code.coding[0].code) == (
        "http://loinc.org", "99999-9")
    # FHIR search escapes | , $ and \ in a token's parts; then the URL's own escaping.
    assert score.subject.identifier.value == "MRN|1,2"
    [ident] = score.identifier
    assert if_none_exist([ident]) == f"identifier=urn:pxsgate:result|{ident.value}"
    assert if_none_exist([type(ident)(system="urn:x", value="a|b,c d")]) == (
        "identifier=urn:x|a%5C%7Cb%5C%2Cc%20d")


def test_what_cannot_be_fhir_is_permanent() -> None:
    with pytest.raises(FhirError, match="SUCCEEDED"):
        build_bundle(document("FAILED"), Codes(config()))
    with pytest.raises(FhirError, match="no PatientID"):
        build_bundle(document(patient_id=""), Codes(config()))
    # A time FHIR refuses is named by where it is, never by its value.
    assert fhir_datetime("2026-13-01") is None
    assert fhir_datetime(None) is None


def test_build_exporters_builds_it() -> None:
    [exporter] = build_exporters([config()], store=None).values()  # type: ignore[arg-type]
    assert isinstance(exporter, FhirExporter)
    assert exporter.name == "ehr"
