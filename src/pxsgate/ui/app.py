"""The /ui/ sub-application: its routes, its middleware, its access state."""

from __future__ import annotations

from aiohttp import web

from pxsgate.config import UiConfig
from pxsgate.store import Store
from pxsgate.ui import login, operations, pages, study, trends
from pxsgate.ui.auth import AUTH_KEY, UiAuth, ui_middleware
from pxsgate.ui.services import SERVICES_KEY, UiServices


def routes() -> list[web.RouteDef]:
    """Every page and action, relative to /ui/."""
    return [
        web.get("/", pages.worklist),
        web.get("/login", login.login_form),
        web.post("/login", login.login),
        web.post("/logout", login.logout),
        web.post("/studies/{uid}/review", pages.review),
        web.get("/studies/{uid}", study.study),
        web.get("/k/{key}", study.study_by_key),
        web.get("/pictures/{key}/{kind}", study.picture),
        web.get("/operations", operations.operations),
        web.post("/deliveries/{id}/retry", operations.retry),
        web.post("/studies/{uid}/force", operations.force),
        web.get("/trends", trends.trends),
        web.get("/static/pxsgate.css", pages.stylesheet),
    ]


def build_app(config: UiConfig, store: Store, *, secure_cookies: bool,
              services: UiServices | None = None) -> web.Application:
    """The /ui/ sub-application (service/api.py mounts it); ``services``: what the pages
    need from the running gateway (pictures, force, the outbox, the queues)."""
    app = web.Application(middlewares=[ui_middleware])
    app[AUTH_KEY] = UiAuth(config, store, secure_cookies=secure_cookies)
    app[SERVICES_KEY] = services or UiServices()
    app.router.add_routes(routes())
    return app
