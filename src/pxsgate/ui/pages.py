"""The pages: the layout every page shares, the landing page (a placeholder worklist), and
the review action. A page is a handler under :func:`pxsgate.ui.auth.require`:

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

from urllib.parse import quote

from aiohttp import web

from pxsgate.records import now_iso
from pxsgate.store import VERDICTS, WorklistRow
from pxsgate.ui import html
from pxsgate.ui.audit import Action, Outcome
from pxsgate.ui.auth import CurrentUser, auth_of, current_user, page_response, require
from pxsgate.ui.html import Markup, render

WORKLIST_SIZE = 50
MAX_COMMENT = 2000

NAV = Markup('<a href="/ui/">Worklist</a>'
             '<a href="/ui/trends">Trends</a>')


def page(user: CurrentUser | None, title: str, body: Markup, message: str = "") -> Markup:
    """A whole page: the header (with the user and the logout form), ``title``, ``body``."""
    account = (render(html.ACCOUNT, user=user.name, role=user.role,
                      csrf=html.csrf_field(user.csrf)) if user else Markup(""))
    note = render('<p class="message">$m</p>', m=message) if message else Markup("")
    return render(html.PAGE, title=title, nav=NAV if user else Markup(""), account=account,
                  message=note, body=body)


# --- the worklist (a placeholder: the 50 newest current results) --------------------------

_IDENTIFIED_HEAD = Markup(
    "<tr><th>Study time</th><th>Patient ID</th><th>Accession</th><th>Study UID</th>"
    "<th>Status</th><th>Score</th><th>Flags</th><th>Review</th><th></th></tr>")
_IDENTIFIED_ROW = (
    "<tr><td>$time</td><td>$patient</td><td>$accession</td><td>$uid</td><td>$status</td>"
    '<td class="num">$score</td><td class="flag">$flags</td><td>$verdict</td>'
    "<td>$review</td></tr>")
_DEIDENTIFIED_HEAD = Markup(
    "<tr><th>Study key</th><th>Study date</th><th>Status</th><th>Score</th><th>Flags</th>"
    "<th>Review</th></tr>")
_DEIDENTIFIED_ROW = (
    "<tr><td>$key</td><td>$date</td><td>$status</td>"
    '<td class="num">$score</td><td class="flag">$flags</td><td>$verdict</td></tr>')
_REVIEW_FORM = (
    '<form class="review" method="post" action="/ui/studies/$uid/review">$csrf'
    '<input type="hidden" name="result_id" value="$result">'
    '<select name="verdict">$options</select>'
    '<input type="text" name="comment" maxlength="2000" placeholder="comment">'
    '<button type="submit">Review</button></form>')


def _score(row: WorklistRow) -> str:
    return "" if row.score is None else f"{row.score:.2f}"


def review_form(user: CurrentUser, study_uid: str, result_id: str) -> Markup:
    options = html.join(render('<option value="$v">$v</option>', v=v) for v in VERDICTS)
    return render(_REVIEW_FORM, uid=quote(study_uid, safe=""), csrf=html.csrf_field(user.csrf),
                  result=result_id, options=options)


def identified_row(user: CurrentUser, row: WorklistRow) -> Markup:
    review = review_form(user, row.study_instance_uid, row.result_id) \
        if user.may("reviewer") else Markup("")
    return render(_IDENTIFIED_ROW, time=row.study_time or "", patient=row.patient_id,
                  accession=row.accession_number, uid=row.study_instance_uid,
                  status=row.status, score=_score(row), flags=row.flags,
                  verdict=row.verdict or "", review=review)


def deidentified_row(key: str, row: WorklistRow) -> Markup:
    """A row for a viewer: the study's key (a keyed hash of its UID), its date only."""
    return render(_DEIDENTIFIED_ROW, key=key, date=(row.study_time or "")[:10],
                  status=row.status, score=_score(row), flags=row.flags,
                  verdict=row.verdict or "")


@require("viewer", "view-worklist")
async def worklist(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    rows = await auth.store.worklist(WORKLIST_SIZE)
    if user.sees_identifiers:
        body = render("<table>$head$rows</table>", head=_IDENTIFIED_HEAD,
                      rows=html.join(identified_row(user, r) for r in rows))
        await auth.audit(request, Action.VIEW_WORKLIST, Outcome.SUCCESS, user=user,
                         detail=f"{len(rows)} results")
    else:
        label = auth.store.study_label_hashed  # never the UID, whatever include-phi says
        body = render("<table>$head$rows</table>", head=_DEIDENTIFIED_HEAD,
                      rows=html.join(deidentified_row(label(r.study_instance_uid), r)
                                     for r in rows))
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
