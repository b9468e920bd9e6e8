"""The PACS that priors are fetched from: a patient's earlier CR/DX studies found (Study
Root C-FIND, or QIDO-RS) and retrieved into a folder (C-GET on the same association, C-MOVE
to pxsgate's own AE title, or WADO-RS).

Every call blocks (pynetdicom, requests): the finder runs them on its own threads. A peer
that refuses, fails or does not answer within ``timeout-seconds`` raises
:class:`SourceRefused` with pxsgate's words (never a value from the peer: no PHI).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from pxsgate.config import PriorSourceConfig
from pxsgate.priors.inbox import MoveInbox

log = structlog.get_logger("pxsgate.priors")

MODALITIES = ("CR", "DX")
# The storage SOP classes a C-GET accepts (the SCP role): the images a prior's AP film can
# be, and the transfer syntaxes pxsgate decodes.
PRIOR_IMAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEG2000,
                     JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit, RLELossless)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


class SourceRefused(Exception):
    """The PACS refused, failed or did not answer; the message says which."""


@dataclass(frozen=True)
class PriorStudy:
    """A study the PACS holds for the patient."""

    study_instance_uid: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS(.ffffff), or ""

    @property
    def sort_key(self) -> str:
        return f"{self.study_date}{self.study_time}"


class PriorSource(Protocol):
    """Finds and retrieves a patient's earlier studies (blocking calls)."""

    label: str

    def find(self, patient_id: str, date_from: str | None, date_to: str) -> list[PriorStudy]:
        """The patient's CR/DX studies dated in [date_from, date_to] (YYYYMMDD; None: no
        lower bound)."""
        ...

    def retrieve(self, study_uid: str, into: Path) -> int:
        """The study's instances written into ``into`` as Part-10 files; how many."""
        ...

    def close(self) -> None:
        """Abort what is under way (the service stops)."""
        ...


def date_range(date_from: str | None, date_to: str) -> str:
    return f"{date_from or ''}-{date_to}"


def _modalities_match(value: object) -> bool:
    """A study whose ModalitiesInStudy the PACS did not say may still hold a radiograph;
    one that lists only other modalities does not."""
    if value in (None, ""):
        return True
    values = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    flat = {v.strip() for item in values for v in item.split("\\")}
    return bool(flat & set(MODALITIES)) or not any(flat)


class DimseSource:
    """A DIMSE Q/R SCP (Study Root): C-FIND, then C-GET or C-MOVE."""

    def __init__(self, config: PriorSourceConfig, inbox: MoveInbox | None,
                 move_destination: str) -> None:
        self._config = config
        self._inbox = inbox
        self._move_destination = move_destination
        self.label = config.label
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._closed = False

    # --- find ---------------------------------------------------------------------------

    def find(self, patient_id: str, date_from: str | None, date_to: str) -> list[PriorStudy]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.StudyDate = date_range(date_from, date_to)
        query.StudyTime = ""
        query.StudyInstanceUID = ""
        query.ModalitiesInStudy = "\\".join(MODALITIES)
        found: list[PriorStudy] = []
        with self._association([STUDY_ROOT_FIND]) as assoc:
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                code = self._status(status, "C-FIND")
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    study = _prior_study(identifier)
                    if study is not None and _modalities_match(
                            identifier.get("ModalitiesInStudy")):
                        found.append(study)
        return found

    # --- retrieve -----------------------------------------------------------------------

    def retrieve(self, study_uid: str, into: Path) -> int:
        if self._config.retrieve == "c-move":
            return self._move(study_uid, into)
        return self._get(study_uid, into)

    def _get(self, study_uid: str, into: Path) -> int:
        from pynetdicom import build_role, evt

        written = 0

        def on_store(event: Any) -> int:
            nonlocal written
            written += 1
            path = into / f"get-{written:06d}.dcm"
            try:
                with open(path, "wb") as f:
                    f.write(event.encoded_dataset(include_meta=True))
            except OSError:
                return 0xA700
            return 0x0000

        roles = [build_role(uid, scp_role=True) for uid in PRIOR_IMAGE_CLASSES]
        with self._association([STUDY_ROOT_GET], storage=True, ext_neg=roles,
                               handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            for status, _ in assoc.send_c_get(_retrieve_query(study_uid), STUDY_ROOT_GET):
                self._status(status, "C-GET", warning_ok=True)
        return written

    def _move(self, study_uid: str, into: Path) -> int:
        if self._inbox is None:
            raise SourceRefused("C-MOVE needs pxsgate's SCP to receive the instances")
        with self._inbox.expecting(study_uid, into), \
                self._association([STUDY_ROOT_MOVE]) as assoc:
            for status, _ in assoc.send_c_move(_retrieve_query(study_uid),
                                               self._move_destination, STUDY_ROOT_MOVE):
                self._status(status, "C-MOVE", warning_ok=True)
        # The final C-MOVE response comes after the last sub-operation's C-STORE was
        # answered, and the inbox answers each one only once it is written.
        return len(list(into.glob("move-*.dcm")))

    # --- the association ----------------------------------------------------------------

    @contextmanager
    def _association(self, contexts: list[str], *, storage: bool = False,
                     ext_neg: list[Any] | None = None,
                     handlers: list[Any] | None = None) -> Iterator[Any]:
        from pynetdicom import AE

        config = self._config
        ae = AE(ae_title=config.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_seconds
        ae.connection_timeout = config.timeout_seconds
        for uid in contexts:
            ae.add_requested_context(uid)
        if storage:
            for uid in PRIOR_IMAGE_CLASSES:
                ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
        if config.host is None or config.port is None or config.ae_title is None:
            raise SourceRefused("priors.source: host, port and ae-title are required")
        if self._closed:
            raise SourceRefused("the service is stopping")
        assoc = ae.associate(config.host, config.port, ae_title=config.ae_title,
                             ext_neg=ext_neg, evt_handlers=handlers)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise SourceRefused("the PACS rejected the association")
            raise SourceRefused("no association with the PACS (unreachable, or no answer "
                                f"within {config.timeout_seconds:g} s)")
        with self._lock:
            self._open.add(assoc)
        try:
            yield assoc
            if assoc.is_aborted:
                raise SourceRefused("the PACS aborted the association, or did not answer "
                                    f"within {config.timeout_seconds:g} s")
        finally:
            with self._lock:
                self._open.discard(assoc)
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _status(status: Dataset, operation: str, *, warning_ok: bool = False) -> int:
        """The response's status; raises SourceRefused on a failure."""
        if "Status" not in status:  # no response: the association was aborted or timed out
            raise SourceRefused(f"{operation}: no answer from the PACS")
        code = int(status.Status)
        if code in (0x0000, 0xFF00, 0xFF01):
            return code
        if code & 0xF000 == 0xB000 and warning_ok:
            return code  # some sub-operations failed (an SR, say): what arrived is used
        if code == 0xFE00:
            raise SourceRefused(f"{operation} cancelled by the PACS")
        raise SourceRefused(f"{operation} failed with status 0x{code:04X}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            open_now = list(self._open)
        for assoc in open_now:
            assoc.abort()


def _retrieve_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _prior_study(identifier: Dataset) -> PriorStudy | None:
    uid = str(identifier.get("StudyInstanceUID", "") or "").strip()
    date = str(identifier.get("StudyDate", "") or "").strip()
    if not uid or len(date) != 8 or not date.isdigit():
        return None  # without a date it cannot be placed before this study
    return PriorStudy(uid, date, str(identifier.get("StudyTime", "") or "").strip())


class DicomwebSource:
    """A DICOMweb archive: QIDO-RS, then WADO-RS, through dicomweb-client."""

    def __init__(self, config: PriorSourceConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        assert config.url is not None
        self.label = config.label
        session = requests.Session()
        if config.ca_certificates is not None:
            session.verify = str(config.ca_certificates)
        if config.client_certificate is not None:
            session.cert = (str(config.client_certificate) if config.client_key is None
                            else (str(config.client_certificate), str(config.client_key)))
        headers: dict[str, str] = {}
        if config.bearer_token_file is not None:
            token = config.bearer_token_file.read_text(encoding="utf-8").strip()
            headers["Authorization"] = f"Bearer {token}"
        self._session = session
        self._client = DICOMwebClient(config.url.rstrip("/"), session=session,
                                      headers=headers, timeout=config.timeout_seconds)

    def find(self, patient_id: str, date_from: str | None, date_to: str) -> list[PriorStudy]:
        found = []
        with _http_errors("QIDO-RS"):
            studies = self._client.search_for_studies(
                search_filters={"PatientID": patient_id,
                                "StudyDate": date_range(date_from, date_to)},
                fields=["StudyDate", "StudyTime", "ModalitiesInStudy"], get_remaining=True)
        for item in studies:
            ds = Dataset.from_json(item)
            study = _prior_study(ds)
            if study is not None and _modalities_match(ds.get("ModalitiesInStudy")):
                found.append(study)
        return found

    def retrieve(self, study_uid: str, into: Path) -> int:
        written = 0
        with _http_errors("WADO-RS"):
            for ds in self._client.iter_study(study_uid):
                written += 1
                ds.save_as(into / f"wado-{written:06d}.dcm", enforce_file_format=True)
        return written

    def close(self) -> None:
        self._session.close()


@contextmanager
def _http_errors(operation: str) -> Iterator[None]:
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise SourceRefused(f"{operation}: the archive answered HTTP {code}") from None
    except requests.Timeout:
        raise SourceRefused(f"{operation}: no answer in time") from None
    except requests.RequestException as exc:
        raise SourceRefused(f"{operation}: {type(exc).__name__}") from None


def make_source(config: PriorSourceConfig, inbox: MoveInbox | None,
                move_destination: str) -> PriorSource:
    if config.type == "dicomweb":
        return DicomwebSource(config)
    return DimseSource(config, inbox, move_destination)
