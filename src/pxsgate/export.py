"""The exporters behind the outbox: where stored results go.

- :class:`HttpExporter` POSTs the result document as JSON (the paper's HTTPS results
  communicator), over TLS with the system's or a given CA bundle, with a bearer token
  and/or a client certificate.
- :class:`DicomSrExporter` sends a Comprehensive SR (TID 1500 measurement of the PXS score,
  referencing the source images; see :mod:`pxsgate.sr`) by C-STORE to a PACS.

Each raises ExportError for what a later try may fix (connection refused, timeouts, HTTP
5xx/408/429, DICOM failure statuses) and PermanentExportError for what it cannot (other
HTTP 4xx, a result whose source images are no longer in the spool).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage

from pxsgate import __version__
from pxsgate.config import ExporterConfig
from pxsgate.errors import ConfigError, ExportError, PermanentExportError
from pxsgate.messages import now_iso
from pxsgate.outbox import Exporter
from pxsgate.results import pxs_entries
from pxsgate.store import MadeInstance, Store

log = structlog.get_logger("pxsgate.export")

RETRYABLE_HTTP = frozenset({408, 425, 429})
# C-STORE statuses that mean stored (PS3.4 B.2.3): success and the three warnings.
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def read_secret(path: Path, key: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(key, f"{path} is empty")
    return token


def client_ssl_context(config: ExporterConfig, key: str) -> ssl.SSLContext:
    """Verify the server (system CAs, or ca-certificates) and present the client
    certificate when one is configured; TLS 1.2 at least."""
    try:
        context = ssl.create_default_context(
            cafile=str(config.ca_certificates) if config.ca_certificates else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.client_certificate is not None and config.client_key is not None:
            context.load_cert_chain(config.client_certificate, config.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key, f"TLS set-up failed: {exc}") from exc
    return context


class HttpExporter:
    def __init__(self, config: ExporterConfig, key: str) -> None:
        assert config.url is not None
        self.name = config.name
        self._config = config
        self._key = key  # the config path, for error messages
        self._url = config.url
        self._headers = {"Content-Type": "application/json",
                         "User-Agent": f"pxsgate/{__version__}"}
        self._ssl: ssl.SSLContext | bool = True
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Read the credentials now, so a missing token file stops the start-up with its
        key path instead of failing every delivery later."""
        config = self._config
        if config.bearer_token_file is not None:
            token = read_secret(config.bearer_token_file, f"{self._key}.bearer-token-file")
            self._headers["Authorization"] = f"Bearer {token}"
        if self._url.startswith("https:"):
            self._ssl = client_ssl_context(config, self._key)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.timeout_seconds))

    async def deliver(self, delivery_id: str, document: Mapping[str, Any]) -> None:
        assert self._session is not None
        headers = {**self._headers, "Idempotency-Key": delivery_id,
                   "X-Pxsgate-Delivery-Id": delivery_id,
                   "X-Pxsgate-Result-Id": str(document["id"])}
        body = json.dumps(document, separators=(",", ":")).encode()
        try:
            async with self._session.post(self._url, data=body, headers=headers,
                                          ssl=self._ssl) as response:
                if 200 <= response.status < 300:
                    return
                # Only the body's size is kept: a receiver's error text may quote the
                # document (patient, accession), and this message reaches logs and status.
                answer = f"({len(await response.read())}-byte answer)"
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ExportError(f"POST {self._url}: {type(exc).__name__}: {exc}") from exc
        message = f"POST {self._url}: HTTP {status} {answer}"
        if status in RETRYABLE_HTTP or status >= 500:
            raise ExportError(message)
        raise PermanentExportError(message)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _source_uids(document: Mapping[str, Any]) -> list[str]:
    """The scored images of the result: the SR's evidence. Only the PXS score entries: a
    pxs.change entry also names the prior image, of another study (and maybe long gone
    from the spool), which the SR does not report."""
    return [uid for result in pxs_entries(document)
            for ref in result.get("derivedFrom", []) for uid in ref.get("refSopInstanceUid", [])]


def _read_headers(paths: Sequence[Path]) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in paths]


class DicomSrExporter:
    """A Comprehensive SR per result, C-STOREd to a PACS. Its SOP Instance UID derives from
    the result id and the exporter, so a delivery sent twice is the same instance to the
    PACS. The SRs of one study for one exporter share a series; a rescore's SR has the next
    InstanceNumber and names the SR it supersedes (PredecessorDocumentsSequence). Each is
    registered in the store before it is sent, so that a router sending the study back
    brings it in as pxsgate's own, which never re-opens the study."""

    def __init__(self, config: ExporterConfig, store: Store) -> None:
        if config.host is None or config.port is None or config.ae_title is None:
            raise ConfigError(config.name, "a dicom exporter needs host, port and ae-title")
        self.name = config.name
        self._host, self._port, self._called = config.host, config.port, config.ae_title
        self._config = config
        self._store = store

    async def start(self) -> None:
        return None

    async def deliver(self, delivery_id: str, document: Mapping[str, Any]) -> None:
        from pxsgate import sr  # highdicom loads only where an SR exporter is configured

        uids = _source_uids(document)
        paths = await self._store.instance_paths(uids)
        missing = [u for u in uids if u not in paths or not paths[u].exists()]
        if missing:
            raise PermanentExportError(
                f"{len(missing)} source image(s) of the result are no longer in the spool")
        result_id = str(document["id"])
        study_uid = str(document.get("studyInstanceUid") or "")
        if not await self._store.is_current(result_id):
            # The study was scored again while this delivery waited: an SR of the old score
            # would take the next number and supersede the newer one in PACS.
            raise PermanentExportError(
                "superseded: the study was scored again; its newer result's SR is sent")
        made, previous = await self._store.made_instance(
            result_id=result_id, exporter=self.name, study_uid=study_uid,
            sop_class_uid=ComprehensiveSRStorage,  # what build_pxs_sr makes
            sop_instance_uid=sr.uid_from_id(f"{result_id}/{self.name}/sr"),
            series_instance_uid=sr.uid_from_id(f"{study_uid}/{self.name}/sr-series"),
            at=now_iso())
        try:
            sources = await asyncio.to_thread(_read_headers, [paths[u] for u in uids])
            dataset = sr.build_pxs_sr(
                document, sources, sop_instance_uid=made.sop_instance_uid,
                series_instance_uid=made.series_instance_uid,
                instance_number=made.instance_number,
                previous_versions=[_reference(previous)] if previous is not None else ())
        except Exception as exc:
            # Never sent: it must not be named as a predecessor or take a number.
            await self._store.forget_made_instance(made.sop_instance_uid)
            if isinstance(exc, sr.SrError):
                raise PermanentExportError(f"cannot build the SR: {exc}") from exc
            # highdicom's messages may quote header values: not kept.
            raise PermanentExportError(
                f"cannot build the SR: {type(exc).__name__}") from exc
        try:
            status = await asyncio.to_thread(
                sr.send_dataset, dataset, host=self._host, port=self._port,
                called_ae=self._called, calling_ae=self._config.calling_ae_title,
                timeout=self._config.timeout_seconds)
        except Exception as exc:
            raise ExportError(str(exc)) from exc
        if status not in STORED:
            raise ExportError(f"C-STORE to {self._called}@{self._host}:{self._port} "
                              f"answered 0x{status:04X}")

    async def close(self) -> None:
        return None


def _reference(made: MadeInstance) -> Dataset:
    """An SR pxsgate sent earlier, as build_pxs_sr names its predecessors."""
    ds = Dataset()
    ds.SOPClassUID = made.sop_class_uid
    ds.SOPInstanceUID = made.sop_instance_uid
    ds.StudyInstanceUID = made.study_instance_uid
    ds.SeriesInstanceUID = made.series_instance_uid
    return ds


def build_exporters(configs: Sequence[ExporterConfig], store: Store) -> dict[str, Exporter]:
    exporters: dict[str, Exporter] = {}
    for i, config in enumerate(configs):
        if config.type == "http":
            exporters[config.name] = HttpExporter(config, f"exporters[{i}]")
        else:
            exporters[config.name] = DicomSrExporter(config, store)
    return exporters
