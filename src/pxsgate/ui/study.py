"""The study page, and the pictures it shows.

- ``/ui/studies/{uid}`` (reviewer and above, audited VIEW_STUDY): the stage timeline
  (received -> released -> ready -> inferred -> stored -> exported, with durations), every
  instance as a thumbnail with its decision, rule and reason, the used images apart from the
  not-used ones, each scored image's model input beside the prior's (when the change's prior
  image has a stored model input), the result document, deliveries, earlier results,
  reviews and the review form; an operator also gets the force and retry buttons.
- ``/ui/k/{key}`` (any role): the same study de-identified, named by its key
  (``store.study_label_hashed``): no UIDs, identifiers, exact times, comments or errors.
- ``/ui/pictures/{key}/thumb`` and ``/ui/pictures/{key}/input`` (any role): a picture by
  its key (an HMAC of the SOP Instance UID, pxsgate.pictures), never a UID.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web

from pxsgate.document import CHANGE_CODE, PXS_CODE
from pxsgate.pictures import StudyPicture, study_pictures
from pxsgate.ui import html
from pxsgate.ui.audit import Action, Outcome
from pxsgate.ui.auth import CurrentUser, auth_of, current_user, page_response, require
from pxsgate.ui.html import Markup, render
from pxsgate.ui.pages import page, review_form
from pxsgate.ui.services import services_of

STAGES = ("received", "released", "ready", "inferred", "stored", "exported")
_STUDY_KEY_RE = re.compile(r"^[0-9a-f]{12}$")
_PICTURE_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
PICTURE_CACHE = "private, max-age=86400"
_KINDS = {"thumb": ("thumbnail", "image/webp"), "input": ("model-input", "image/png")}
_NONE = Markup("")


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.astimezone()


def timeline(document: Mapping[str, Any] | None,
             deliveries: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None, str]]:
    """(stage, when, seconds since the stage before) for each stage of STAGES; exported is
    the last delivery of the result."""
    stages: dict[str, Any] = {}
    if document is not None:
        stages = dict((document.get("pxsgate") or {}).get("stages") or {})
        delivered = [str(d["delivered_at"]) for d in deliveries
                     if d.get("delivered_at") and d.get("result_id") == document.get("id")]
        if delivered:
            stages["exported"] = max(delivered, key=lambda t: _when(t) or datetime.min)
    out = []
    before: datetime | None = None
    for name in STAGES:
        text = stages.get(name)
        moment = _when(text)
        took = ""
        if moment is not None and before is not None:
            took = f"+{(moment - before).total_seconds():.1f} s"
        if moment is not None:
            before = moment
        out.append((name, text, took))
    return out


def _timeline_html(rows: list[tuple[str, str | None, str]], identified: bool) -> Markup:
    items = html.join(
        render('<li class="$cls"><span class="stage">$name</span> <span>$when</span> '
               '<span class="took">$took</span></li>',
               cls="done" if when else "missing", name=name,
               when=(when or "—") if identified else ("" if when else "—"), took=took)
        for name, when, took in rows)
    return render('<h2>Timeline</h2><ol class="timeline">$items</ol>', items=items)


def _picture(pic: StudyPicture, identified: bool) -> Markup:
    decision = ("used" if pic.selected else "not used" if pic.selected is False
                else "no decision")
    img = (render('<img class="thumb" src="/ui/pictures/$k/thumb" alt="thumbnail">', k=pic.key)
           if pic.thumbnail is not None else Markup('<span class="nopic">no thumbnail</span>'))
    uid = render('<span class="uid">$u</span>', u=pic.sop_instance_uid) if identified else _NONE
    return render('<figure class="instance $cls" data-key="$k">$img<figcaption>'
                  '<b>$decision</b> <span class="rule">$rule</span> '
                  '<span class="reason">$reason</span> $uid</figcaption></figure>',
                  cls="used" if pic.selected else "unused", k=pic.key, img=img,
                  decision=decision, rule=pic.rule, reason=pic.reason, uid=uid)


def _change_entry(document: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    for entry in (document or {}).get("results") or ():
        if isinstance(entry, Mapping) and entry.get("code") == CHANGE_CODE:
            change = entry.get("change")
            return change if isinstance(change, Mapping) else None
    return None


def _scores(document: Mapping[str, Any] | None) -> dict[str, str]:
    """SOP Instance UID -> its PXS score, as the document says."""
    out: dict[str, str] = {}
    for entry in (document or {}).get("results") or ():
        if not isinstance(entry, Mapping) or entry.get("code") != PXS_CODE:
            continue
        for ref in entry.get("derivedFrom") or entry.get("presentOn") or ():
            for sop in (ref.get("refSopInstanceUid") or ()) if isinstance(ref, Mapping) else ():
                out[str(sop)] = str(entry.get("value", ""))
    return out


async def _model_inputs(request: web.Request, pics: list[StudyPicture],
                        document: Mapping[str, Any] | None) -> Markup:
    """Each scored image's model input, the prior's beside it when it is stored."""
    pictures = services_of(request).pictures
    change = _change_entry(document)
    prior = _NONE
    if pictures is not None and change is not None:
        prior_sop = str(change.get("priorSopInstanceUid", ""))
        key = pictures.key(prior_sop) if prior_sop else ""
        path = await asyncio.to_thread(pictures.by_key, key, "model-input") if key else None
        note = render("prior of $date, score $score; change: distance $d, score difference $s",
                      date=str(change.get("priorStudyDate", ""))[:10],
                      score=change.get("priorScore", ""), d=change.get("distance", ""),
                      s=change.get("scoreDifference", ""))
        if path is not None:
            prior = render('<figure class="prior"><img class="input" src="/ui/pictures/$k/'
                           'input" alt="prior model input"><figcaption>$n</figcaption>'
                           "</figure>", k=key, n=note)
        else:
            prior = render('<figure class="prior"><span class="nopic">the prior\'s model '
                           "input is not stored here</span><figcaption>$n</figcaption>"
                           "</figure>", n=note)
    scores = _scores(document)
    inputs = html.join(
        render('<figure class="model-input"><img class="input" src="/ui/pictures/$k/input" '
               'alt="model input"><figcaption>model input, score $s</figcaption></figure>',
               k=p.key, s=scores.get(p.sop_instance_uid, "?"))
        for p in pics if p.model_input is not None)
    if not inputs and prior is _NONE:
        return _NONE
    return render('<h2>Model input</h2><div class="inputs">$i$p</div>', i=inputs, p=prior)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> Markup:
    th = html.join(render("<th>$h</th>", h=h) for h in head)
    body = html.join(render("<tr>$cells</tr>", cells=html.join(
        render("<td>$c</td>", c=c) for c in row)) for row in rows)
    return render("<table><tr>$th</tr>$body</table>", th=th, body=body)


def _deliveries(user: CurrentUser, deliveries: Sequence[Mapping[str, Any]],
                identified: bool) -> Markup:
    if not deliveries:
        return Markup("<h2>Deliveries</h2><p>None.</p>")
    if not identified:
        rows = [(d["exporter"], d["state"], d["attempts"]) for d in deliveries]
        return render("<h2>Deliveries</h2>$t",
                      t=_table(("Exporter", "State", "Attempts"), rows))
    out = []
    for d in deliveries:
        button = _NONE
        if user.may("operator") and d["state"] != "delivered":
            button = retry_button(user, str(d["id"]))
        out.append(render(
            "<tr><td>$exporter</td><td>$state</td><td>$attempts</td><td>$error</td>"
            "<td>$updated</td><td>$button</td></tr>", exporter=d["exporter"],
            state=d["state"], attempts=d["attempts"], error=d["last_error"],
            updated=d["updated_at"], button=button))
    return render("<h2>Deliveries</h2><table><tr><th>Exporter</th><th>State</th>"
                  "<th>Attempts</th><th>Last error</th><th>Updated</th><th></th></tr>"
                  "$rows</table>", rows=html.join(out))


def retry_button(user: CurrentUser, delivery: str) -> Markup:
    return render('<form class="inline" method="post" action="/ui/deliveries/$id/retry">'
                  '$csrf<button type="submit" class="retry">Retry</button></form>',
                  id=quote(delivery, safe=""), csrf=html.csrf_field(user.csrf))


def force_button(user: CurrentUser, study_uid: str) -> Markup:
    return render('<form class="inline" method="post" action="/ui/studies/$uid/force">'
                  '$csrf<button type="submit" class="force">Force completion</button></form>',
                  uid=quote(study_uid, safe=""), csrf=html.csrf_field(user.csrf))


async def study_body(request: web.Request, user: CurrentUser, uid: str,
                     detail: Mapping[str, Any], identified: bool) -> Markup:
    """The study page's body; ``identified``: with identifiers (reviewer and above)."""
    auth = auth_of(request)
    pictures = services_of(request).pictures
    document = detail.get("result")
    study = detail["study"]
    deliveries = detail.get("deliveries") or []
    parts: list[Markup] = []
    headline = (document or {}).get("pxsgate", {}).get("headline") or {}
    if identified:
        parts.append(render(
            "<dl class=\"study\"><dt>Patient ID</dt><dd>$pid</dd><dt>Accession</dt>"
            "<dd>$acc</dd><dt>Study UID</dt><dd>$uid</dd><dt>Study time</dt><dd>$time</dd>"
            "<dt>State</dt><dd>$state $force</dd><dt>Status</dt><dd>$status</dd>"
            "<dt>Score</dt><dd>$score</dd><dt>Flags</dt><dd class=\"flag\">$flags</dd></dl>",
            pid=(document or {}).get("patientId", ""),
            acc=(document or {}).get("accessionNumber", ""), uid=uid,
            time=(document or {}).get("pxsgate", {}).get("studyDateTime") or "",
            state=study["state"],
            force=force_button(user, uid) if user.may("operator")
            and study["state"] == "receiving" else _NONE,
            status=(document or {}).get("status", "no result yet"),
            score=headline.get("value", ""),
            flags=" ".join((document or {}).get("pxsgate", {}).get("flags") or ())))
    else:
        parts.append(render(
            "<dl class=\"study\"><dt>Study key</dt><dd>$key</dd><dt>Study date</dt>"
            "<dd>$date</dd><dt>State</dt><dd>$state</dd><dt>Status</dt><dd>$status</dd>"
            "<dt>Score</dt><dd>$score</dd><dt>Flags</dt><dd class=\"flag\">$flags</dd></dl>",
            key=auth.store.study_label_hashed(uid),
            date=str((document or {}).get("pxsgate", {}).get("studyDateTime") or "")[:10],
            state=study["state"], status=(document or {}).get("status", "no result yet"),
            score=headline.get("value", ""),
            flags=" ".join((document or {}).get("pxsgate", {}).get("flags") or ())))
    parts.append(_timeline_html(timeline(document, deliveries), identified))
    if pictures is None:
        parts.append(Markup("<p>Pictures are off (pictures.enabled).</p>"))
    else:
        pics = await asyncio.to_thread(study_pictures, detail, pictures)
        used = [p for p in pics if p.selected]
        unused = [p for p in pics if not p.selected]
        parts.append(render('<h2>Used</h2><div class="instances used">$u</div>'
                            '<h2>Not used</h2><div class="instances unused">$n</div>',
                            u=html.join(_picture(p, identified) for p in used)
                            or Markup("<p>None.</p>"),
                            n=html.join(_picture(p, identified) for p in unused)
                            or Markup("<p>None.</p>")))
        parts.append(await _model_inputs(request, pics, document))
    parts.append(_deliveries(user, deliveries, identified))
    history = detail.get("history") or []
    if history:
        rows = [((h["id"] if identified else ""), h["created_at"] if identified
                 else str(h["created_at"])[:10], h["status"], h["flags"]) for h in history]
        parts.append(render("<h2>Earlier results</h2>$t", t=_table(
            ("Result", "Created", "Status", "Flags"), rows)))
    reviews = await auth.store.reviews(uid)
    rows = [(r.created_at if identified else r.created_at[:10], r.reviewer, r.verdict,
             r.comment if identified else "") for r in reviews]
    parts.append(render("<h2>Reviews</h2>$t", t=_table(
        ("When", "Reviewer", "Verdict", "Comment"), rows) if rows
        else Markup("<p>None yet.</p>")))
    if identified and user.may("reviewer") and document is not None:
        parts.append(render("<h2>Review</h2>$f", f=review_form(user, uid, document["id"])))
    if identified and document is not None:
        parts.append(render('<h2>Result document</h2><pre class="document">$j</pre>',
                            j=json.dumps(document, indent=2, sort_keys=True)))
    return html.join(parts)


@require("reviewer", "view-study")
async def study(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    uid = request.match_info["uid"]
    detail = await auth.store.study_detail(uid)
    if detail is None:
        return page_response(page(user, "No such study", Markup("<p>No such study.</p>")),
                             404)
    body = await study_body(request, user, uid, detail, identified=True)
    await auth.audit(request, Action.VIEW_STUDY, Outcome.SUCCESS, user=user, study_uid=uid)
    saved = request.query.get("saved")
    return page_response(page(user, "Study", body, message=saved or ""))


@require("viewer", "view-study-key")
async def study_by_key(request: web.Request) -> web.StreamResponse:
    """The de-identified study page, for any role (a viewer's link from the worklist)."""
    user = current_user(request)
    assert user is not None  # require
    auth = auth_of(request)
    key = request.match_info["key"]
    uid = None
    if _STUDY_KEY_RE.match(key):
        uid = services_of(request).study_keys.get(key) or await auth.store.find_study(key)
    detail = None
    if uid is not None and auth.store.study_label_hashed(uid) == key:
        detail = await auth.store.study_detail(uid)
    if uid is None or detail is None:
        return page_response(page(user, "No such study", Markup("<p>No such study.</p>")),
                             404)
    body = await study_body(request, user, uid, detail, identified=False)
    return page_response(page(user, "Study " + key, body))


@require("viewer", "view-picture")
async def picture(request: web.Request) -> web.StreamResponse:
    """A thumbnail (image/webp) or a model input (image/png) by its key."""
    key = request.match_info["key"]
    kind = _KINDS.get(request.match_info["kind"])
    pictures = services_of(request).pictures
    if kind is None or pictures is None or not _PICTURE_KEY_RE.match(key):
        raise web.HTTPNotFound()
    path = await asyncio.to_thread(pictures.by_key, key, kind[0])  # type: ignore[arg-type]
    if path is None:
        raise web.HTTPNotFound()
    response = web.FileResponse(path, headers={"Content-Type": kind[1],
                                               "Cache-Control": PICTURE_CACHE})
    return response
