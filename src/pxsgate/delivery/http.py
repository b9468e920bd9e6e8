"""The HTTP exporter: POSTs the result document as JSON (the paper's HTTPS results
communicator), over TLS with the system's or a given CA bundle, with a bearer token and/or a
client certificate.

It raises ExportError for what a later try may fix (connection refused, timeouts, HTTP
5xx/408/429) and PermanentExportError for what it cannot (other HTTP 4xx).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from pxsgate import __version__
from pxsgate.config import ExporterConfig
from pxsgate.document import ResultDocument
from pxsgate.errors import ConfigError, ExportError, PermanentExportError

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


class HttpClient:
    """An HTTP session to one exporter's server, with its credentials: the bearer token and
    the TLS context (CA bundle, client certificate) are read at start, so a missing token
    file stops the start-up with its key path instead of failing every delivery later."""

    def __init__(self, config: ExporterConfig, key: str) -> None:
        assert config.url is not None
        self.url = config.url
        self._config = config
        self._key = key  # the config path, for error messages
        self._headers = {"User-Agent": f"pxsgate/{__version__}"}
        self._ssl: ssl.SSLContext | bool = True
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        config = self._config
        if config.bearer_token_file is not None:
            token = read_secret(config.bearer_token_file, f"{self._key}.bearer-token-file")
            self._headers["Authorization"] = f"Bearer {token}"
        if self.url.startswith("https:"):
            self._ssl = client_ssl_context(config, self._key)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.timeout_seconds))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   read_success: bool = True) -> tuple[int, bytes]:
        """POST ``body``: the HTTP status and the answer's body (of a 2xx answer only when
        ``read_success``); ExportError when no answer came (refused, reset, timed out).
        Redirects are not followed: a 301 or 302 would turn the POST into a GET, whose 200
        would look like a delivery; a 3xx is the receiver's error to see."""
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers={**self._headers, **headers},
                                          ssl=self._ssl, allow_redirects=False) as response:
                if 200 <= response.status < 300 and not read_success:
                    return response.status, b""
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ExportError(f"POST {url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def refusal(message: str, status: int) -> ExportError:
    """An HTTP answer that is no success: retried when a later try may succeed (408, 425,
    429, 5xx), else permanent. Redirects are not followed (as webhook senders do not): the
    exporter's url should name where it points."""
    if status in RETRYABLE_HTTP or status >= 500:
        return ExportError(message)
    if 300 <= status < 400:
        return PermanentExportError(f"{message}: a redirect, not followed; set the "
                                    "exporter's url to the address it points to")
    return PermanentExportError(message)


class HttpExporter:
    def __init__(self, config: ExporterConfig, key: str) -> None:
        self.name = config.name
        self._client = HttpClient(config, key)
        self._url = self._client.url

    async def start(self) -> None:
        await self._client.start()

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        headers = {"Content-Type": "application/json", "Idempotency-Key": delivery_id,
                   "X-Pxsgate-Delivery-Id": delivery_id, "X-Pxsgate-Result-Id": document.id}
        body = json.dumps(document.to_json(), separators=(",", ":")).encode()
        status, answer = await self._client.post(self._url, body, headers, read_success=False)
        if 200 <= status < 300:
            return
        # Only the body's size is kept: a receiver's error text may quote the document
        # (patient, accession), and this message reaches logs and status.
        raise refusal(f"POST {self._url}: HTTP {status} ({len(answer)}-byte answer)", status)

    async def close(self) -> None:
        await self._client.close()
