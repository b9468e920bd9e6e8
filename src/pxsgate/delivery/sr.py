"""The PXS result as a DICOM Structured Report, and a C-STORE client to deliver it.

A result document (see ``results.py``) stays inside pxsgate; a PACS and its viewers only show
DICOM. ``build_pxs_sr`` renders one SUCCEEDED document as a Comprehensive SR whose content is
a TID 1500 Measurement Report, the template that viewers and PACS already understand for
quantitative results:

    Imaging Measurement Report (TID 1500)
    ├── language, device observer (this gateway), procedure reported (plain chest X-ray)
    ├── Imaging Measurements
    │   └── one Measurement Group (TID 1501) per scored image, headline first
    │       ├── tracking identifier and tracking UID
    │       ├── finding site: Lung
    │       └── PXS score (TID 300, NUM) ── source of measurement: the image
    │                                    └─ algorithm identification (TID 4019)
    └── comments: "not for clinical use" (demonstration weights), review flags

Patient and study attributes are copied from the source image headers (highdicom's evidence),
so the SR files under the same study as the images; the images are listed as evidence.

The SR's SOP Instance UID and Series Instance UID are the caller's, derived with
``uid_from_id`` from the result id (``export.py``), and the dates come from the result
document: a retried delivery sends the same instance again and the PACS de-duplicates it
instead of showing the score twice.

``send_dataset`` is a blocking C-STORE (one association, one instance) for the caller to run
in a thread.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM
from pynetdicom import AE
from pynetdicom.events import EVT_PDU_RECV, Event
from pynetdicom.pdu import A_ASSOCIATE_RJ

from pxsgate import __version__
from pxsgate.errors import ExportError, PermanentExportError
from pxsgate.records import Status
from pxsgate.results import PXS_CODE

# There is no standard (DCM, SCT, LOINC) concept for the PXS score, so it gets a code in a
# private coding scheme: designators starting "99" are the ones DICOM leaves to local schemes
# (PS3.16, Coding Schemes), and the SR declares it in its Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99PXSGATE"
PXS_SCORE = hd.sr.CodedConcept(value="PXS", scheme_designator=PRIVATE_SCHEME,
                               meaning="PXS score")
# The score is dimensionless: UCUM "1" (no units) is the unit CID 7181 lists for that, and
# it reads correctly in any UCUM-aware viewer; "{score}" is the same unit, only annotated.
NO_UNITS = codes.UCUM.NoUnits
LUNG = codes.SCT.Lung  # SCT 39607008
# SNOMED CT "Plain X-ray of chest" (procedure): what the measurements were made on.
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(value="399208008", scheme_designator="SCT",
                                      meaning="Plain chest X-ray")
COMMENT = codes.DCM.Comment  # DCM 121106

SERIES_DESCRIPTION = "PXS score"
DEMO_SERIES_DESCRIPTION = "PXS score (demonstration weights, not for clinical use)"
DEMO_MARKER = "not for clinical use"
DEMO_COMMENT = "NOT FOR CLINICAL USE: scored with demonstration weights ({model})."
MODEL_NAME = "pxsgate"

# uuid5 namespace of pxsgate's derived UIDs; a constant, so the same id gives the same UID
# on every host and in every release.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pxsgate:dicom-uid")
# Type 2 attributes highdicom reads from the first evidence dataset without a default.
_TYPE2_STUDY_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                           "AccessionNumber", "StudyID", "StudyDate", "StudyTime")


class SrError(PermanentExportError, ValueError):
    """A result document that cannot be rendered as an SR (not SUCCEEDED, no results, a source
    image missing): permanent, a retry builds the same nothing. The message names what is
    missing, never patient data."""


class SendError(ExportError, ConnectionError):
    """The SR could not be delivered (association refused, rejected or aborted, or no C-STORE
    response): a later try may succeed. The message names the peer (AE title, host:port)."""


def uid_from_id(text: str) -> str:
    """A DICOM UID derived from a stable id: ``2.25.`` and the 128-bit integer of a name-based
    UUID (PS3.5 B.2), at most 44 characters. The same id always gives the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, text).int}"


def is_demo(model: Mapping[str, Any]) -> bool:
    """Whether a result's ``model`` block says demonstration weights (not for clinical
    use): every exporter says so to its readers."""
    return DEMO_MARKER in str(model.get("description", "")).lower()


def document_time(document: Mapping[str, Any]) -> datetime | None:
    """When the score was final (``updatedAt``, else ``createdAt``), in local time like the
    rest of a DICOM header; None when the document has no usable timestamp."""
    for key in ("updatedAt", "createdAt"):
        try:
            moment = datetime.fromisoformat(str(document[key]))
        except (KeyError, ValueError):
            continue
        return moment.astimezone().replace(tzinfo=None)
    return None


def _source_uid(result: Mapping[str, Any], index: int) -> str:
    try:
        uid = result["derivedFrom"][0]["refSopInstanceUid"][0]
    except (KeyError, IndexError, TypeError):
        raise SrError(f"result {index} names no source image "
                      "(derivedFrom[0].refSopInstanceUid[0] is missing)") from None
    if not isinstance(uid, str) or not uid:
        raise SrError(f"result {index} names no source image (empty SOP Instance UID)")
    return uid


def _score(result: Mapping[str, Any], index: int) -> float:
    try:
        return float(result["value"])
    except (KeyError, TypeError, ValueError):
        raise SrError(f"result {index} has no numeric value") from None


def _evidence_header(source: Dataset) -> Dataset:
    """A copy of the source header that highdicom's SR constructor accepts: the Type 2 study
    attributes it reads are present, empty where the modality left them out or wrote a value
    it cannot parse (real headers carry hashed birth dates). A deep copy: pydicom's shallow
    copies share their elements, and the caller's dataset must not change."""
    header = copy.deepcopy(source)  # a header without pixels: small
    for keyword in _TYPE2_STUDY_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, None)
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = header[keyword].value
        if value:
            try:
                parse(value)
            except ValueError:
                setattr(header, keyword, None)
    if header.PatientSex not in (None, "", "M", "F", "O"):
        header.PatientSex = None
    # highdicom warns about odd names and quotes them (PHI in a log): build_pxs_sr copies the
    # source's name into the SR itself, unchecked.
    header.PatientName = None
    return header


def build_pxs_sr(
    document: Mapping[str, Any],
    sources: Sequence[Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    manufacturer: str = "pxsgate",
    device_serial: str = "",
    previous_versions: Sequence[Dataset] = (),
) -> Dataset:
    """Render a SUCCEEDED result ``document`` as a Comprehensive SR (TID 1500).

    ``sources`` are the headers of the scored images (any order, pixel data not needed),
    matched to the results by SOP Instance UID. ``device_serial`` identifies this gateway
    installation (DeviceSerialNumber, device observer serial); empty: not recorded.
    ``previous_versions``: the SRs this one supersedes (a rescore of the study), each a
    dataset with SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID; they
    are named in PredecessorDocumentsSequence (PS3.3 C.17.2), which is how PACS and viewers
    tell the current version from the ones it replaces.
    Raises SrError when the document is not SUCCEEDED, has no PXS result, or a source image
    is missing or belongs to another study.
    """
    scored = _scored_sources(document, sources)
    model = document.get("model") or {}
    result_id = str(document.get("id") or sop_instance_uid)
    report = _measurement_report(
        _measurement_groups(scored, _algorithm(model), result_id), manufacturer, device_serial)
    demo = is_demo(model)
    _add_comments(report, _comments(document, demo))
    moment = document_time(document)
    when: dict[str, Any] = {}
    if moment is not None:
        when = {"content_date": moment.date(), "content_time": moment.time(),
                "series_date": moment.date(), "series_time": moment.time()}
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence_header(source) for _, source in scored],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number=device_serial or None,
        series_description=DEMO_SERIES_DESCRIPTION if demo else SERIES_DESCRIPTION,
        # Complete, but an algorithm's output that nobody has verified.
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous_versions) or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="pxsgate private codes",
            responsible_organization="pxsgate")],
        **when,
    )
    if "PatientName" in scored[0][1]:
        sr.PatientName = scored[0][1].PatientName
    if moment is not None:
        _stamp(sr, moment)
    return sr


def _scored_sources(document: Mapping[str, Any],
                    sources: Sequence[Dataset]) -> list[tuple[float, Dataset]]:
    """Each PXS score of a SUCCEEDED document with the header of its image, in the
    document's order; SrError when there is none, or an image is missing or elsewhere."""
    status = document.get("status")
    if status != Status.SUCCEEDED:
        raise SrError(f"result document is {status!r}, not '{Status.SUCCEEDED}': there is no score")
    # Only the PXS scores. The pxs.change entry (distance to the patient's prior image, of
    # another study) is not rendered: TID 1500 would need a second measurement group with
    # evidence from outside this study; left for later.
    results = [r for r in document.get("results") or () if r.get("code", PXS_CODE) == PXS_CODE]
    if not results:
        raise SrError("result document has no PXS result")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources if "SOPInstanceUID" in ds}
    study_uid = document.get("studyInstanceUid")
    scored: list[tuple[float, Dataset]] = []
    for index, result in enumerate(results, 1):
        source = by_uid.get(_source_uid(result, index))
        if source is None:
            raise SrError(f"no source image header for result {index}")
        # The SR files under the study of its evidence: never let it land in another one.
        if study_uid and source.get("StudyInstanceUID") != study_uid:
            raise SrError(f"the source image of result {index} is not in the result's study")
        scored.append((_score(result, index), source))
    return scored


def _model_name(model: Mapping[str, Any]) -> tuple[str, str]:
    return str(model.get("name") or "PxsScore"), str(model.get("version") or "unknown")


def _algorithm(model: Mapping[str, Any]) -> hd.sr.AlgorithmIdentification:
    name, version = _model_name(model)
    parameters = ([f"weightsSha256={model['weightsSha256']}"]
                  if model.get("weightsSha256") else None)
    return hd.sr.AlgorithmIdentification(
        name=name, version=version, parameters=parameters,
        manufacturer=str(model["author"]) if model.get("author") else None)


def _measurement_groups(scored: Sequence[tuple[float, Dataset]],
                        algorithm: hd.sr.AlgorithmIdentification, result_id: str
                        ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One measurement group per scored image: its PXS score, measured on it."""
    groups = []
    for number, (value, source) in enumerate(scored, 1):
        image_uid = str(source.SOPInstanceUID)
        measurement = hd.sr.Measurement(
            name=PXS_SCORE, value=value, unit=NO_UNITS, algorithm_id=algorithm,
            referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(source)])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            # Derived, not random, so that a rebuilt SR has the same content.
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uid_from_id(f"{result_id}/tracking/{image_uid}"),
                identifier=f"PXS score, image {number}"),
            finding_sites=[hd.sr.FindingSite(LUNG)],
            measurements=[measurement]))
    return groups


def _measurement_report(groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
                        manufacturer: str, device_serial: str) -> hd.sr.MeasurementReport:
    """TID 1500 observed by this device (the gateway installation)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid_from_id(f"device/{manufacturer}/{device_serial}"), name=MODEL_NAME,
        manufacturer_name=manufacturer, model_name=MODEL_NAME,
        serial_number=device_serial or None)
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=list(groups))


def _comments(document: Mapping[str, Any], demo: bool) -> list[str]:
    """What a reader must know besides the scores: demonstration weights, review flags."""
    comments = []
    if demo:
        name, version = _model_name(document.get("model") or {})
        comments.append(DEMO_COMMENT.format(model=f"{name} {version}"))
    flags = [str(f) for f in (document.get("pxsgate") or {}).get("flags") or ()]
    if flags:
        comments.append("Review flags: " + ", ".join(flags))
    return comments


def _add_comments(report: hd.sr.MeasurementReport, comments: Sequence[str]) -> None:
    root = report[0]
    for text in comments:
        # TID 1500 is extensible: free-text comments follow the measurements.
        root.ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _stamp(sr: Dataset, moment: datetime) -> None:
    """highdicom stamps the build time; the result's time keeps a rebuilt SR identical."""
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for item in sr.get("ContributingEquipmentSequence", ()):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(moment)


# A-ASSOCIATE-RJ diagnostics of the service user (PS3.8 7.1.1.9, source 1).
_REJECT_REASONS = {
    2: "application context name not supported",
    3: "calling AE title not recognized: the PACS must list {calling} among its modalities",
    7: "called AE title not recognized: check the exporter's ae-title",
}


def _rejection(rejection: A_ASSOCIATE_RJ, calling_ae: str) -> str:
    """Why the peer rejected the association, in words, when its A-ASSOCIATE-RJ says."""
    if rejection.source == 1:  # the service user: the PACS itself
        reason = _REJECT_REASONS.get(rejection.reason_diagnostic or 0, "no reason given")
        return f" ({reason.format(calling=calling_ae)})"
    if rejection.source in (2, 3):  # its service provider
        return " (by the peer's service provider: busy, or no association slot free)"
    return ""


def send_dataset(ds: Dataset, *, host: str, port: int, called_ae: str, calling_ae: str,
                 timeout: float = 30.0) -> int:
    """C-STORE ``ds`` to ``called_ae`` at ``host:port`` in one association; blocking.

    Returns the DIMSE status of the response, warnings (0xB000, 0xB006, 0xB007) and failures
    included: the caller decides. Raises SendError when no association is established or no
    response arrives within ``timeout`` seconds (each of connect, ACSE, DIMSE and network).
    """
    peer = f"{called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    # The A-ASSOCIATE-RJ is kept as it arrives: a peer that closes the connection right after
    # it (DCMTK does) can leave pynetdicom's association aborted rather than rejected.
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(EVT_PDU_RECV, on_pdu)])
    if rejections:
        raise SendError(f"association with {peer} was rejected"
                        f"{_rejection(rejections[0], calling_ae)}")
    if not assoc.is_established:
        raise SendError(f"no association with {peer} (refused, aborted or timed out)")
    try:
        if not assoc.accepted_contexts:
            raise SendError(f"{peer} accepted no presentation context for SOP class "
                            f"{ds.SOPClassUID}")
        started = time.monotonic()
        response = assoc.send_c_store(ds)
        if "Status" in response:
            return int(response.Status)
        # pynetdicom aborts itself when the DIMSE timeout expires, so "aborted" alone does not
        # tell a silent peer from one that hung up; the time taken does.
        if time.monotonic() - started >= timeout:
            raise SendError(f"no C-STORE response from {peer} within {timeout:g} s")
        # What a PACS (Orthanc, dcm4chee) does to a calling AE title it does not know, when
        # it accepts the association and refuses the storage only then.
        raise SendError(
            f"association with {peer} was aborted before the C-STORE response: a PACS does "
            f"this to a calling AE title it does not know; check that {called_ae} lists "
            f"{calling_ae} (with this host's address) among the modalities allowed to store")
    finally:
        if assoc.is_established:
            assoc.release()
