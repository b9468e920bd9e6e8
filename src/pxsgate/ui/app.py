"""The /ui/ sub-application: its routes, its middleware, its access state."""

from __future__ import annotations

from aiohttp import web

from pxsgate.config import UiConfig
from pxsgate.store import Store
from pxsgate.ui import login, pages, trends
from pxsgate.ui.auth import AUTH_KEY, UiAuth, ui_middleware


def routes() -> list[web.RouteDef]:
    """Every page and action, relative to /ui/."""
    return [
        web.get("/", pages.worklist),
        web.get("/login", login.login_form),
        web.post("/login", login.login),
        web.post("/logout", login.logout),
        web.post("/studies/{uid}/review", pages.review),
        web.get("/trends", trends.trends),
        web.get("/static/pxsgate.css", pages.stylesheet),
    ]


def build_app(config: UiConfig, store: Store, *, secure_cookies: bool) -> web.Application:
    """The /ui/ sub-application (service/api.py mounts it)."""
    app = web.Application(middlewares=[ui_middleware])
    app[AUTH_KEY] = UiAuth(config, store, secure_cookies=secure_cookies)
    app.router.add_routes(routes())
    return app
