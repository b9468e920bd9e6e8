"""The DICOMweb exporter: the result's Comprehensive SR (the same instance the dicom
exporter sends) stored in a DICOMweb archive by STOW-RS (PS3.18 10.5): one POST of a
``multipart/related; type="application/dicom"`` body to ``{url}/studies``, with the
exporter's bearer token and TLS settings.

The answer (PS3.18 10.5.3): 200, stored; 202, stored with warnings when the Store Instances
Response lists the SR as stored, else read as a failure; 409, none stored (a conflict:
permanent). An SR in the FailedSOPSequence failed with the reason given: out of resources
(A7xx) and processing failure (0110) are retried, a duplicate (0111, or Azure's B00E) means
an earlier try stored it, others are permanent. 408, 425, 429 and 5xx are retried, other
4xx and redirects are permanent.
"""

from __future__ import annotations

import json
import uuid
from io import BytesIO
from typing import Any

import pydicom
from pydicom import Dataset

from pxsgate.config import ExporterConfig
from pxsgate.delivery.dicom import SrExporter
from pxsgate.delivery.http import HttpClient, refusal
from pxsgate.errors import ExportError, PermanentExportError
from pxsgate.pictures import PictureStore
from pxsgate.store import Store

# Store Instances Response attributes (PS3.18 Table 10.5.3-1), as DICOM JSON keys.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
REFERENCED_SOP_SEQUENCE = "00081199"
# Failure reasons that say the instance is already there: a retry after a lost answer.
# 0x0111 Duplicate SOP Instance (PS3.7 C.4); 0xB00E (45070) is how Azure's DICOM service
# says "already stored".
ALREADY_STORED = frozenset({0x0111, 0xB00E})
# Failure reasons a later try may fix: 0x0110 Processing failure, A7xx Out of Resources.
RETRYABLE_REASONS = frozenset({0x0110})


def part10(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, File Meta Information), as STOW-RS takes it."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(parts: list[bytes]) -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts (RFC 2387, PS3.18 8.6.1.2) and
    its Content-Type. The boundary is random: a DICOM file cannot contain it by chance."""
    boundary = f"pxsgate-{uuid.uuid4().hex}"
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _response(answer: bytes) -> dict[str, Any]:
    """The Store Instances Response as DICOM JSON; {} when the answer is not one."""
    try:
        response: Any = json.loads(answer)
    except ValueError:
        return {}
    if isinstance(response, list) and response:  # some archives answer an array of one
        response = response[0]
    return response if isinstance(response, dict) else {}


def _values(item: Any, key: str) -> list[Any]:
    attribute = item.get(key) if isinstance(item, dict) else None
    values = attribute.get("Value") if isinstance(attribute, dict) else None
    return values if isinstance(values, list) else []


def _listed(response: dict[str, Any], sequence: str, sop_instance_uid: str) -> Any:
    """The item of ``sequence`` that names this instance, or None."""
    return next((item for item in _values(response, sequence)
                 if sop_instance_uid in _values(item, REFERENCED_SOP_INSTANCE_UID)), None)


def failure_reason(answer: bytes, sop_instance_uid: str) -> int | None:
    """The FailureReason the Store Instances Response gives for this instance (0 when it
    is listed without one), or None when it is not listed as failed or is unreadable."""
    item = _listed(_response(answer), FAILED_SOP_SEQUENCE, sop_instance_uid)
    if item is None:
        return None
    reasons = _values(item, FAILURE_REASON)
    return reasons[0] if reasons and isinstance(reasons[0], int) else 0


def stored(answer: bytes, sop_instance_uid: str) -> bool:
    """The Store Instances Response lists this instance in its ReferencedSOPSequence."""
    return _listed(_response(answer), REFERENCED_SOP_SEQUENCE, sop_instance_uid) is not None


class StowSrExporter(SrExporter):
    """The SR by STOW-RS to ``{url}/studies``."""

    def __init__(self, config: ExporterConfig, store: Store, key: str, *,
                 pictures: PictureStore | None = None) -> None:
        super().__init__(config, store, pictures=pictures)
        self._client = HttpClient(config, key)
        self._url = self._client.url.rstrip("/") + "/studies"

    async def start(self) -> None:
        await self._client.start()

    async def close(self) -> None:
        await self._client.close()

    async def _send(self, dataset: Dataset) -> None:
        body, content_type = multipart_related([part10(dataset)])
        status, answer = await self._client.post(
            self._url, body, {"Content-Type": content_type,
                              "Accept": "application/dicom+json"})
        uid = str(dataset.SOPInstanceUID)
        reason = failure_reason(answer, uid) if status in (200, 202, 409) else None
        if reason in ALREADY_STORED:
            return  # sent before, its answer lost: the archive holds it
        if status == 200 and reason is None:
            return
        if status == 202 and reason is None and stored(answer, uid):
            return  # stored, with a warning (coercion, elements dropped)
        where = f"STOW-RS {self._url}: HTTP {status}"
        if reason is not None:
            message = f"{where}, failure reason 0x{reason:04X}"
            if reason in RETRYABLE_REASONS or reason & 0xFF00 == 0xA700:
                raise ExportError(message)
            raise PermanentExportError(message)
        if status == 202:
            raise ExportError(f"{where}: the answer does not say the SR was stored")
        if status == 409:
            raise PermanentExportError(f"{where}: the SR was not stored")
        # Only the answer's size: an archive's error text may quote the SR's header.
        raise refusal(f"{where} ({len(answer)}-byte answer)", status)
