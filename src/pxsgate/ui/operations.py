"""The Operations page (operators only; anyone else gets 403, audited) and its actions.

- ``/ui/operations``: the queues (the pipeline's backlog, the model's queue, the outbox),
  studies in progress and waiting (from the store), failures and dead deliveries with a
  Retry button, force completion of a study still receiving, the model and its device, and
  the free space of the data directory;
- POST ``/ui/deliveries/{id}/retry`` (audited RETRY_DELIVERY): the delivery due now with a
  fresh count of tries, as ``pxsgate outbox retry ID`` makes it, and the outbox woken;
- POST ``/ui/studies/{uid}/force`` (audited FORCE_STUDY): a study still being received made
  ready now (the gateway's assembler hands it to the pipeline).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from aiohttp import web

from pxsgate.records import DeliveryState, now_iso
from pxsgate.store import UTC_FORMAT
from pxsgate.ui import html
from pxsgate.ui.audit import Action, Outcome
from pxsgate.ui.auth import auth_of, current_user, page_response, require
from pxsgate.ui.html import Markup, render
from pxsgate.ui.pages import page, study_href
from pxsgate.ui.services import services_of
from pxsgate.ui.study import force_button, retry_button

FAILURES_DAYS = 7  # failed results shown: those of the last week
LISTED = 100  # rows per table at most


def _table(head: tuple[str, ...], rows: list[Markup]) -> Markup:
    if not rows:
        return Markup("<p>None.</p>")
    th = html.join(render("<th>$h</th>", h=h) for h in head)
    return render("<table><tr>$th</tr>$rows</table>", th=th, rows=html.join(rows))


def _cells(*values: Any) -> Markup:
    return render("<tr>$c</tr>", c=html.join(render("<td>$v</td>", v=v) for v in values))


def _uid_link(uid: str) -> Markup:
    return render('<a href="$h">$u</a>', h=study_href(uid), u=uid)


@require("operator", "view-operations")
async def operations(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    services = services_of(request)
    store = auth.store
    report = await services.health()
    deliveries = report.get("deliveries") or await store.delivery_counts()
    queues = [
        ("Studies in progress (pipeline)", report.get("studiesInProgress", "?")),
        ("Studies waiting or in progress (backlog)", report.get("studiesWaiting", "?")),
        ("Open associations", report.get("associations", "?")),
        ("Images queued for the model", report.get("inferenceQueue", "?")),
        ("Spool", f"{int(report.get('spoolBytes', 0)) / 2**20:.1f} MiB"),
        ("Deliveries pending", deliveries.get("pending", 0)),
        ("Deliveries dead", deliveries.get("dead", 0)),
        ("Deliveries in flight", deliveries.get("inFlight", 0)),
    ]
    counts = await store.unfinished_counts()
    queues += [(f"Studies {state}", n) for state, n in counts.items()]
    parts = [Markup("<h2>Queues</h2>"),
             _table(("Queue", "Now"), [_cells(k, v) for k, v in queues])]

    studies = await store.unfinished_studies(LISTED)
    parts.append(Markup("<h2>Studies in progress and waiting</h2>"))
    parts.append(_table(
        ("Study", "State", "First received", "Last received", "Released", "Ready", ""),
        [render("<tr><td>$uid</td><td>$state</td><td>$first</td><td>$last</td>"
                "<td>$released</td><td>$ready</td><td>$force</td></tr>",
                uid=_uid_link(s[0]), state=s[1], first=s[2] or "", last=s[3] or "",
                released=s[4] or "", ready=s[5] or "",
                force=force_button(user, s[0]) if s[1] == "receiving" else Markup(""))
         for s in studies]))

    dead = await store.deliveries(state=DeliveryState.DEAD.value, limit=LISTED)
    parts.append(Markup("<h2>Dead deliveries</h2>"))
    studies_of = {d.result_id: await store.result_study(d.result_id) for d in dead}
    parts.append(_table(
        ("Delivery", "Study", "Exporter", "Attempts", "Last error", "Updated", ""),
        [render("<tr><td>$id</td><td>$study</td><td>$exp</td><td>$n</td><td>$err</td>"
                "<td>$at</td><td>$retry</td></tr>", id=d.id,
                study=_uid_link(studies_of[d.result_id] or ""), exp=d.exporter,
                n=d.attempts, err=d.last_error, at=d.updated_at,
                retry=retry_button(user, d.id)) for d in dead]))

    since = (datetime.now(UTC) - timedelta(days=FAILURES_DAYS)).strftime(UTC_FORMAT)
    failed = (await store.failed_results(since))[:LISTED]
    parts.append(render("<h2>Failed results (last $d days)</h2>", d=FAILURES_DAYS))
    parts.append(_table(("Created", "Study", "Exit code", "Error"),
                        [_cells(f[0], _uid_link(str(f[1])), f[2], f[3]) for f in failed]))

    model = services.model() or {}
    parts.append(Markup("<h2>Model and device</h2>"))
    parts.append(_table(("Field", "Value"), [
        _cells(k, model.get(k, "")) for k in ("name", "version", "device", "precision",
                                               "weightsSha256", "anchorsSha256",
                                               "anchorCount")] if model else []))
    if services.data_dir is not None:
        usage = await asyncio.to_thread(_disk, services.data_dir)
        parts.append(Markup("<h2>Disk</h2>"))
        parts.append(_table(("Data directory", "Free", "Total", "Used"), [_cells(*usage)]))
    await auth.audit(request, Action.VIEW_STUDY, Outcome.SUCCESS, user=user,
                     detail="operations")
    return page_response(page(user, "Operations", html.join(parts),
                              message=request.query.get("done", "")))


def _disk(path: Any) -> tuple[str, str, str, str]:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return (str(path), f"unknown: {exc.strerror}", "", "")
    return (str(path), f"{usage.free / 2**30:.1f} GiB", f"{usage.total / 2**30:.1f} GiB",
            f"{100 * usage.used / usage.total:.0f} %" if usage.total else "")


def _back(request: web.Request, message: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/ui/operations?done=" + quote(message, safe=""))


@require("operator", "retry-delivery")
async def retry(request: web.Request) -> web.StreamResponse:
    """A delivery due now with fresh tries (``pxsgate outbox retry ID``)."""
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    delivery = request.match_info["id"]
    found = await auth.store.deliveries(ids=[delivery])
    study_uid = await auth.store.result_study(found[0].result_id) if found else None
    count = await auth.store.retry_deliveries(now_iso(), time.time(), ids=[delivery]) \
        if found else 0
    if not count:
        await auth.audit(request, Action.RETRY_DELIVERY, Outcome.MINOR_FAILURE, user=user,
                         detail="no such delivery")
        raise _back(request, "No such delivery.")
    services_of(request).wake_outbox()
    await auth.audit(request, Action.RETRY_DELIVERY, Outcome.SUCCESS, user=user,
                     study_uid=study_uid, detail=f"{found[0].exporter}: {delivery}")
    raise _back(request, f"Delivery {delivery} is due again.")


@require("operator", "force-study")
async def force(request: web.Request) -> web.StreamResponse:
    """A study still being received made ready now."""
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    uid = request.match_info["uid"]
    done = await services_of(request).force_study(uid)
    await auth.audit(request, Action.FORCE_STUDY,
                     Outcome.SUCCESS if done else Outcome.MINOR_FAILURE, user=user,
                     study_uid=uid, detail="" if done else "not being received")
    raise _back(request, "The study is ready now." if done
                else "That study is not being received.")
