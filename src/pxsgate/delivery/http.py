"""The HTTP exporter: POSTs the result document as JSON (the paper's HTTPS results
communicator), over TLS with the system's or a given CA bundle, with a bearer token and/or a
client certificate.

It raises ExportError for what a later try may fix (connection refused, timeouts, HTTP
5xx/408/429) and PermanentExportError for what it cannot (other HTTP 4xx).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import aiohttp
import structlog

from pxsgate import __version__
from pxsgate.config import ExporterConfig
from pxsgate.document import ResultDocument
from pxsgate.errors import ConfigError, ExportError, PermanentExportError

log = structlog.get_logger("pxsgate.export")

RETRYABLE_HTTP = frozenset({408, 425, 429})


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

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        assert self._session is not None
        headers = {**self._headers, "Idempotency-Key": delivery_id,
                   "X-Pxsgate-Delivery-Id": delivery_id,
                   "X-Pxsgate-Result-Id": document.id}
        body = json.dumps(document.to_json(), separators=(",", ":")).encode()
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
