"""The web UI's foundations (issue 22, who sees what): users added with the real CLI, logins
against a real in-process gateway's HTTP port (aiohttp's client), roles, CSRF, the login
rate limit, session expiry, single sign-on from a trusted proxy only, and the append-only
audit trail read back with `pxsgate audit`."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pxsgate.config import config_from_mapping
from pxsgate.errors import ConfigError
from pxsgate.service.gateway import Gateway
from pxsgate.ui.auth import SESSION_COOKIE, UiAuth
from pxsgate.ui.passwords import hash_password, verify_password

from .conftest import free_port, pxsgate
from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

TOKEN = "api-token-0123456789abcdef0123456789abcdef"
PASSWORDS = {"vera": "viewer-password-1", "rita": "reviewer-password-2",
             "otto": "operator-password-3"}
ROLES = {"vera": "viewer", "rita": "reviewer", "otto": "operator"}
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@dataclass
class Site:
    gw: Gateway
    tmp: Path
    base: str

    @property
    def config(self) -> Path:
        return self.tmp / "pxsgate.yaml"

    @property
    def db(self) -> Path:
        return self.tmp / "data" / "pxsgate.sqlite3"

    def audit(self, *args: str) -> list[dict[str, Any]]:
        out = pxsgate("audit", "--config", self.config, "--json", *args)
        entries: list[dict[str, Any]] = json.loads(out.stdout)
        return entries

    def client(self, **kwargs: Any) -> aiohttp.ClientSession:
        # unsafe: the cookie jar keeps cookies of an IP address (127.0.0.1) too.
        return aiohttp.ClientSession(self.base, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     **kwargs)


def add_user(config: Path, name: str, role: str, password: str
             ) -> subprocess.CompletedProcess[str]:
    """`pxsgate users add`, the password as one line on stdin (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "pxsgate", "users", "add", name, "--role",
                           role, "--config", str(config)], input=password + "\n",
                          text=True, capture_output=True, timeout=60)


def _write_token(tmp: Path) -> None:
    tmp.mkdir(exist_ok=True)
    (tmp / "token").write_text(TOKEN + "\n")


@asynccontextmanager
async def ui_site(tmp: Path, ui: str = "") -> AsyncIterator[Site]:
    """A gateway with the HTTP port behind a bearer token, /ui/ on it, and the three users
    added through the real CLI."""
    port = free_port()
    _write_token(tmp)
    extra = f"ui:\n{ui}" if ui else ""
    async with gateway(tmp, extra=extra, http_port=port,
                       http_token_file=tmp / "token") as (gw, _):
        site = Site(gw, tmp, f"http://127.0.0.1:{port}")
        for name, role in ROLES.items():
            done = await asyncio.to_thread(add_user, site.config, name, role,
                                           PASSWORDS[name])
            assert done.returncode == 0, done.stderr
        yield site


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found, text
    return found.group(1)


async def login(client: aiohttp.ClientSession, name: str, password: str | None = None,
                csrf: str | None = None) -> aiohttp.ClientResponse:
    """GET the form (its CSRF cookie and field), POST it; the response, not followed."""
    async with client.get("/ui/login") as form:
        assert form.status == 200
        token = csrf_of(await form.text())
    data = {"username": name, "password": PASSWORDS.get(name, "") if password is None
            else password, "csrf": token if csrf is None else csrf}
    async with client.post("/ui/login", data=data, allow_redirects=False) as response:
        await response.read()
        return response


def entries(site: Site, action: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in site.audit() if e["action"] == action
            and all(e.get(k) == v for k, v in match.items())]


async def test_roles_see_what_they_may_and_every_action_is_audited(tmp_path: Path) -> None:
    async with ui_site(tmp_path) as site:
        study = ap_study(221, "UI")
        await send(site.gw, study)
        uid = str(study[0].StudyInstanceUID)
        doc = await result_of(site.gw, uid)
        identifiers = [doc["patientId"], doc["accessionNumber"], uid,
                       str(study[0].SeriesInstanceUID), str(study[0].SOPInstanceUID)]

        listed = pxsgate("users", "list", "--json", "--config", site.config)
        assert {u["name"]: u["role"] for u in json.loads(listed.stdout)} == ROLES
        short = await asyncio.to_thread(add_user, site.config, "shorty", "viewer", "too-short")
        assert short.returncode == 2
        assert "fewer than 12" in short.stderr

        # The JSON API keeps its token; /ui/ is not behind it, and has its own login.
        async with site.client() as anonymous:
            for path in ("/results", "/studies/" + uid, "/ui/../results"):
                async with anonymous.get(path) as r:
                    assert r.status == 401, path
            async with anonymous.get("/healthz") as r:
                assert r.status == 200
            async with anonymous.get("/ui/", allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"].startswith("/ui/login?next=")
                for header, value in SECURITY_HEADERS.items():
                    assert r.headers[header] == value
            async with anonymous.get("/ui/login") as r:
                assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
                assert 'name="csrf"' in await r.text()

        # A viewer: de-identified rows only; may not review (403, audited).
        async with site.client() as viewer:
            response = await login(viewer, "vera")
            assert response.status == 303
            cookie = response.cookies["pxsgate_session"]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Strict"
            assert not cookie["secure"]  # no http.tls here
            async with viewer.get("/ui/") as r:
                assert r.status == 200
                page = await r.text()
            assert site.gw.store.study_label_hashed(uid) in page
            for text in identifiers:
                assert text not in page, text
            async with viewer.post(f"/ui/studies/{uid}/review", allow_redirects=False,
                                   data={"csrf": csrf_of(page),
                                         "verdict": "wrong-patient"}) as r:
                assert r.status == 403
                assert r.headers["X-Frame-Options"] == "DENY"
        denied = entries(site, "denied", user="vera", outcome=8)
        assert denied
        assert denied[-1]["detail"] == "review: needs the role reviewer"
        assert denied[-1]["studyKey"] == site.gw.store.study_label(uid)
        assert entries(site, "view-worklist", user="vera") == []  # nothing identified shown

        # A reviewer: identifiers, and a review stored beside the result.
        async with site.client() as reviewer:
            assert (await login(reviewer, "rita")).status == 303
            async with reviewer.get("/ui/") as r:
                page = await r.text()
            for text in identifiers[:3]:
                assert text in page, text
            async with reviewer.post(f"/ui/studies/{uid}/review", allow_redirects=False,
                                     data={"csrf": csrf_of(page), "verdict": "confirmed",
                                           "comment": "AP film, right patient"}) as r:
                assert r.status == 303
            async with reviewer.post("/ui/logout", data={"csrf": csrf_of(page)},
                                     allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"] == "/ui/login"
            async with reviewer.get("/ui/", allow_redirects=False) as r:
                assert r.status == 303  # logged out: the session is gone
        reviews = await site.gw.store.reviews(uid)
        assert [(v.reviewer, v.verdict, v.comment, v.result_id) for v in reviews] == [
            ("rita", "confirmed", "AP film, right patient", doc["id"])]
        assert await result_of(site.gw, uid) == doc  # the result itself is not edited

        trail = site.audit("--user", "rita")
        assert [e["action"] for e in trail] == ["login", "view-worklist", "review", "logout"]
        review = trail[2]
        assert review["outcome"] == 0
        assert review["detail"] == "confirmed"
        assert review["studyKey"] == site.gw.store.study_label(uid)
        assert review["peer"] == "127.0.0.1"
        assert review["role"] == "reviewer"
        assert review["EventIdentification"]["EventID"]["code"] == "110110"
        assert review["EventIdentification"]["EventActionCode"] == "C"
        assert "AP film" not in json.dumps(site.audit())  # the comment is not in the trail
        added = entries(site, "user-added")
        assert [e["detail"] for e in added] == [f"{n} as {r}" for n, r in ROLES.items()]
        text = pxsgate("audit", "--config", site.config, "--since", "2000-01-01").stdout
        assert "review" in text
        assert "rita" in text
        assert pxsgate("audit", "--config", site.config, "--json", "--since",
                       "2999-01-01").stdout.strip() == "[]"

        # The trail is append-only, whoever opens the file.
        db = sqlite3.connect(site.db)
        try:
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute("UPDATE audit SET user_name = 'nobody'")
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute("DELETE FROM audit")
        finally:
            db.close()


async def test_wrong_passwords_are_limited_and_forms_need_their_csrf_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with ui_site(tmp_path) as site, site.client() as client:
        # A login form posted without the token its page set: refused.
        async with client.post("/ui/login", allow_redirects=False,
                               data={"username": "rita",
                                     "password": PASSWORDS["rita"]}) as r:
            assert r.status == 403
        assert entries(site, "denied", detail="login: no valid CSRF token", outcome=8)

        # Five wrong passwords: each 401; then 429, the right password unchecked.
        for _ in range(5):
            assert (await login(client, "rita", "not-the-password")).status == 401
        refused = await login(client, "rita")
        assert refused.status == 429
        assert int(refused.headers["Retry-After"]) > 0
        failed = entries(site, "login-failed")
        assert [(e["user"], e["outcome"], e["detail"]) for e in failed] == (
            [("rita", 4, "wrong password")] * 5
            + [("rita", 8, "too many failed logins: refused unchecked")])
        assert (await login(client, "nobody-here", "whatever-password")).status == 429
        assert not entries(site, "login")

    # The log has the refusals as audit.* events, never the password.
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    failed_events = [e for e in events if e.get("event") == "audit.login-failed"]
    assert len(failed_events) == 7
    assert failed_events[0]["level"] == "warning"
    assert "not-the-password" not in out
    assert PASSWORDS["rita"] not in out


async def test_a_post_without_the_session_csrf_token_is_refused(tmp_path: Path) -> None:
    async with ui_site(tmp_path) as site, site.client() as client:
        assert (await login(client, "otto")).status == 303
        async with client.post("/ui/logout", allow_redirects=False) as r:
            assert r.status == 403
        async with client.post("/ui/logout", data={"csrf": "forged"},
                               allow_redirects=False) as r:
            assert r.status == 403
        denied = entries(site, "denied", user="otto")
        assert [e["detail"] for e in denied] == ["logout: no valid CSRF token"] * 2
        async with client.get("/ui/") as r:
            assert r.status == 200  # still logged in


async def test_an_expired_session_is_sent_to_the_login(tmp_path: Path) -> None:
    async with ui_site(tmp_path) as site, site.client() as client:
        assert (await login(client, "rita")).status == 303
        async with client.get("/ui/") as r:
            page = await r.text()
        db = sqlite3.connect(site.db)
        with db:
            db.execute("UPDATE sessions SET expires = 0")
        db.close()
        async with client.post("/ui/studies/1.2.3/review", allow_redirects=False,
                               data={"csrf": csrf_of(page), "verdict": "confirmed"}) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/ui/login")
        async with client.get("/ui/", allow_redirects=False) as r:
            assert r.status == 303  # the session was ended, not only refused once
        expired = entries(site, "denied", user="rita", outcome=4)
        assert [e["detail"] for e in expired] == ["review: session expired"]
        assert await site.gw.store.reviews("1.2.3") == []


async def test_the_user_header_is_trusted_from_the_proxy_only(tmp_path: Path) -> None:
    trusted = "  trusted-proxies: [127.0.0.1]\n  user-header: X-Remote-User\n"
    async with ui_site(tmp_path / "a", trusted) as site, site.client() as client:
        async with client.get("/ui/", headers={"X-Remote-User": "rita"}) as r:
            assert r.status == 200
            assert "rita (reviewer)" in await r.text()
        async with client.get("/ui/", headers={"X-Remote-User": "mallory"},
                              allow_redirects=False) as r:
            assert r.status == 200  # mallory is no user: still rita's session
        async with site.client() as other, other.get(
                "/ui/", headers={"X-Remote-User": "mallory"}, allow_redirects=False) as r:
            assert r.status == 303
        assert entries(site, "login", user="rita", detail="sso")
        assert entries(site, "login-failed", user="?", detail="sso: unknown user")

    elsewhere = "  trusted-proxies: [192.0.2.0/24]\n  user-header: X-Remote-User\n"
    async with ui_site(tmp_path / "b", elsewhere) as site, site.client() as client:
        async with client.get("/ui/", headers={"X-Remote-User": "otto"},
                              allow_redirects=False) as r:
            assert r.status == 303  # not from a trusted proxy: to the login form
        assert entries(site, "denied", outcome=8,
                       detail="X-Remote-User from an address not in ui.trusted-proxies")
        assert not entries(site, "login")


@pytest.mark.parametrize(("ui", "path"), [
    ({"trusted-proxies": ["10.0.0.5"]}, "ui.user-header"),
    ({"user-header": "X-Remote-User"}, "ui.trusted-proxies"),
    ({"trusted-proxies": ["proxy.example"], "user-header": "X-Remote-User"},
     "ui.trusted-proxies"),
    ({"user-header": "X Remote User", "trusted-proxies": ["10.0.0.0/8"]}, "ui.user-header"),
    ({"session-minutes": 0}, "ui.session-minutes"),
    ({"enabled": True, "_port": 0}, "ui.enabled"),
])
def test_ui_config_is_validated(ui: dict[str, Any], path: str) -> None:
    port = ui.pop("_port", 8787)
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"http": {"port": port}, "ui": ui})
    assert caught.value.path == path


def test_ui_is_on_with_the_http_port_by_default() -> None:
    assert config_from_mapping({}).ui_enabled
    assert not config_from_mapping({"http": {"port": 0}}).ui_enabled
    assert not config_from_mapping({"ui": {"enabled": False}}).ui_enabled


def test_passwords_and_the_secure_cookie() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$32768$8$1$")
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert not verify_password("anything", "md5$abc")
    assert hash_password("correct horse battery") != stored  # a salt of its own
    for secure in (True, False):
        store: Any = None  # set_session_cookie needs no store
        auth = UiAuth(config_from_mapping({}).ui, store, secure_cookies=secure)
        response = web.Response()
        auth.set_session_cookie(response, "token")
        cookie = response.cookies[SESSION_COOKIE]
        assert bool(cookie["secure"]) is secure
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
