"""The pages: the layout every page shares, the worklist, and the review action (the study
page is study.py, Operations operations.py). A page is a handler under
:func:`pxsgate.ui.auth.require`:

    @require("reviewer", "view-study")           # the role, and what the audit calls it
    async def study(request):
        user = current_user(request)             # never None under require
        ...
        if user.sees_identifiers:                # reviewer and operator
            await auth_of(request).audit(request, Action.VIEW_STUDY, Outcome.SUCCESS,
                                         user=user, study_uid=uid)
        return page_response(page(user, "Study", body))

and a route in :func:`pxsgate.ui.routes`. Viewers are shown de-identified rows only (no
PatientID, name, accession, birth date or UIDs: a study is named by its key); a page that
shows identifiers records the view in the audit trail.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import MultiMapping

from pxsgate.config import RESULT_STATUSES
from pxsgate.records import now_iso
from pxsgate.store import VERDICTS, WorklistFilter, WorklistRow
from pxsgate.ui import html
from pxsgate.ui.audit import Action, Outcome
from pxsgate.ui.auth import CurrentUser, auth_of, current_user, page_response, require
from pxsgate.ui.html import Markup, render
from pxsgate.ui.services import services_of

WORKLIST_SIZE = 50
MAX_COMMENT = 2000

NAV = Markup('<a href="/ui/">Worklist</a>'
             '<a href="/ui/trends">Trends</a>'
             '<a href="/ui/operations">Operations</a>')


def page(user: CurrentUser | None, title: str, body: Markup, message: str = "") -> Markup:
    """A whole page: the header (with the user and the logout form), ``title``, ``body``."""
    account = (render(html.ACCOUNT, user=user.name, role=user.role,
                      csrf=html.csrf_field(user.csrf)) if user else Markup(""))
    note = render('<p class="message">$m</p>', m=message) if message else Markup("")
    return render(html.PAGE, title=title, nav=NAV if user else Markup(""), account=account,
                  message=note, body=body)


# --- the worklist ---------------------------------------------------------------------------

_IDENTIFIED_HEAD = Markup(
    "<tr><th>Study time</th><th>Patient ID</th><th>Accession</th><th>Status</th>"
    "<th>Score</th><th>Change</th><th>Flags</th><th>Review</th></tr>")
_IDENTIFIED_ROW = (
    '<tr class="$cls"><td><a href="$href">$time</a></td><td>$patient</td><td>$accession</td>'
    '<td>$status</td><td class="num">$score</td><td class="num">$change</td>'
    '<td class="flag">$flags</td><td>$verdict</td></tr>')
_DEIDENTIFIED_HEAD = Markup(
    "<tr><th>Study key</th><th>Study date</th><th>Status</th><th>Score</th><th>Change</th>"
    "<th>Flags</th><th>Review</th></tr>")
_DEIDENTIFIED_ROW = (
    '<tr class="$cls"><td><a href="$href">$key</a></td><td>$date</td><td>$status</td>'
    '<td class="num">$score</td><td class="num">$change</td><td class="flag">$flags</td>'
    "<td>$verdict</td></tr>")
_REVIEW_FORM = (
    '<form class="review" method="post" action="/ui/studies/$uid/review">$csrf'
    '<input type="hidden" name="result_id" value="$result">'
    '<select name="verdict">$options</select>'
    '<input type="text" name="comment" maxlength="2000" placeholder="comment">'
    '<button type="submit">Review</button></form>')
_FILTERS = """<form class="filters" method="get" action="/ui/">
<label>Status <select name="status">$statuses</select></label>
<label><input type="checkbox" name="flagged" value="1"$flagged> flagged only</label>
<label><input type="checkbox" name="pinned" value="1"$pinned> flagged first</label>
<input type="hidden" name="pinned" value="0">
<label>From <input type="date" name="since" value="$since"></label>
<label>To <input type="date" name="until" value="$until"></label>
<label>Score <input type="number" step="any" name="score_min" value="$score_min"
 placeholder="min"> to <input type="number" step="any" name="score_max" value="$score_max"
 placeholder="max"></label>
$accession
<button type="submit">Filter</button>
</form>"""
_ACCESSION_FILTER = ('<label>Accession <input type="text" name="accession" value="$v">'
                     "</label>")
_PAGER = '<p class="pager">$prev <span>page $page</span> $next</p>'
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
WORKLIST_PARAMS = ("status", "flagged", "pinned", "since", "until", "score_min",
                   "score_max", "accession", "page", "saved")


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def study_href(uid: str) -> str:
    return "/ui/studies/" + quote(uid, safe="")


def viewer_href(key: str) -> str:
    return "/ui/k/" + key


def review_form(user: CurrentUser, study_uid: str, result_id: str) -> Markup:
    options = html.join(render('<option value="$v">$v</option>', v=v) for v in VERDICTS)
    return render(_REVIEW_FORM, uid=quote(study_uid, safe=""), csrf=html.csrf_field(user.csrf),
                  result=result_id, options=options)


def identified_row(row: WorklistRow) -> Markup:
    return render(_IDENTIFIED_ROW, cls="flagged" if row.flags else "",
                  href=study_href(row.study_instance_uid), time=row.study_time or "(no time)",
                  patient=row.patient_id, accession=row.accession_number, status=row.status,
                  score=_score(row.score), change=_score(row.change), flags=row.flags,
                  verdict=row.verdict or "")


def deidentified_row(key: str, row: WorklistRow) -> Markup:
    """A row for a viewer: the study's key (a keyed hash of its UID), its date only."""
    return render(_DEIDENTIFIED_ROW, cls="flagged" if row.flags else "", href=viewer_href(key),
                  key=key, date=(row.study_time or "")[:10], status=row.status,
                  score=_score(row.score), change=_score(row.change), flags=row.flags,
                  verdict=row.verdict or "")


def _float(query: Mapping[str, str], name: str) -> float | None:
    text = query.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"{name}: a number") from exc
    if not math.isfinite(value):
        raise ValueError(f"{name}: a finite number")
    return value


def _flag(query: MultiMapping[str], name: str, default: bool) -> bool:
    values = query.getall(name, [])
    if not values:
        return default
    if any(v not in ("0", "1") for v in values):
        raise ValueError(f"{name}: 0 or 1")
    return "1" in values  # a checked box sends 1 beside its hidden 0


def worklist_filter(query: MultiMapping[str], user: CurrentUser) -> tuple[WorklistFilter, int]:
    """The query string as a filter and a page number (from 1); ValueError names a bad
    parameter."""
    unknown = sorted(set(query) - set(WORKLIST_PARAMS))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
    single = {k: query.getone(k) for k in query if k not in ("pinned", "flagged")}
    status = single.get("status") or None
    if status is not None and status not in RESULT_STATUSES:
        raise ValueError(f"status: one of {', '.join(RESULT_STATUSES)}")
    dates = {}
    for name in ("since", "until"):
        text = single.get(name, "").strip()
        if text and not _DATE_RE.match(text):
            raise ValueError(f"{name}: a date, YYYY-MM-DD")
        dates[name] = text or None
    accession = single.get("accession", "").strip() or None
    if accession is not None and not user.sees_identifiers:
        raise ValueError("accession: reviewers and operators only")
    page_text = single.get("page", "1")
    if not page_text.isdigit() or not 1 <= int(page_text) <= 100_000:
        raise ValueError("page: 1..100000")
    flt = WorklistFilter(status=status, flagged=_flag(query, "flagged", False),
                         since=dates["since"], until=dates["until"],
                         score_min=_float(single, "score_min"),
                         score_max=_float(single, "score_max"), accession=accession,
                         pinned=_flag(query, "pinned", True))
    return flt, int(page_text)


def _filters_form(user: CurrentUser, flt: WorklistFilter) -> Markup:
    statuses = html.join(
        render('<option value="$v"$sel>$label</option>', v=v, label=v or "any",
               sel=Markup(" selected") if (flt.status or "") == v else Markup(""))
        for v in ("", *RESULT_STATUSES))
    checked = Markup(" checked")
    accession = (render(_ACCESSION_FILTER, v=flt.accession or "")
                 if user.sees_identifiers else Markup(""))
    return render(_FILTERS, statuses=statuses,
                  flagged=checked if flt.flagged else Markup(""),
                  pinned=checked if flt.pinned else Markup(""), since=flt.since or "",
                  until=flt.until or "", score_min=_score_text(flt.score_min),
                  score_max=_score_text(flt.score_max), accession=accession)


def _score_text(value: float | None) -> str:
    return "" if value is None else repr(value)


def _page_link(query: MultiMapping[str], page: int, label: str) -> Markup:
    params = [(k, v) for k, v in query.items() if k not in ("page", "saved")]
    params.append(("page", str(page)))
    return render('<a href="/ui/?$q">$label</a>', q=urlencode(params), label=label)


@require("viewer", "view-worklist")
async def worklist(request: web.Request) -> web.StreamResponse:
    """Current results, flagged first (``pinned``, on by default), newest first, 50 a page;
    filtered by the query string (:func:`worklist_filter`)."""
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    try:
        flt, page_no = worklist_filter(request.query, user)
    except ValueError as exc:
        return page_response(page(user, "Worklist", render('<p class="error">$m</p>',
                                                           m=str(exc))), 400)
    rows, more = await auth.store.worklist_page(flt, WORKLIST_SIZE,
                                                (page_no - 1) * WORKLIST_SIZE)
    if user.sees_identifiers:
        table = render("<table>$head$rows</table>", head=_IDENTIFIED_HEAD,
                       rows=html.join(identified_row(r) for r in rows))
        await auth.audit(request, Action.VIEW_WORKLIST, Outcome.SUCCESS, user=user,
                         detail=f"{len(rows)} results")
    else:
        label = auth.store.study_label_hashed  # never the UID, whatever include-phi says
        keys = services_of(request).study_keys
        shown = []
        for r in rows:
            key = label(r.study_instance_uid)
            keys.add(key, r.study_instance_uid)  # for the study page the row links to
            shown.append(deidentified_row(key, r))
        table = render("<table>$head$rows</table>", head=_DEIDENTIFIED_HEAD,
                       rows=html.join(shown))
    pager = render(_PAGER, page=page_no,
                   prev=_page_link(request.query, page_no - 1, "newer")
                   if page_no > 1 else Markup(""),
                   next=_page_link(request.query, page_no + 1, "older") if more
                   else Markup(""))
    empty = Markup("<p>No results.</p>") if not rows else Markup("")
    body = html.join([_filters_form(user, flt), table, empty, pager])
    saved = request.query.get("saved")
    return page_response(page(user, "Worklist", body,
                              message="Review saved." if saved else ""))


@require("reviewer", "review")
async def review(request: web.Request) -> web.StreamResponse:
    """A reviewer's verdict on a study's result (the current one unless the form names
    another of the study's results): stored beside the result, never editing it."""
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    uid = request.match_info["uid"]
    form = await request.post()
    verdict = form.get("verdict")
    comment = form.get("comment", "")
    result_id = form.get("result_id") or await auth.store.current_result_id(uid)
    problem = ""
    if verdict not in VERDICTS:
        problem = f"verdict: one of {', '.join(VERDICTS)}"
    elif not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        problem = f"comment: at most {MAX_COMMENT} characters"
    elif not isinstance(result_id, str) or await auth.store.result_study(result_id) != uid:
        problem = "no such result of this study"
    if problem:
        await auth.audit(request, Action.REVIEW, Outcome.SERIOUS_FAILURE, user=user,
                         study_uid=uid, detail=problem)
        return page_response(page(user, "Review not saved", render("<p>$p</p>", p=problem)),
                             400)
    assert isinstance(verdict, str)
    assert isinstance(comment, str)
    assert isinstance(result_id, str)
    await auth.store.add_review(result_id, uid, user.name, verdict, comment.strip(),
                                now_iso())
    # The verdict only: a comment may name the patient.
    await auth.audit(request, Action.REVIEW, Outcome.SUCCESS, user=user, study_uid=uid,
                     detail=verdict)
    raise web.HTTPSeeOther("/ui/?saved=1")


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(text=html.STYLE, content_type="text/css")
