"""The DICOMweb exporter: the result's Comprehensive SR (the same instance the dicom
exporter sends) stored in a DICOMweb archive by STOW-RS (PS3.18 10.5): one POST of a
``multipart/related; type="application/dicom"`` body to ``{url}/studies``, with the
exporter's bearer token and TLS settings.

The answer (PS3.18 10.5.3): 200, stored; 202, some instances stored and others not, so the
Store Instances Response is read, and an SR in its FailedSOPSequence failed with the
reason given; 409, none stored (a conflict: permanent). 408, 425, 429 and 5xx are retried,
other 4xx are permanent. A failure reason of the A7xx family (out of resources) is retried;
others are permanent.
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
from pxsgate.store import Store

# Store Instances Response attributes (PS3.18 Table 10.5.3-1), as DICOM JSON keys.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


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


def failure_reason(answer: bytes, sop_instance_uid: str) -> int | None:
    """The FailureReason the Store Instances Response gives for this instance (0 when it
    is listed without one), or None when it is not listed as failed or is unreadable."""
    try:
        response: Any = json.loads(answer)
    except ValueError:
        return None
    if isinstance(response, list) and response:  # some archives answer an array of one
        response = response[0]
    if not isinstance(response, dict):
        return None
    failed = (response.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    for item in failed:
        if not isinstance(item, dict):
            continue
        uids = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        if sop_instance_uid in uids:
            reasons = (item.get(FAILURE_REASON) or {}).get("Value") or [0]
            return int(reasons[0]) if isinstance(reasons[0], int) else 0
    return None


class StowSrExporter(SrExporter):
    """The SR by STOW-RS to ``{url}/studies``."""

    def __init__(self, config: ExporterConfig, store: Store, key: str) -> None:
        super().__init__(config, store)
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
        if status == 200 and reason is None:
            return
        if status == 202 and reason is None:
            return  # stored, with a warning (coercion, elements dropped)
        where = f"STOW-RS {self._url}: HTTP {status}"
        if reason is not None:
            message = f"{where}, failure reason 0x{reason:04X}"
            if reason & 0xFF00 == 0xA700:  # out of resources: a later try may fit
                raise ExportError(message)
            raise PermanentExportError(message)
        if status in (202, 409):
            raise PermanentExportError(f"{where}: the SR was not stored")
        # Only the answer's size: an archive's error text may quote the SR's header.
        raise refusal(f"{where} ({len(answer)}-byte answer)", status)
