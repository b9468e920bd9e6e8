"""STOW-RS ingress: DICOMweb's Store Transaction (PS3.18 10.5) as a way in beside C-STORE.

    POST /dicomweb/studies            multipart/related; type="application/dicom"
    POST /dicomweb/studies/{study}    the same; every instance must belong to {study}

Each part, a PS3.10 file, is read from the request body in bounded chunks (at most
``dicom.scp.max-dataset-mb``; the whole body at most ``http.stow-max-request-mb``), its file
meta parsed, and the data set handed to :mod:`pxsgate.intake` on a worker thread: the same
checks, admission (backpressure, the disk floor), fsynced spool write and SQLite index as a
C-STORE. An instance is listed as stored only once that returned. A request is an
association: it gets its own association id, and its end (answered, failed, or the peer
gone) is the association's release for study completion.

The answer is the Store Instances Response (PS3.18 Annex I) as application/dicom+json:
ReferencedSOPSequence (0008,1199) for the instances stored, FailedSOPSequence (0008,1198)
with FailureReason (0008,1197) for the others (PS3.18 I.2.2):
  0xA700  Out of Resources   (a part over max-dataset-mb, the body over its limit,
                              backpressure, disk or spool full, the store failed)
  0xA900  Data Set does not match SOP Class (its UIDs differ from its file meta, or its
                              StudyInstanceUID from the study named in the URL: identifiers
                              that differ from the request, as intake answers a C-STORE)
  0xC122  Referenced Transfer Syntax not supported (not one of dicom.scp.transfer-syntaxes)
  0xC210  Cannot understand  (not a PS3.10 file, an unreadable data set, a part of another
                              media type, a part cut short)
HTTP 200 all stored, 202 some stored, 409 none stored (the request well formed), 400 none
stored and the body malformed (or no part at all), 415 not multipart/related of
application/dicom, 413 a Content-Length over the request limit. Each distinct reason is
also in a ``Warning: 299`` header field (PS3.18 8.4.4). Nothing of a failed part is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import structlog
from aiohttp import MultipartReader, web
from aiohttp.helpers import parse_mimetype
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode_file_meta

from pxsgate.config import TlsConfig
from pxsgate.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    Arrival,
    Intake,
    Refusal,
)
from pxsgate.receive import server_ssl_context
from pxsgate.records import Indexed, ReceivedInstance
from pxsgate.service.metrics import Metrics
from pxsgate.spool import is_valid_uid

log = structlog.get_logger("pxsgate.stow")

STOW_PATH = "/dicomweb/studies"
STATUS_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 Table I.2-2
CHUNK = 1 << 20  # bytes read from the body at a time
MAX_BOUNDARY = 200  # characters (see _Reader)
MAX_WARNINGS = 8  # distinct failure reasons echoed in Warning header fields
CALLING = "STOW-RS"  # the calling AE title of a STOW-RS request in the store and trace
DICOM_JSON = "application/dicom+json"

ClosedHandler = Callable[[str], None]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (http.host) binds loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def verified_certificate(request: web.Request) -> dict[str, Any] | None:
    """The client certificate of an HTTPS request, when one was presented and verified
    against http.tls.ca-certificates (the TLS handshake refuses one that is not)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is None:
        return None
    cert = transport.get_extra_info("peercert")
    return cert if isinstance(cert, dict) and cert else None


def certificate_name(cert: dict[str, Any]) -> str:
    """The subject's common name of a verified certificate ("" without one)."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


@dataclass
class _Outcome:
    """What became of the parts of one request."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (class, instance) UIDs
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # + failure reason
    reasons: list[str] = field(default_factory=list)  # distinct, for Warning fields
    malformed: bool = False

    def fail(self, refusal: Refusal, uids: tuple[str, str] = ("", "")) -> None:
        self.failed.append((*uids, refusal.status))
        if refusal.comment not in self.reasons:
            self.reasons.append(refusal.comment)


class _PartFailed(Exception):
    """A part refused before intake, with the UIDs its file meta named (if any)."""

    def __init__(self, refusal: Refusal, uids: tuple[str, str] = ("", "")) -> None:
        super().__init__(refusal.comment)
        self.refusal = refusal
        self.uids = uids


class Stow:
    """The STOW-RS handler; its routes go on the HTTP API's application (service.api)."""

    def __init__(self, intake: Intake, on_closed: ClosedHandler, *, called_ae: str,
                 transfer_syntaxes: Collection[str], max_dataset_mb: float,
                 max_request_mb: float, refuse_anonymous: bool,
                 metrics: Metrics | None = None,
                 label: Callable[[str], str] = lambda uid: uid[-12:]) -> None:
        self._intake = intake
        self._on_closed = on_closed
        self._called_ae = called_ae
        self._syntaxes = frozenset(transfer_syntaxes)
        self._max_mb = max_dataset_mb
        self._max_part = int(max_dataset_mb * 2**20)
        self._max_request_mb = max_request_mb
        self._max_request = int(max_request_mb * 2**20)
        # No token and a port beyond loopback: only a verified client certificate may POST.
        self._refuse_anonymous = refuse_anonymous
        self._metrics = metrics or Metrics()
        self._label = label  # how logs name a study
        self._ids = itertools.count(1)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(STOW_PATH, self.store),
                web.post(STOW_PATH + "/{study}", self.store)]

    async def store(self, request: web.Request) -> web.StreamResponse:
        """POST /dicomweb/studies[/{study}]."""
        cert = verified_certificate(request)
        if self._refuse_anonymous and cert is None:
            log.warning("stow.refused", peer=request.remote, reason="no credentials")
            return _error(403, "STOW-RS is refused on a port beyond loopback without "
                          "http.bearer-token-file (or a verified client certificate)")
        if not _is_dicom_multipart(request):
            return _error(415, 'the body must be multipart/related; type="application/dicom"')
        if request.content_length is not None and request.content_length > self._max_request:
            return _error(413, f"request larger than {self._max_request_mb:g} MB "
                          "(http.stow-max-request-mb)")
        study = request.match_info.get("study")
        if study is not None and not is_valid_uid(study):
            return _error(400, "the study in the path is not a valid UID")
        name = certificate_name(cert) if cert is not None else ""
        association_id = f"stow-{next(self._ids):06d}"
        arrival = Arrival(calling_ae=f"{CALLING} {name}"[:64].strip(),
                          called_ae=self._called_ae,
                          peer_address=str(request.remote or ""),
                          association_id=association_id,
                          transfer_syntax=UID(""))
        started = time.perf_counter()
        outcome = _Outcome()
        log.info("stow.started", association_id=association_id, peer=request.remote,
                 calling_ae=arrival.calling_ae)
        try:
            await self._parts(request, arrival, study, outcome)
        finally:
            # The request's end is its association's release, answered or not (a peer
            # that went away cancels this handler: what was stored stays stored).
            log.info("association.closed", association_id=association_id, released=True,
                     instances=len(outcome.stored),
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))
            self._on_closed(association_id)
        return self._answer(association_id, outcome)

    async def _parts(self, request: web.Request, arrival: Arrival, study: str | None,
                     outcome: _Outcome) -> None:
        """Read, check and store each part in turn; failures go to ``outcome``."""
        body = 0  # bytes of the body read so far
        try:
            reader = _Reader(request.headers, request.content)
            while True:
                part = await reader.next()
                if part is None:
                    break
                if isinstance(part, MultipartReader):
                    raise ValueError("a nested multipart part")
                media = parse_mimetype(part.headers.get("Content-Type", ""))
                is_dicom = f"{media.type}/{media.subtype}".lower() == "application/dicom"
                chunks: list[bytes] = []
                size = 0
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
                    body += len(chunk)
                    if body > self._max_request:
                        outcome.fail(Refusal(STATUS_OUT_OF_RESOURCES,
                                             f"request larger than "
                                             f"{self._max_request_mb:g} MB"))
                        return  # the rest is not read: the connection is closed
                    if is_dicom and size <= self._max_part:
                        chunks.append(chunk)
                    else:
                        chunks.clear()  # read to its end, kept no longer
                if not part.at_eof():
                    raise ValueError("a part cut short")
                if not is_dicom:
                    self._failed(arrival, outcome, Refusal(
                        STATUS_CANNOT_UNDERSTAND, "a part that is not application/dicom"))
                elif size > self._max_part:
                    self._failed(arrival, outcome, Refusal(
                        STATUS_OUT_OF_RESOURCES, f"data set larger than {self._max_mb:g} MB"))
                else:
                    await self._store_part(arrival, b"".join(chunks), study, outcome)
                    del chunks
        except Exception as exc:  # the multipart reader's: storing a part raises nothing
            # A missing boundary, a body cut short, bad part headers, the peer gone.
            outcome.malformed = True
            self._failed(arrival, outcome, Refusal(
                STATUS_CANNOT_UNDERSTAND, f"malformed multipart body ({type(exc).__name__})"))

    async def _store_part(self, arrival: Arrival, part: bytes, study: str | None,
                          outcome: _Outcome) -> None:
        # On a worker thread: Intake.store blocks until the loop has indexed the instance.
        # Awaited even if this handler is cancelled meanwhile (the peer went away), so that
        # the association is released only after its last instance is indexed.
        work = asyncio.ensure_future(asyncio.to_thread(self._store_blocking, arrival, part,
                                                       study))
        try:
            instance, indexed, delay = await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                instance, indexed, _ = await work
                self._stored(instance, indexed)  # stored; the peer will not hear of it
            raise
        except _PartFailed as failed:
            self._failed(arrival, outcome, failed.refusal, failed.uids)
            return
        except Refusal as refusal:
            self._failed(arrival, outcome, refusal)
            return
        except Exception as exc:  # nothing a peer sends may take the request down
            log.error("instance.error", association_id=arrival.association_id,
                      error=repr(exc))
            self._failed(arrival, outcome, Refusal(STATUS_OUT_OF_RESOURCES, "internal error"))
            return
        outcome.stored.append((instance.sop_class_uid, instance.sop_instance_uid))
        self._stored(instance, indexed)
        if delay > 0:
            # Backpressure: the next part is read only after this pause.
            log.info("instance.delayed", association_id=arrival.association_id,
                     delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    def _store_blocking(self, arrival: Arrival, part: bytes, study: str | None
                        ) -> tuple[ReceivedInstance, Indexed, float]:
        """One PS3.10 file: its file meta read, its data set stored by the Intake."""
        fp = BytesIO(part)
        if fp.read(132)[128:] != b"DICM":
            raise _PartFailed(Refusal(STATUS_CANNOT_UNDERSTAND,
                                      "not a DICOM file (no DICM prefix)"))
        try:
            meta = FileMetaDataset(read_dataset(
                fp, is_implicit_VR=False, is_little_endian=True,
                stop_when=lambda tag, vr, length: tag >> 16 != 2))
            syntax = UID(str(meta.TransferSyntaxUID))
            uids = (str(meta.get("MediaStorageSOPClassUID", "")),
                    str(meta.get("MediaStorageSOPInstanceUID", "")))
        except Exception as exc:  # pydicom's message may quote a value (PHI): not kept
            raise _PartFailed(Refusal(STATUS_CANNOT_UNDERSTAND,
                                      f"unreadable file meta ({type(exc).__name__})")) from exc
        if syntax not in self._syntaxes:
            raise _PartFailed(Refusal(STATUS_SYNTAX_NOT_SUPPORTED,
                                      "transfer syntax not accepted here"), uids)
        offset = fp.tell()
        data = part[offset:]
        del part, fp
        received = BytesIO(data)
        header = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        expected = (uids[1], uids[0]) if all(uids) else None
        arrival = Arrival(arrival.calling_ae, arrival.called_ae, arrival.peer_address,
                          arrival.association_id, syntax)
        with received.getbuffer() as stream:
            try:
                return self._intake.store(arrival, received, header, stream, expected, study)
            except Refusal as refusal:
                raise _PartFailed(refusal, uids) from refusal

    # --- outcomes ---------------------------------------------------------------------------

    def _stored(self, instance: ReceivedInstance, indexed: Indexed) -> None:
        self._metrics.stow_instances.labels(outcome="stored").inc()
        self._metrics.instance_bytes.inc(instance.size)
        sop_class = UID(instance.sop_class_uid).name
        study = self._label(instance.study_instance_uid)
        if indexed.outcome in ("duplicate", "revived"):
            log.info("instance.duplicate", association_id=instance.association_id,
                     size=instance.size, sop_class=sop_class, study=study,
                     revived=indexed.outcome == "revived")
        else:
            log.info("instance.stored", association_id=instance.association_id,
                     size=instance.size, sop_class=sop_class, study=study,
                     kind=indexed.kind, reopens=indexed.outcome != "attached")

    def _failed(self, arrival: Arrival, outcome: _Outcome, refusal: Refusal,
                uids: tuple[str, str] = ("", "")) -> None:
        self._metrics.stow_instances.labels(outcome="failed").inc()
        log.warning("instance.refused", association_id=arrival.association_id,
                    status=f"0x{refusal.status:04X}", reason=refusal.comment)
        outcome.fail(refusal, uids)

    def _answer(self, association_id: str, outcome: _Outcome) -> web.Response:
        """The Store Instances Response (PS3.18 Annex I) and its HTTP status (10.5.3)."""
        stored, failed = outcome.stored, outcome.failed
        if stored and not failed:
            status = 200
        elif stored:
            status = 202
        elif outcome.malformed or not failed:
            status = 400
        else:
            status = 409
        log.info("stow.answered", association_id=association_id, http_status=status,
                 stored=len(stored), failed=len(failed))
        reasons = outcome.reasons or ([] if stored else ["no part in the body"])
        headers = {"Warning": ", ".join(f'299 pxsgate "{_quoted(r)}"'
                                        for r in reasons[:MAX_WARNINGS])} if reasons else None
        return web.Response(body=json.dumps(store_instances_response(stored, failed)),
                            status=status, content_type=DICOM_JSON, headers=headers)


def store_instances_response(stored: list[tuple[str, str]],
                             failed: list[tuple[str, str, int]]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table I.1-1) in DICOM JSON. Retrieve
    URL is type 2 and left empty: pxsgate offers no Retrieve transaction. A failed part
    whose UIDs could not be read has only its FailureReason."""
    ds = Dataset()
    ds.add_new(0x00081190, "UR", None)  # RetrieveURL
    if failed:
        items = []
        for sop_class, sop_instance, reason in failed:
            item = Dataset()
            if sop_class and sop_instance:
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_instance
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    if stored:
        refs = []
        for sop_class, sop_instance in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            item.add_new(0x00081190, "UR", None)
            refs.append(item)
        ds.ReferencedSOPSequence = refs
    answer: dict[str, Any] = ds.to_json_dict()
    return answer


class _Reader(MultipartReader):
    """aiohttp's multipart reader, with a boundary of up to MAX_BOUNDARY characters: RFC
    2046 allows 70, which aiohttp enforces, but Orthanc's DICOMweb plugin (1.x) sends 73
    (two UUIDs joined by a dash)."""

    def _get_boundary(self) -> str:
        boundary = str(self._mimetype.parameters["boundary"])
        if len(boundary) > MAX_BOUNDARY:
            raise ValueError(f"boundary longer than {MAX_BOUNDARY} characters")
        return boundary


def _is_dicom_multipart(request: web.Request) -> bool:
    media = parse_mimetype(request.headers.get("Content-Type", ""))
    if f"{media.type}/{media.subtype}".lower() != "multipart/related":
        return False
    kind = media.parameters.get("type", "").strip('"').lower()
    return kind == "application/dicom" and bool(media.parameters.get("boundary"))


def _quoted(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in '"\\')[:200]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def https_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The HTTP port's TLS context (None: plain HTTP): a client certificate is asked for
    whenever there is a CA bundle to verify it, required or not."""
    if not tls.enabled:
        return None
    context = server_ssl_context(tls)
    if tls.ca_certificates is not None and not tls.require_client_certificate:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
