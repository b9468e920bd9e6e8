"""The Trends page (viewer and up): per day or week, volume by status, selection yield,
failure rate, the headline scores' p10/p50/p90 and the latency from the last instance
received to the result stored (p50/p95), each plotted as inline SVG drawn here and listed
in a table; and the drift alarm (pxsgate.trends). Aggregates only: no identifiers, so
nothing to audit.

``GET /ui/trends?by=day|week&days=N`` (day and 90 by default; N from 1 to MAX_DAYS). The
plots are small hand-written SVG (axes, bars, lines; every text escaped), coloured with
presentation attributes: the Content-Security-Policy allows no inline style or script.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from pxsgate.config import UiConfig
from pxsgate.records import Status
from pxsgate.trends import By, Drift, Period, drift_of, periods, utc_text
from pxsgate.ui import html
from pxsgate.ui.auth import auth_of, current_user, page_response, require
from pxsgate.ui.html import Markup, render
from pxsgate.ui.pages import page

DEFAULT_DAYS = 90
MAX_DAYS = 730

# --- SVG ----------------------------------------------------------------------------------

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 130, 16, 36  # margins: the y axis, the legend, the x labels
MAX_X_LABELS = 10


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per label; None: no value (a gap)
    colour: str


def _num(value: float) -> str:
    return f"{value:.1f}"


def _nice_max(value: float) -> float:
    """The y axis's top: 1, 2, 2.5 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    while power > value:
        power /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _tick(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2e}"


def _frame(title: str, labels: Sequence[str], y_max: float, series: Sequence[Series],
           unit: str) -> tuple[list[Markup], float, float]:
    """The SVG's axes, ticks, x labels and legend; the plot's width and slot width."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(labels), 1)
    parts = [render('<title>$t</title>', t=title),
             render('<line x1="$x" y1="$t" x2="$x" y2="$b" stroke="#57606a"/>',
                    x=LEFT, t=TOP, b=TOP + plot_h),
             render('<line x1="$l" y1="$b" x2="$r" y2="$b" stroke="#57606a"/>',
                    l=LEFT, r=LEFT + plot_w, b=TOP + plot_h)]
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        parts.append(render(
            '<line x1="$l" y1="$y" x2="$r" y2="$y" stroke="#d0d7de"/>'
            '<text x="$tx" y="$ty" font-size="11" text-anchor="end">$v</text>',
            l=LEFT, r=LEFT + plot_w, y=_num(y), tx=LEFT - 4, ty=_num(y + 4),
            v=_tick(y_max * fraction) + (unit if fraction == 1.0 else "")))
    every = max(1, -(-len(labels) // MAX_X_LABELS))
    for i, label in enumerate(labels):
        if i % every == 0:
            parts.append(render(
                '<text x="$x" y="$y" font-size="10" text-anchor="middle">$l</text>',
                x=_num(LEFT + slot * (i + 0.5)), y=TOP + plot_h + 14, l=label))
    for i, s in enumerate(series):
        y = TOP + 8 + 16 * i
        parts.append(render(
            '<rect x="$x" y="$ry" width="10" height="10" fill="$c"/>'
            '<text x="$tx" y="$ty" font-size="11">$n</text>',
            x=WIDTH - RIGHT + 12, ry=y - 9, c=s.colour, tx=WIDTH - RIGHT + 26, ty=y,
            n=s.name))
    return parts, plot_h, slot


def _svg(title: str, parts: list[Markup]) -> Markup:
    return render('<svg xmlns="http://www.w3.org/2000/svg" width="$w" height="$h" '
                  'viewBox="0 0 $w $h" role="img" aria-label="$t" font-family="sans-serif">'
                  '$body</svg>', w=WIDTH, h=HEIGHT, t=title, body=html.join(parts))


def bar_chart(title: str, labels: Sequence[str], series: Sequence[Series],
              unit: str = "") -> Markup:
    """Stacked bars: one per label, a segment per series (missing values count 0)."""
    totals = [sum(v or 0.0 for v in values) for values in zip(*(s.values for s in series),
                                                                 strict=True)] \
        if series else []
    y_max = _nice_max(max(totals, default=0.0))
    parts, plot_h, slot = _frame(title, labels, y_max, series, unit)
    base = TOP + plot_h
    for i in range(len(labels)):
        y = base
        for s in series:
            value = s.values[i] or 0.0
            if value <= 0:
                continue
            h = plot_h * value / y_max
            y -= h
            parts.append(render(
                '<rect x="$x" y="$y" width="$w" height="$h" fill="$c">'
                '<title>$l $n: $v</title></rect>',
                x=_num(LEFT + slot * (i + 0.1)), y=_num(y), w=_num(slot * 0.8), h=_num(h),
                c=s.colour, l=labels[i], n=s.name, v=f"{value:g}"))
    return _svg(title, parts)


def line_chart(title: str, labels: Sequence[str], series: Sequence[Series],
               unit: str = "", y_max: float | None = None) -> Markup:
    """A line per series, broken where a value is missing; a dot at each value."""
    top = y_max if y_max is not None else _nice_max(max(
        (v for s in series for v in s.values if v is not None), default=0.0))
    parts, plot_h, slot = _frame(title, labels, top, series, unit)

    def point(i: int, v: float) -> tuple[str, str]:
        return _num(LEFT + slot * (i + 0.5)), _num(TOP + plot_h * (1 - min(v, top) / top))

    for s in series:
        run: list[tuple[str, str]] = []
        runs: list[list[tuple[str, str]]] = [run]
        for i, v in enumerate(s.values):
            if v is None:
                run = []
                runs.append(run)
                continue
            run.append(point(i, v))
            x, y = point(i, v)
            parts.append(render(
                '<circle cx="$x" cy="$y" r="2" fill="$c"><title>$l $n: $v</title></circle>',
                x=x, y=y, c=s.colour, l=labels[i], n=s.name, v=f"{v:.3g}"))
        for r in runs:
            if len(r) > 1:
                parts.append(render(
                    '<polyline points="$p" fill="none" stroke="$c" stroke-width="1.5"/>',
                    p=" ".join(f"{x},{y}" for x, y in r), c=s.colour))
    return _svg(title, parts)


# --- the page -----------------------------------------------------------------------------

SUCCEEDED, FAILED, SKIPPED = "#2da44e", "#cf222e", "#8c959f"
P10, P50, P90 = "#54aeff", "#0550ae", "#8250df"

_FORM = (
    '<form class="trends" method="get" action="/ui/trends">'
    '<label>Per <select name="by">$options</select></label> '
    '<label>Days <input type="number" name="days" min="1" max="$max" value="$days">'
    '</label> <button type="submit">Show</button></form>')
_HEAD = Markup(
    "<tr><th>$period</th><th>Succeeded</th><th>Failed</th><th>Skipped</th><th>Total</th>"
    "<th>Selection yield</th><th>Failure rate</th><th>Score p10</th><th>Score p50</th>"
    "<th>Score p90</th><th>Latency p50 (s)</th><th>Latency p95 (s)</th></tr>")
_ROW = (
    '<tr><td>$start</td><td class="num">$ok</td><td class="num">$failed</td>'
    '<td class="num">$skipped</td><td class="num">$total</td><td class="num">$yield_</td>'
    '<td class="num">$rate</td><td class="num">$p10</td><td class="num">$p50</td>'
    '<td class="num">$p90</td><td class="num">$l50</td><td class="num">$l95</td></tr>')
_DRIFT = (
    '<section class="drift"><h2>Drift alarm: $verdict</h2><p>$text</p></section>')


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def drift_section(drift: Drift, window_days: int, reference_days: int) -> Markup:
    verdict = ("too few studies" if not drift.enough
               else "ALARM" if drift.alarm else "no alarm")
    statistic = "not computed (a window has no scored study)" if drift.statistic is None \
        else f"{drift.statistic:.3f}"
    text = (f"Two-sample Kolmogorov-Smirnov statistic D of the headline scores of the latest "
            f"{window_days} days (n = {drift.latest_n}, since {drift.latest_from}) against "
            f"the {reference_days} days before them (n = {drift.reference_n}, since "
            f"{drift.reference_from}): D = {statistic}; threshold {drift.threshold:g}; an "
            f"alarm needs at least {drift.min_studies} scored studies in each. "
            f"Alarm: {'yes' if drift.alarm else 'no'}.")
    return render(_DRIFT, verdict=verdict, text=text)


def trends_body(rows: list[Period], by: By, days: int, drift: Drift, window_days: int,
                reference_days: int) -> Markup:
    labels = [p.start.isoformat() for p in rows]
    per = "week of" if by == "week" else "day"
    volume = bar_chart(f"Results per {by} by status", labels, [
        Series("SUCCEEDED", [p.succeeded for p in rows], SUCCEEDED),
        Series("FAILED", [p.failed for p in rows], FAILED),
        Series("SKIPPED", [p.skipped for p in rows], SKIPPED)])
    rates = line_chart(f"Selection yield and failure rate per {by}", labels, [
        Series("yield", [p.selection_yield for p in rows], SUCCEEDED),
        Series("failure rate", [p.failure_rate for p in rows], FAILED)], y_max=1.0)
    scores = line_chart(f"Headline PXS score per {by}", labels, [
        Series("p90", [p.score_p90 for p in rows], P90),
        Series("p50", [p.score_p50 for p in rows], P50),
        Series("p10", [p.score_p10 for p in rows], P10)])
    latency = line_chart(f"Last image received to result stored per {by}", labels, [
        Series("p95", [p.latency_p95 for p in rows], P90),
        Series("p50", [p.latency_p50 for p in rows], P50)], unit=" s")
    options = html.join(render('<option value="$v"$sel>$v</option>', v=v,
                               sel=Markup(" selected" if v == by else ""))
                        for v in ("day", "week"))
    table = render("<table>$head$rows</table>",
                   head=render(_HEAD, period="Week of" if by == "week" else "Day"),
                   rows=html.join(render(
                       _ROW, start=p.start.isoformat(), ok=p.succeeded, failed=p.failed,
                       skipped=p.skipped, total=p.total, yield_=_pct(p.selection_yield),
                       rate=_pct(p.failure_rate), p10=_fmt(p.score_p10),
                       p50=_fmt(p.score_p50), p90=_fmt(p.score_p90),
                       l50=_fmt(p.latency_p50, ".1f"), l95=_fmt(p.latency_p95, ".1f"))
                       for p in reversed(rows)))
    figures = html.join(
        render("<figure>$svg<figcaption>$title</figcaption></figure>", svg=svg, title=title)
        for title, svg in ((f"Results per {by} by status", volume),
                           (f"Selection yield and failure rate per {by}", rates),
                           (f"Headline PXS score per {by}: p10, p50, p90", scores),
                           (f"Last image received to result stored per {by}: p50, p95",
                            latency)))
    note = render("<p>Each study's current result, by the UTC $per it was stored; the latest "
                  "$days days.</p>", per=per.split()[0], days=days)
    return html.join([render(_FORM, options=options, max=MAX_DAYS, days=days),
                      drift_section(drift, window_days, reference_days), note, figures,
                      table])


def parse_query(request: web.Request) -> tuple[By, int] | str:
    """(by, days), or why not."""
    by = request.query.get("by", "day")
    if by not in ("day", "week"):
        return "by: day or week"
    raw = request.query.get("days", str(DEFAULT_DAYS))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        return f"days: a whole number from 1 to {MAX_DAYS}"
    return ("week" if by == "week" else "day"), int(raw)


def _aggregate(rows: list[tuple[Any, ...]], by: By, first: date, now: datetime, since: str,
               config: UiConfig) -> tuple[list[Period], Drift]:
    drift = drift_of([(str(t), float(score)) for t, status, score, _ in rows
                      if status == Status.SUCCEEDED and score is not None], now, config)
    return periods([r for r in rows if str(r[0]) >= since], by, first, now.date()), drift


@require("viewer", "view-trends")
async def trends(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    assert user is not None  # require
    parsed = parse_query(request)
    if isinstance(parsed, str):
        return page_response(page(user, "Trends", render('<p class="error">$p</p>',
                                                         p=parsed)), 400)
    by, days = parsed
    auth = auth_of(request)
    now = datetime.now(UTC)
    first: date = (now - timedelta(days=days - 1)).date()
    since = utc_text(datetime(first.year, first.month, first.day, tzinfo=UTC))
    # One read for both: the window shown and the drift alarm's two periods.
    config = auth.config
    rows = await auth.store.trend_rows(min(since, utc_text(now - timedelta(
        days=config.drift_window_days + config.drift_reference_days))))
    # Off the loop: some 0.15 s of Python at 100,000 results.
    shown, drift = await asyncio.to_thread(_aggregate, rows, by, first, now, since, config)
    body = trends_body(shown, by, days, drift, config.drift_window_days,
                       config.drift_reference_days)
    return page_response(page(user, "Trends", body))
