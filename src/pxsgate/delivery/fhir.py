"""The FHIR exporter: each SUCCEEDED result as one FHIR R4 transaction Bundle POSTed to the
FHIR base URL (``url``), with the exporter's bearer token and TLS settings (:mod:`.http`).

The Bundle holds, in this order:

- a **Device**: the model (name, version, author, the weights' and anchors' SHA-256 as
  identifiers), created only when no Device has those identifiers;
- an **Observation** of the headline PXS score: category imaging, the configured code
  (default ``urn:pxsgate:codes|pxs-score``), ``valueQuantity`` the score (UCUM ``1``), the
  subject the Patient by identifier (``patient-id-system`` and the PatientID: a logical
  reference, no resource id), ``derivedFrom`` the ImagingStudy by identifier
  (``urn:dicom:uid`` and ``urn:oid:`` + Study Instance UID), ``device`` the Device;
- an **Observation of the change** since the patient's prior study when the result has a
  ``pxs.change`` entry: the distance, components for the interval in days and the score
  difference, ``derivedFrom`` both studies;
- a **DiagnosticReport**: category radiology (HL7 v2-0074 ``RAD``, LOINC ``LP29684-5``),
  ``result`` the Observations, the conclusion in words (score, change, review flags).

Status ``final``, or ``preliminary`` when the model has demonstration weights (not for
clinical use; the notes and the conclusion say so too).

Re-delivery creates nothing twice: each entry is a conditional create (``ifNoneExist``)
on an identifier derived from the result id (``urn:pxsgate:result|{id}``, ``{id}-change``),
and the entries reference each other by ``urn:uuid:`` fullUrls derived from the result id,
so every try sends the same Bundle.

The answer: 200 or 201 with a ``transaction-response`` Bundle is delivered; an answer that
is no such Bundle is dead (``url`` is likely not a FHIR base); 408, 425, 429 and 5xx are
retried, other 4xx and redirects are dead (:func:`.http.refusal`).

Times: StudyDate/StudyTime carry no offset; they are read as this host's local time (as the
SR exporter does), because FHIR wants an offset on a dateTime that has a time.

The resources are built with fhir.resources' ``R4B`` models (pydantic), which validate
every element; the four resources used here are the same in R4 and R4B, and nothing of
R4B's additions is used, so the Bundle is valid R4 (see pyproject.toml).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import pydantic
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from pxsgate.config import FHIR_DEFAULT_CODE_SYSTEM, FHIR_DEFAULT_CODES, ExporterConfig
from pxsgate.delivery.http import HttpClient, refusal
from pxsgate.delivery.sr import DEMO_COMMENT, is_demo
from pxsgate.document import CHANGE_CODE, Change, ResultDocument, ResultEntry
from pxsgate.errors import PermanentExportError
from pxsgate.records import Status

# Component codes of the change Observation, in the same system as the change code.
INTERVAL_CODE = "pxs-change-interval"
DIFFERENCE_CODE = "pxs-change-score-difference"

RESULT_SYSTEM = "urn:pxsgate:result"  # identifiers of what one result creates
MODEL_SYSTEM = "urn:pxsgate:model"  # the model's id, name-version
WEIGHTS_SYSTEM = "urn:pxsgate:model-weights-sha256"
ANCHORS_SYSTEM = "urn:pxsgate:model-anchors-sha256"
DICOM_UID_SYSTEM = "urn:dicom:uid"  # ImagingStudy.identifier of the Study Instance UID
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
FHIR_JSON = "application/fhir+json"

# uuid5 namespace of the Bundle's fullUrls: the same result id gives the same urn:uuid on
# every host and in every release.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pxsgate:fhir")


def full_url(result_id: str, part: str) -> str:
    """The Bundle-local ``urn:uuid:`` of one entry of a result's Bundle."""
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{result_id}/{part}')}"


class FhirError(PermanentExportError, ValueError):
    """A result that cannot be written as FHIR (no score, a value that is no number, an
    element FHIR refuses): permanent, a retry builds the same Bundle. The message names the
    element, never its value."""


class Codes:
    """The exporter's configured codes, defaults filled in."""

    def __init__(self, config: ExporterConfig) -> None:
        assert config.patient_id_system is not None  # the config check requires it
        self.patient_id_system = config.patient_id_system
        self.system = config.code_system or FHIR_DEFAULT_CODE_SYSTEM
        self.score = config.score_code or FHIR_DEFAULT_CODES["score"]
        self.change = config.change_code or FHIR_DEFAULT_CODES["change"]
        self.report = config.report_code or FHIR_DEFAULT_CODES["report"]

    def concept(self, code: str, display: str) -> CodeableConcept:
        return CodeableConcept(coding=[Coding(system=self.system, code=code, display=display)],
                               text=display)


def fhir_datetime(text: str | None) -> datetime | None:
    """A result's ISO 8601 time as a FHIR dateTime: a date alone stays a date; a time
    without an offset (StudyDate/StudyTime) is taken as this host's local time. None when
    there is none or it is no date."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if "T" not in text:
        # FHIR's dateTime may be a date alone, and fhir.resources keeps a date a date,
        # though it annotates the field as datetime.
        return cast(datetime, moment.date())
    return moment.astimezone().replace(microsecond=0)


def _decimal(value: str | float, what: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise FhirError(f"the {what} is not a number") from None
    if not number.is_finite():
        raise FhirError(f"the {what} is not a finite number")
    return number


def _identifier(system: str, value: str) -> Identifier:
    return Identifier(system=system, value=value)


def _token(text: str) -> str:
    """One part of a search token, escaped as FHIR search wants (\\ | , $) and for a URL."""
    for char in "\\|,$":
        text = text.replace(char, "\\" + char)
    return urllib.parse.quote(text, safe=":/")


def if_none_exist(identifiers: Sequence[Identifier]) -> str:
    """The search of a conditional create: a resource with all these identifiers."""
    return "&".join(f"identifier={_token(str(i.system))}|{_token(str(i.value))}"
                    for i in identifiers)


def _conditional(resource_type: str, *identifiers: Identifier) -> BundleEntryRequest:
    """A conditional create: POST unless a resource of this type has these identifiers."""
    return BundleEntryRequest(method="POST", url=resource_type,
                              ifNoneExist=if_none_exist(identifiers))


def _study(study_instance_uid: str) -> Reference:
    """The ImagingStudy by its identifier (PS3.18 / FHIR ImagingStudy: the Study Instance
    UID as ``urn:oid:``), a logical reference: the server need not hold it."""
    return Reference(type="ImagingStudy",
                     identifier=_identifier(DICOM_UID_SYSTEM, f"urn:oid:{study_instance_uid}"))


def _headline(document: ResultDocument) -> ResultEntry:
    scores = document.scores
    if document.status != Status.SUCCEEDED or not scores:
        raise FhirError(f"result is {str(document.status)!r} without a PXS score: "
                        "a FHIR exporter sends SUCCEEDED results")
    headline = document.pxsgate.headline
    if headline is not None:
        for entry in scores:
            if headline.sop_instance_uid in entry.source_uids:
                return entry
    return scores[0]


def _change(document: ResultDocument) -> Change | None:
    return next((r.change for r in document.results
                 if r.code == CHANGE_CODE and r.change is not None), None)


def _model_json(document: ResultDocument) -> Mapping[str, Any]:
    return document.model_json if document.model_json is not None else document.model.to_json()


def _format(number: float) -> str:
    return f"{number:.4f}".rstrip("0").rstrip(".")


def conclusion(document: ResultDocument, score: Decimal, demo: bool) -> str:
    """The DiagnosticReport's conclusion: what a reader must know, in words."""
    parts = [f"PXS score {score} (pulmonary x-ray severity; "
             f"model {document.model.name} {document.model.version})."]
    change = _change(document)
    if change is not None:
        parts.append(f"Change since the prior study of {change.prior_study_date} "
                     f"({_format(change.interval_days)} days earlier, PXS score "
                     f"{_format(change.prior_score)}): distance {_format(change.distance)}, "
                     f"score difference {_format(change.score_difference)}.")
    if document.pxsgate.flags:
        parts.append("Review flags: " + ", ".join(document.pxsgate.flags) + ".")
    if demo:
        parts.append(DEMO_COMMENT.format(
            model=f"{document.model.name} {document.model.version}"))
    return " ".join(parts)


def build_bundle(document: ResultDocument, codes: Codes) -> Bundle:
    """The transaction Bundle of one result; FhirError when FHIR refuses it."""
    try:
        return _bundle(document, codes)
    except pydantic.ValidationError as exc:
        # Only where: pydantic's message quotes the value (a PatientID, a UID).
        where = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise FhirError(f"{exc.title} refused by the FHIR model at {', '.join(where)}") from None


def _bundle(document: ResultDocument, codes: Codes) -> Bundle:
    rid = document.id
    demo = is_demo(_model_json(document))
    status = "preliminary" if demo else "final"
    headline = _headline(document)
    score = _decimal(headline.value, "PXS score")
    if not document.patient_id:
        raise FhirError("the result has no PatientID: the Observation needs its subject")
    subject = Reference(type="Patient",
                        identifier=_identifier(codes.patient_id_system, document.patient_id))
    study = _study(document.study_instance_uid)
    effective = fhir_datetime(document.pxsgate.study_datetime)
    issued = fhir_datetime(document.updated_at or document.created_at)
    notes = ([Annotation(text=DEMO_COMMENT.format(
        model=f"{document.model.name} {document.model.version}"))] if demo else None)
    imaging = [CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging",
                                              display="Imaging")])]
    lung = CodeableConcept(coding=[Coding(system=SNOMED, code="39607008",
                                          display="Lung structure")])
    device_url = full_url(rid, "device")
    device_ref = Reference(reference=device_url, type="Device")

    entries: list[BundleEntry] = [_device_entry(document, device_url)]
    score_id = _identifier(RESULT_SYSTEM, rid)
    score_url = full_url(rid, "observation")
    entries.append(BundleEntry(
        fullUrl=score_url,
        resource=Observation(
            identifier=[score_id], status=status, category=imaging,
            code=codes.concept(codes.score, "PXS score"), subject=subject,
            effectiveDateTime=effective, issued=issued, bodySite=lung,
            valueQuantity=Quantity(value=score, unit="score", system=UCUM, code="1"),
            derivedFrom=[study], device=device_ref, note=notes),
        request=_conditional("Observation", score_id)))
    results = [Reference(reference=score_url, type="Observation")]

    change = _change(document)
    if change is not None:
        change_id = _identifier(RESULT_SYSTEM, f"{rid}-change")
        change_url = full_url(rid, "change")
        entries.append(BundleEntry(
            fullUrl=change_url,
            resource=Observation(
                identifier=[change_id], status=status, category=imaging,
                code=codes.concept(codes.change, "PXS change since the prior study"),
                subject=subject, effectiveDateTime=effective, issued=issued,
                bodySite=lung,
                valueQuantity=Quantity(value=_decimal(change.distance, "change distance"),
                                       unit="distance", system=UCUM, code="1"),
                component=[
                    ObservationComponent(
                        code=codes.concept(INTERVAL_CODE, "Interval since the prior study"),
                        valueQuantity=Quantity(
                            value=_decimal(change.interval_days, "interval"),
                            unit="days", system=UCUM, code="d")),
                    ObservationComponent(
                        code=codes.concept(DIFFERENCE_CODE,
                                           "PXS score difference to the prior study"),
                        valueQuantity=Quantity(
                            value=_decimal(change.score_difference, "score difference"),
                            unit="score", system=UCUM, code="1")),
                ],
                derivedFrom=[study, _study(change.prior_study_instance_uid)],
                device=device_ref,
                note=[*(notes or ()), Annotation(
                    text=f"Prior study {change.prior_study_date}, "
                         f"PXS score {_format(change.prior_score)}.")]),
            request=_conditional("Observation", change_id)))
        results.append(Reference(reference=change_url, type="Observation"))

    report_id = _identifier(RESULT_SYSTEM, rid)
    entries.append(BundleEntry(
        fullUrl=full_url(rid, "report"),
        resource=DiagnosticReport(
            identifier=[report_id], status=status,
            category=[CodeableConcept(coding=[
                Coding(system=V2_0074, code="RAD", display="Radiology"),
                Coding(system=LOINC, code="LP29684-5", display="Radiology")])],
            code=codes.concept(codes.report, "PXS lung disease severity report"),
            subject=subject, effectiveDateTime=effective, issued=issued,
            result=results, imagingStudy=[study],
            conclusion=conclusion(document, score, demo)),
        request=_conditional("DiagnosticReport", report_id)))
    return Bundle(type="transaction", entry=entries)


def _device_entry(document: ResultDocument, url: str) -> BundleEntry:
    """The model as a Device, shared by every result of the same model, weights and
    anchors: a conditional create on all three identifiers."""
    model = document.model
    identifiers = [_identifier(MODEL_SYSTEM, model.id)]
    if model.weights_sha256:
        identifiers.append(_identifier(WEIGHTS_SYSTEM, model.weights_sha256))
    if model.anchors_sha256:
        identifiers.append(_identifier(ANCHORS_SYSTEM, model.anchors_sha256))
    return BundleEntry(
        fullUrl=url,
        resource=Device(
            identifier=identifiers, status="active",
            manufacturer=model.author or None,
            deviceName=[DeviceDeviceName(name=model.name or "PXS model", type="model-name")],
            version=[DeviceVersion(value=model.version)] if model.version else None,
            note=[Annotation(text=model.description)] if model.description else None),
        request=_conditional("Device", *identifiers))


def _outcome(answer: bytes) -> str:
    """The issue codes of an OperationOutcome answer (never its diagnostics: they may
    quote the Bundle), or the answer's size."""
    try:
        data: Any = json.loads(answer)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        issues = [f"{i.get('severity')} {i.get('code')}" for i in data.get("issue") or ()
                  if isinstance(i, dict)]
        return f"OperationOutcome: {'; '.join(issues) or 'no issue'}"
    return f"{len(answer)}-byte answer"


def check_response(answer: bytes, sent: int) -> None:
    """A 200/201 answer must be a transaction-response Bundle with an entry per entry sent,
    each 2xx; else PermanentExportError saying what it is instead."""
    try:
        response = Bundle.model_validate_json(answer)
    except (pydantic.ValidationError, ValueError):
        raise PermanentExportError(
            f"the answer is not a FHIR Bundle ({_outcome(answer)}): is url the FHIR "
            "base?") from None
    if response.type != "transaction-response":
        raise PermanentExportError(f"the answer is a {response.type!r} Bundle, not a "
                                   "transaction-response")
    statuses = [(e.response.status or "") if e.response is not None else ""
                for e in response.entry or ()]
    if len(statuses) != sent:
        raise PermanentExportError(f"the transaction-response has {len(statuses)} entries "
                                   f"for the {sent} sent")
    failed = [s for s in statuses if not s.strip().startswith("2")]
    if failed:
        raise PermanentExportError(f"the transaction-response says {', '.join(failed)}")


def device_key(bundle: Bundle) -> str:
    """The Device's conditional search: the same for every result of one model."""
    request = (bundle.entry or [])[0].request
    return str(request.ifNoneExist) if request is not None else ""


class FhirExporter:
    def __init__(self, config: ExporterConfig, key: str) -> None:
        self.name = config.name
        self._codes = Codes(config)
        self._client = HttpClient(config, key)
        # POST [base]: the transaction interaction (FHIR R4 http.html#transaction).
        self._url = self._client.url.rstrip("/")
        # Devices this exporter saw the server take. Until then, one delivery at a time: two
        # transactions at once would both find no Device and create it twice, and a
        # conditional create that finds two is refused (412) from then on.
        self._devices: set[str] = set()
        self._first = asyncio.Lock()

    async def start(self) -> None:
        await self._client.start()

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        bundle = build_bundle(document, self._codes)
        device = device_key(bundle)
        if device in self._devices:
            await self._post(delivery_id, document, bundle)
            return
        async with self._first:
            await self._post(delivery_id, document, bundle)
            self._devices.add(device)

    async def _post(self, delivery_id: str, document: ResultDocument, bundle: Bundle) -> None:
        body = bundle.model_dump_json().encode()
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON,
                   # The answer need not carry the resources: their status and location do.
                   "Prefer": "return=minimal",
                   "X-Pxsgate-Delivery-Id": delivery_id, "X-Pxsgate-Result-Id": document.id}
        status, answer = await self._client.post(self._url, body, headers)
        where = f"POST {self._url}: HTTP {status}"
        if status in (200, 201):
            try:
                check_response(answer, len(bundle.entry or ()))
            except PermanentExportError as exc:
                raise PermanentExportError(f"{where}: {exc}") from None
            return
        if 200 <= status < 300:
            raise PermanentExportError(f"{where}: a transaction is answered 200 "
                                       f"({_outcome(answer)})")
        raise refusal(f"{where} ({_outcome(answer)})", status)

    async def close(self) -> None:
        await self._client.close()
