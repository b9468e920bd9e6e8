"""The read-only HTTP API on the service (aiohttp): results for scripts and dashboards.

    GET /healthz                  liveness for monitors: 200 when the store answers and the
                                  model worker is alive, else 503 (never needs a token)
    GET /results?patient_id=&study_uid=&accession=&since=&status=&flagged=&model=&limit=
                                  current result documents, oldest first (a JSON array)
    GET /studies/{uid}            one study: its current result, earlier results, selection
                                  decisions, instances with their senders, deliveries
    GET /metrics                  Prometheus text format (never needs a token: no PHI)
    POST /dicomweb/studies[/{study}]
                                  STOW-RS ingress (pxsgate.stow): instances stored as a
                                  C-STORE stores them
    /ui/...                       the web UI (pxsgate.ui), with logins of its own: the
                                  bearer token below is not asked for there

The one write endpoint is STOW-RS. Results carry PHI: it listens on loopback unless
``http.host`` says otherwise, and with ``http.bearer-token-file`` every request but /healthz
and /metrics needs the token, or (HTTPS with ``http.tls.ca-certificates``) a client
certificate verified against that bundle. Without a token on a port beyond loopback, STOW-RS
is refused (403) unless such a certificate is presented.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from pxsgate import __version__
from pxsgate.config import RESULT_STATUSES, HttpConfig
from pxsgate.records import parse_since
from pxsgate.service.metrics import CONTENT_TYPE, Metrics
from pxsgate.store import ResultFilter, Store
from pxsgate.stow import Stow, https_context, verified_certificate

log = structlog.get_logger("pxsgate.api")

MAX_LIMIT = 1000
Health = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STORE_KEY = web.AppKey("store", Store)
METRICS_KEY = web.AppKey("metrics", Metrics)
HEALTH_KEY: web.AppKey[Health] = web.AppKey("health")


def result_filter(query: Any, default_limit: int = 100) -> ResultFilter:
    """The /results query string as a ResultFilter; ValueError names a bad parameter."""
    known = {"patient_id", "study_uid", "accession", "since", "status", "flagged", "model",
             "limit", "history"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
    status = query.get("status")
    if status is not None and status not in RESULT_STATUSES:
        raise ValueError(f"status: one of {', '.join(RESULT_STATUSES)}")
    try:
        limit = int(query.get("limit", default_limit))
    except ValueError as exc:
        raise ValueError("limit: an integer") from exc
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: 1..{MAX_LIMIT}")
    since = query.get("since")
    return ResultFilter(
        study_uid=query.get("study_uid"), patient_id=query.get("patient_id"),
        accession=query.get("accession"), status=status, model=query.get("model"),
        since=parse_since(since) if since else None,
        flagged=query.get("flagged", "false").lower() in ("1", "true", "yes"),
        history=query.get("history", "false").lower() in ("1", "true", "yes"),
        limit=limit)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _results(request: web.Request) -> web.Response:
    try:
        flt = result_filter(request.query)
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response(await request.app[STORE_KEY].results(flt))


async def _study(request: web.Request) -> web.Response:
    detail = await request.app[STORE_KEY].study_detail(request.match_info["uid"])
    if detail is None:
        return _error(404, "no such study")
    return web.json_response(detail)


async def _healthz(request: web.Request) -> web.Response:
    report = await request.app[HEALTH_KEY]()
    return web.json_response(report, status=200 if report.get("ok") else 503)


async def _to_ui(request: web.Request) -> web.Response:
    raise web.HTTPFound(UI_PREFIX)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# Open without the token: monitors and Prometheus scrape them, and they carry no PHI.
OPEN_PATHS = ("/healthz", "/metrics")
UI_PREFIX = "/ui/"  # the web UI (pxsgate.ui), when it is on


MIN_TOKEN_LENGTH = 32  # characters: `openssl rand -hex 32` gives 64
FAILURES_ALLOWED = 10  # failed attempts per peer within FAILURE_WINDOW_S, then 429
FAILURE_WINDOW_S = 60.0
MAX_PEERS_TRACKED = 4096


class FailedLogins:
    """Failed token checks per peer address, in a sliding window: beyond ``allowed`` a
    peer is answered 429 (with Retry-After) without its token being looked at, so that
    guessing is slow. A bounded table: the oldest peer is forgotten first. (The web UI's
    login counts per peer and per user name with two of these.)"""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 allowed: int = FAILURES_ALLOWED, window_s: float = FAILURE_WINDOW_S) -> None:
        self._clock = clock
        self._allowed = allowed
        self._window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may try again; 0 when it may now."""
        times = self._recent(peer)
        if len(times) < self._allowed:
            return 0.0
        return max(0.0, times[0] + self._window_s - self._clock())

    def failed(self, peer: str) -> int:
        """Count a failure; return the peer's failures in the window."""
        times = self._recent(peer)
        times.append(self._clock())
        self._failures[peer] = times
        self._failures.move_to_end(peer)
        while len(self._failures) > MAX_PEERS_TRACKED:
            self._failures.popitem(last=False)
        return len(times)

    def _recent(self, peer: str) -> deque[float]:
        times = self._failures.get(peer, deque())
        while times and times[0] <= self._clock() - self._window_s:
            times.popleft()
        return times


def _own_login(path: str) -> bool:
    """The web UI's paths: they have a login of their own (pxsgate.ui), not the token."""
    return path == UI_PREFIX.rstrip("/") or path.startswith(UI_PREFIX)


def _auth(token: str | None, failures: FailedLogins, ui: bool = False) -> Middleware:
    # The header as bytes: aiohttp decodes headers as UTF-8 with surrogate escapes, which
    # a plain .encode() refuses (a 500 for a Latin-1 header, before any login).
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (token is not None and request.path not in OPEN_PATHS
                and not (ui and _own_login(request.path))
                and verified_certificate(request) is None):
            peer = request.remote or "?"
            wait = failures.retry_after(peer)
            if wait > 0:
                return web.json_response(
                    {"error": "too many failed attempts: try again later"}, status=429,
                    headers={"Retry-After": str(max(1, round(wait)))})
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                count = failures.failed(peer)
                # Never the token given: the peer, the path and whether one was sent at all.
                log.warning("http.unauthorized", peer=peer, path=request.path,
                            token_sent=bool(given), failures_in_window=count,
                            locked_out=count >= FAILURES_ALLOWED)
                return web.json_response({"error": "a valid bearer token is required"},
                                         status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        started = time.perf_counter()
        response = await handler(request)
        log.debug("http.request", path=request.path, status=response.status,
                  ms=round((time.perf_counter() - started) * 1000, 1))
        return response
    return check


class Api:
    """The HTTP server's lifecycle: start() binds, stop() closes."""

    def __init__(self, config: HttpConfig, store: Store, health: Health,
                 token: str | None = None, metrics: Metrics | None = None,
                 stow: Stow | None = None, ui: web.Application | None = None) -> None:
        self._config = config
        app = web.Application(middlewares=[_auth(token, FailedLogins(), ui is not None)])
        app[STORE_KEY] = store
        app[HEALTH_KEY] = health
        app[METRICS_KEY] = metrics or Metrics()
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/results", _results)
        app.router.add_get("/studies/{uid}", _study)
        if stow is not None:
            app.router.add_routes(stow.routes())
        if ui is not None:
            app.router.add_get(UI_PREFIX.rstrip("/"), _to_ui)
            app.add_subapp(UI_PREFIX, ui)
        self._runner = web.AppRunner(app, access_log=None,
                                     handler_cancellation=True)
        self.port = 0

    async def start(self) -> int:
        await self._runner.setup()
        tls = self._config.tls
        site = web.TCPSite(self._runner, self._config.host, self._config.port,
                           reuse_address=True, ssl_context=https_context(tls))
        await site.start()
        self.port = self._config.port
        log.info("http.started", host=self._config.host, port=self.port,
                 version=__version__)
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
