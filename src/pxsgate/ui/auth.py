"""Who is asking: logins, sessions, CSRF, single sign-on, and the role guard of each page.

- A login (POST /ui/login: ``username``, ``password``, ``csrf``) checks the scrypt hash
  (passwords.py) and opens a session: a random token in the ``pxsgate_session`` cookie
  (HttpOnly, SameSite=Strict, Secure under http.tls), stored only as its SHA-256, with a
  CSRF token of its own. It ends ``ui.session-minutes`` after the login, or after
  ``ui.idle-minutes`` without a request, or at POST /ui/logout.
- The login form has a CSRF token too (a cookie and the form's hidden field must match).
- Wrong passwords are counted per peer address and per user name: LOGIN_FAILURES within
  LOGIN_WINDOW_S and further tries are answered 429 without the password being checked.
- Single sign-on: with ``ui.user-header`` and ``ui.trusted-proxies``, a request from one of
  those addresses naming an existing, enabled user in that header is that user (a session
  is opened for it, so its forms carry a CSRF token like any other). The header from any
  other address is ignored, and audited.

A page states its role with :func:`require`; it gets the user with :func:`current_user`.
Every refusal is audited (audit.py) and answered with an HTML page or a redirect to the
login; every /ui/ response carries the security headers of :data:`SECURITY_HEADERS`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from pxsgate.config import UiConfig
from pxsgate.records import now_iso
from pxsgate.service.api import FailedLogins
from pxsgate.store import ROLES, Store
from pxsgate.ui import html
from pxsgate.ui.audit import Action, Auditor, Outcome
from pxsgate.ui.passwords import dummy_hash, verify_password

log = structlog.get_logger("pxsgate.ui")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_COOKIE = "pxsgate_session"
LOGIN_CSRF_COOKIE = "pxsgate_login_csrf"
COOKIE_PATH = "/ui/"
LOGIN_FAILURES = 5  # wrong passwords per peer, and per user name, within the window
LOGIN_WINDOW_S = 300.0
TOUCH_EVERY_S = 15.0  # a session's last_seen is written at most this often
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class CurrentUser:
    """The user a request is from, and the CSRF token its forms must carry."""

    name: str
    role: str
    csrf: str
    session_id: str
    via: str  # "password" or "sso"

    def may(self, role: str) -> bool:
        """Whether this user's role is ``role`` or above (viewer < reviewer < operator)."""
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def sees_identifiers(self) -> bool:
        """Viewers see de-identified pages only."""
        return self.may("reviewer")


class UiAuth:
    """The web UI's access state: the store, the auditor, the login counters."""

    def __init__(self, config: UiConfig, store: Store, *, secure_cookies: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.auditor = Auditor(store)
        self.secure_cookies = secure_cookies
        self._clock = clock
        self.failures_by_peer = FailedLogins(time.monotonic, LOGIN_FAILURES, LOGIN_WINDOW_S)
        self.failures_by_name = FailedLogins(time.monotonic, LOGIN_FAILURES, LOGIN_WINDOW_S)
        self._proxies = tuple(ipaddress.ip_network(p, strict=False)
                              for p in config.trusted_proxies)

    @property
    def session_seconds(self) -> float:
        return self.config.session_minutes * 60

    @property
    def idle_seconds(self) -> float:
        return self.config.idle_minutes * 60

    def now(self) -> float:
        return self._clock()

    def trusted_proxy(self, request: web.Request) -> bool:
        if not self._proxies or request.remote is None:
            return False
        try:
            address = ipaddress.ip_address(request.remote)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def peer(self, request: web.Request) -> str:
        """The client's address: behind a trusted proxy, the one it appended to
        X-Forwarded-For."""
        remote = request.remote or "?"
        if self.trusted_proxy(request):
            forwarded = request.headers.get("X-Forwarded-For", "")
            last = forwarded.split(",")[-1].strip()
            if last:
                return last
        return remote

    async def audit(self, request: web.Request, action: Action, outcome: Outcome, *,
                    user: CurrentUser | None = None, name: str = "", role: str = "",
                    study_uid: str | None = None, detail: str = "") -> None:
        """One audit entry about this request, by ``user`` (or a ``name`` and ``role``)."""
        await self.auditor.record(
            action, outcome, user=user.name if user else name or "?",
            role=user.role if user else role, peer=self.peer(request), study_uid=study_uid,
            detail=detail)

    # --- sessions -----------------------------------------------------------------------

    async def open_session(self, name: str, role: str, via: str) -> tuple[str, CurrentUser]:
        """A new session for ``name``: the cookie's token and the user."""
        await self.store.purge_sessions(self.now(), self.idle_seconds)
        token = secrets.token_urlsafe(32)
        sid = session_id(token)
        csrf = secrets.token_urlsafe(32)
        now = self.now()
        await self.store.create_session(sid, name, now_iso(), now,
                                        now + self.session_seconds, csrf)
        return token, CurrentUser(name, role, csrf, sid, via)

    def set_session_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, path=COOKIE_PATH, httponly=True,
                            samesite="Strict", secure=self.secure_cookies)

    def clear_session_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)

    async def from_cookie(self, request: web.Request) -> CurrentUser | None:
        """The session of the request's cookie, if it is valid; an expired one is ended and
        noted on the request (``session_expired``) for the guard to audit."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = await self.store.session(session_id(token))
        if session is None:
            return None
        now = self.now()
        if session.disabled or now >= session.expires or \
                now - session.last_seen >= self.idle_seconds:
            await self.store.end_session(session.id)
            request[EXPIRED_KEY] = session.user_name
            return None
        if now - session.last_seen >= TOUCH_EVERY_S:
            await self.store.touch_session(session.id, now)
        return CurrentUser(session.user_name, session.role, session.csrf, session.id,
                           "password")

    async def from_proxy(self, request: web.Request,
                         cookie_user: CurrentUser | None) -> tuple[CurrentUser | None, str]:
        """Single sign-on: the user the trusted proxy names (and a new session's token,
        or ''), or None when the request does not come that way."""
        header = self.config.user_header
        if header is None or header not in request.headers:
            return None, ""
        name = request.headers[header].strip()
        if not self.trusted_proxy(request):
            await self.audit(request, Action.DENIED, Outcome.SERIOUS_FAILURE,
                             detail=f"{header} from an address not in ui.trusted-proxies")
            return None, ""
        if cookie_user is not None and cookie_user.name == name:
            return cookie_user, ""
        user = await self.store.user(name) if name else None
        if user is None or user.disabled:
            await self.audit(request, Action.LOGIN_FAILED,
                             Outcome.MAJOR_FAILURE if user else Outcome.MINOR_FAILURE,
                             name=name if user else "?",
                             detail="sso: " + ("disabled user" if user else "unknown user"))
            return None, ""
        token, current = await self.open_session(user.name, user.role, "sso")
        await self.audit(request, Action.LOGIN, Outcome.SUCCESS, user=current, detail="sso")
        return current, token

    # --- the login form -----------------------------------------------------------------

    async def check_password(self, name: str, password: str) -> tuple[str | None, str, str]:
        """(role or None, the name to record, why not): the stored hash, or a dummy one
        for a name that is no user (the same time either way)."""
        user = await self.store.user(name)
        stored = user.password_hash if user is not None else dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, stored)
        if user is None:
            return None, "?", "unknown user name"
        if not ok:
            return None, user.name, "wrong password"
        if user.disabled:
            return None, user.name, "disabled user"
        return user.role, user.name, ""


EXPIRED_KEY = web.RequestKey("session_expired", str)
USER_KEY = web.RequestKey("user", CurrentUser)
NEW_SESSION_KEY = web.RequestKey("new_session", str)
AUTH_KEY = web.AppKey("ui_auth", UiAuth)


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def current_user(request: web.Request) -> CurrentUser | None:
    """The logged-in user of this request (None: nobody)."""
    return request.get(USER_KEY)


def auth_of(request: web.Request) -> UiAuth:
    return request.config_dict[AUTH_KEY]


def page_response(body: html.Markup, status: int = 200) -> web.Response:
    return web.Response(text=str(body), status=status, content_type="text/html",
                        charset="utf-8")


def refusal_page(status: int, title: str, message: str) -> web.Response:
    from pxsgate.ui.pages import page  # the layout (pages import this module)

    return page_response(page(None, title, html.render('<p class="error">$m</p>',
                                                       m=message)), status)


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    target = request.path_qs if request.method == "GET" else "/ui/"
    return web.HTTPSeeOther(f"/ui/login?next={quote(target, safe='')}")


@web.middleware
async def ui_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who is asking (the session cookie, or the trusted proxy's header), then the page;
    the security headers on whatever comes back, refusals and redirects included."""
    auth = auth_of(request)
    user = await auth.from_cookie(request)
    sso, new_token = await auth.from_proxy(request, user)
    if sso is not None:
        user = sso
    if user is not None:
        request[USER_KEY] = user
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and refusals: a Response, raised
        _finish(exc, auth, new_token)
        raise
    _finish(response, auth, new_token)
    return response


def _finish(response: web.StreamResponse, auth: UiAuth, token: str) -> None:
    cache = response.headers.get("Cache-Control", "")
    response.headers.update(SECURITY_HEADERS)
    if cache.startswith("private"):  # a picture (ui/study.py): cached by this browser only
        response.headers["Cache-Control"] = cache
    if token:
        auth.set_session_cookie(response, token)


async def check_csrf(request: web.Request, user: CurrentUser, what: str) -> None:
    """Raise 403 (audited) unless the form's ``csrf`` field is the session's token."""
    form = await request.post()
    given = form.get("csrf")
    if not isinstance(given, str) or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), user.csrf.encode()):
        auth = auth_of(request)
        await auth.audit(request, Action.DENIED, Outcome.SERIOUS_FAILURE, user=user,
                         study_uid=request.match_info.get("uid"),
                         detail=f"{what}: no valid CSRF token")
        raise _forbidden("The form was not accepted (it has no valid CSRF token). Reload "
                         "the page and try again.")


def _forbidden(message: str) -> web.HTTPForbidden:
    page = refusal_page(403, "Forbidden", message)
    return web.HTTPForbidden(text=page.text, content_type="text/html")


def require(role: str, what: str) -> Callable[[Handler], Handler]:
    """A page or action for ``role`` and above. Nobody logged in: to the login page (a
    POST's refusal, and an expired session's, audited). A POST must carry the session's
    CSRF token. A role too low: 403, audited. ``what`` names it in the audit trail."""
    if role not in ROLES:
        raise ValueError(f"role: one of {', '.join(ROLES)}")

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            auth = auth_of(request)
            user = current_user(request)
            uid = request.match_info.get("uid")
            if user is None:
                expired = request.get(EXPIRED_KEY)
                if expired is not None:
                    await auth.audit(request, Action.DENIED, Outcome.MINOR_FAILURE,
                                     name=expired, study_uid=uid,
                                     detail=f"{what}: session expired")
                elif request.method != "GET":
                    await auth.audit(request, Action.DENIED, Outcome.SERIOUS_FAILURE,
                                     study_uid=uid, detail=f"{what}: not logged in")
                raise login_redirect(request)
            if request.method == "POST":
                await check_csrf(request, user, what)
            if not user.may(role):
                await auth.audit(request, Action.DENIED, Outcome.SERIOUS_FAILURE, user=user,
                                 study_uid=uid, detail=f"{what}: needs the role {role}")
                raise _forbidden(f"This needs the role {role}; you are {user.role}.")
            return await handler(request)
        return guarded
    return wrap


def safe_next(value: Any) -> str:
    """Where to go after the login: a path under /ui/ only (never another site)."""
    if isinstance(value, str) and value.startswith("/ui/") and "//" not in value \
            and "\\" not in value:
        return value
    return "/ui/"
