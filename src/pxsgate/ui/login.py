"""GET/POST /ui/login and POST /ui/logout (policy and counters: auth.py)."""

from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from pxsgate.ui import html
from pxsgate.ui.audit import Action, Outcome
from pxsgate.ui.auth import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    auth_of,
    current_user,
    page_response,
    require,
    safe_next,
    session_id,
)
from pxsgate.ui.html import render
from pxsgate.ui.pages import page

MAX_FIELD = 1024  # characters of a user name or password that are looked at

_FORM = """<form class="login" method="post" action="/ui/login">
$csrf
<input type="hidden" name="next" value="$next">
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"
required></label>
<button type="submit">Log in</button>
</form>"""


def _login_page(request: web.Request, status: int = 200, error: str = "",
                next_path: str = "/ui/") -> web.Response:
    """The form, with a fresh CSRF token in its hidden field and in a cookie."""
    auth = auth_of(request)
    token = secrets.token_urlsafe(32)
    body = render(_FORM, csrf=html.csrf_field(token), next=next_path)
    if error:
        body = render('<p class="error">$e</p>$form', e=error, form=body)
    response = page_response(page(None, "Log in", body), status)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, path=COOKIE_PATH, httponly=True,
                        samesite="Strict", secure=auth.secure_cookies)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    next_path = safe_next(request.query.get("next"))
    if current_user(request) is not None:
        raise web.HTTPSeeOther(next_path)
    return _login_page(request, next_path=next_path)


async def login(request: web.Request) -> web.StreamResponse:
    auth = auth_of(request)
    form = await request.post()
    name = str(form.get("username", ""))[:MAX_FIELD].strip()
    password = str(form.get("password", ""))[:MAX_FIELD]
    next_path = safe_next(form.get("next"))
    given = form.get("csrf")
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not (isinstance(given, str) and expected and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"),
            expected.encode("utf-8", "surrogateescape"))):
        await auth.audit(request, Action.DENIED, Outcome.SERIOUS_FAILURE,
                         detail="login: no valid CSRF token")
        return _login_page(request, 403, "The form had expired: please log in again.",
                           next_path)
    peer = auth.peer(request)
    wait = max(auth.failures_by_peer.retry_after(peer),
               auth.failures_by_name.retry_after(name.lower()))
    if wait > 0:
        known = await auth.store.user(name) is not None  # else maybe a mistyped password
        await auth.audit(request, Action.LOGIN_FAILED, Outcome.SERIOUS_FAILURE,
                         name=name if known else "?",
                         detail="too many failed logins: refused unchecked")
        response = _login_page(request, 429, "Too many failed logins: try again later.",
                               next_path)
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    role, recorded, why = await auth.check_password(name, password)
    if role is None:
        auth.failures_by_peer.failed(peer)
        auth.failures_by_name.failed(name.lower())
        outcome = Outcome.MAJOR_FAILURE if why == "disabled user" else Outcome.MINOR_FAILURE
        await auth.audit(request, Action.LOGIN_FAILED, outcome, name=recorded, detail=why)
        return _login_page(request, 401, "Wrong user name or password.", next_path)
    old = request.cookies.get(SESSION_COOKIE)
    if old:  # a new session id at each login (no fixation)
        await auth.store.end_session(session_id(old))
    token, user = await auth.open_session(recorded, role, "password")
    await auth.audit(request, Action.LOGIN, Outcome.SUCCESS, user=user)
    response = web.HTTPSeeOther(next_path)
    auth.set_session_cookie(response, token)
    response.del_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)
    raise response


@require("viewer", "logout")
async def logout(request: web.Request) -> web.StreamResponse:
    auth = auth_of(request)
    user = current_user(request)
    assert user is not None  # require
    await auth.store.end_session(user.session_id)
    await auth.audit(request, Action.LOGOUT, Outcome.SUCCESS, user=user)
    response = web.HTTPSeeOther("/ui/login")
    auth.clear_session_cookie(response)
    raise response

