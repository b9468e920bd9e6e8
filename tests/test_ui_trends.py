"""The Trends page and the drift alarm (issue 22): the Kolmogorov-Smirnov statistic against
known values, the hand-written SVG (well-formed XML, text escaped), the per-day and
per-week aggregation, the drift alarm on shifted and unshifted scores, and a real
in-process gateway whose store holds results of chosen days and scores: the page's counts
per day, no identifier for a viewer, and the drift gauges on /metrics."""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pxsgate.config import UiConfig, config_from_mapping
from pxsgate.errors import ConfigError
from pxsgate.results import ModelInfo, ResultDocument, ScoredImage, StudyIdentity, build_document
from pxsgate.store import Store
from pxsgate.trends import compute_drift, drift_of, ks_statistic, periods, utc_text
from pxsgate.ui.trends import Series, bar_chart, line_chart

from .test_ui_auth import login, ui_site

MODEL = ModelInfo("PxsScore", "0.1", "tests", "trends tests", "2026-01-01T00:00:00+00:00",
                  "ab" * 32, anchors_sha256="cd" * 32)
SVG = "{http://www.w3.org/2000/svg}"


# --- the KS statistic ---------------------------------------------------------------------

def brute_ks(a: Sequence[float], b: Sequence[float]) -> float:
    """The definition: the largest |F_a(x) - F_b(x)| over every sample value x."""
    def ecdf(s: Sequence[float], x: float) -> float:
        return sum(v <= x for v in s) / len(s)
    return max(abs(ecdf(a, x) - ecdf(b, x)) for x in [*a, *b])


def test_ks_statistic_known_values() -> None:
    assert ks_statistic([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == 0.0
    assert ks_statistic([1.0, 2.0], [3.0, 4.0, 5.0]) == 1.0
    assert ks_statistic([5.0], [1.0, 2.0]) == 1.0
    # By hand: at x=3 F_a = 3/3 and F_b = 2/4.
    assert ks_statistic([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(0.5)
    # Ties count on both sides: at x=1 F_a = 2/3, F_b = 1/3.
    assert ks_statistic([1, 1, 2], [1, 2, 2]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = list(rng.integers(0, 6, size=int(rng.integers(1, 12))).astype(float))
        b = list(rng.integers(0, 6, size=int(rng.integers(1, 12))).astype(float))
        assert ks_statistic(a, b) == pytest.approx(brute_ks(a, b))
    with pytest.raises(ValueError, match="non-empty"):
        ks_statistic([], [1.0])


# --- the SVG ------------------------------------------------------------------------------

def test_the_svg_is_well_formed_and_its_text_escaped() -> None:
    labels = ["2026-03-01", "<b>&'\"", "2026-03-03"]
    bars = bar_chart("Volume <script>", labels, [
        Series("ok & fine", [3, 0, 2], "#2da44e"), Series("<FAILED>", [1, None, 0], "#cf222e")])
    root = ET.fromstring(bars)
    assert root.tag == f"{SVG}svg"
    assert root.find(f"{SVG}title").text == "Volume <script>"  # type: ignore[union-attr]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "<b>&'\"" in texts
    assert "ok & fine" in texts
    assert "<FAILED>" in texts
    assert "<script>" not in bars
    assert "<b>" not in bars
    # Three segments drawn: 3 and 1 on the first day, 2 on the third; the axis goes to 5.
    assert len([r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]) == 3
    assert "5" in texts

    lines = line_chart("p50", labels, [Series("p50", [0.5, None, 0.7], "#0550ae"),
                                       Series("p90", [0.1, 0.2, 0.3], "#8250df")], unit=" s")
    root = ET.fromstring(lines)
    # A gap breaks the p50 line: no polyline of it, its dots only; p90 is one line.
    assert len(list(root.iter(f"{SVG}polyline"))) == 1
    assert len(list(root.iter(f"{SVG}circle"))) == 5
    ET.fromstring(line_chart("empty", [], []))
    ET.fromstring(bar_chart("empty", [], []))


# --- aggregation --------------------------------------------------------------------------

def test_periods_per_day_and_week() -> None:
    rows = [("2026-03-02T08:00:00.000Z", "SUCCEEDED", 1.0, 10.0),
            ("2026-03-02T09:00:00.000Z", "SUCCEEDED", 3.0, 20.0),
            ("2026-03-02T10:00:00.000Z", "FAILED", None, 30.0),
            ("2026-03-04T10:00:00.000Z", "SKIPPED", None, None),
            ("2026-03-09T10:00:00.000Z", "SUCCEEDED", 2.0, None)]
    days = periods(rows, "day", date(2026, 3, 1), date(2026, 3, 9))
    assert [p.start.day for p in days] == list(range(1, 10))
    monday = days[1]
    assert (monday.succeeded, monday.failed, monday.skipped, monday.total) == (2, 1, 0, 3)
    assert monday.selection_yield == pytest.approx(2 / 3)
    assert monday.failure_rate == pytest.approx(1 / 3)
    assert monday.score_p50 == pytest.approx(2.0)
    assert monday.score_p10 == pytest.approx(1.2)
    assert monday.latency_p50 == pytest.approx(20.0)
    assert days[0].total == 0
    assert days[0].selection_yield is None
    assert days[0].score_p50 is None
    weeks = periods(rows, "week", date(2026, 3, 1), date(2026, 3, 9))
    # 2026-03-01 is a Sunday: its week began on 23 February.
    assert [(w.start, w.total) for w in weeks] == [
        (date(2026, 2, 23), 0), (date(2026, 3, 2), 4), (date(2026, 3, 9), 1)]


def test_drift_settings_are_validated() -> None:
    ui = config_from_mapping({"ui": {"drift-threshold": 0.3, "drift-window-days": 14}}).ui
    assert (ui.drift_threshold, ui.drift_window_days, ui.drift_reference_days,
            ui.drift_min_studies) == (0.3, 14, 90, 30)
    for bad, path in (({"drift-threshold": 0}, "ui.drift-threshold"),
                      ({"drift-threshold": 1.5}, "ui.drift-threshold"),
                      ({"drift-min-studies": 0}, "ui.drift-min-studies")):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"ui": bad})
        assert caught.value.path == path


# --- results of chosen days and scores ----------------------------------------------------

NOW = datetime.now(UTC)


def document(days_ago: float, status: str = "SUCCEEDED", score: float = 1.0,
             n: int = 0) -> ResultDocument:
    """A result stored ``days_ago``, its last instance received 5 s (and n ms) before."""
    uid = f"1.2.826.0.1.3680043.10.543.{uuid.uuid4().int % 10**12}"
    stored = NOW - timedelta(days=days_ago)
    received = stored - timedelta(seconds=5, milliseconds=n)
    ok = status == "SUCCEEDED"
    return build_document(
        status=status, identity=StudyIdentity(uid, f"MRN-TRENDS-{n}", f"ACC-TRENDS-{n}"),
        site_id="TEST", model=MODEL, created_at=stored.isoformat(timespec="milliseconds"),
        updated_at=stored.isoformat(timespec="milliseconds"),
        scores=[ScoredImage(f"{uid}.1.1", f"{uid}.1", score)] if ok else [],
        exit_code=2 if status == "FAILED" else 0,
        error_message="inference failed" if status == "FAILED" else "",
        stages={"received": received.isoformat(timespec="milliseconds"),
                "ready": received.isoformat(timespec="milliseconds"),
                "stored": stored.isoformat(timespec="milliseconds")})


def scores(seed: int, n: int, shift: float = 0.0) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).normal(5.0 + shift, 1.0, n)]


async def fill(store: Store, latest_shift: float, latest_n: int = 40,
               reference_n: int = 60) -> list[ResultDocument]:
    """``reference_n`` scored results 8 to 90 days ago, ``latest_n`` in the last 6 days,
    their scores from N(5, 1), the latest shifted by ``latest_shift``."""
    docs = [document(8 + 80 * i / reference_n, score=s, n=i)
            for i, s in enumerate(scores(1, reference_n))]
    docs += [document(0.1 + 6 * i / latest_n, score=s, n=1000 + i)
             for i, s in enumerate(scores(2, latest_n, latest_shift))]
    for d in docs:
        await store.store_result(d, "stored")
    return docs


@pytest.mark.parametrize(("shift", "alarm"), [(0.0, False), (1.5, True)])
async def test_drift_alarm_on_shifted_scores(tmp_path: Path, shift: float, alarm: bool) -> None:
    store = Store(tmp_path / "pxsgate.sqlite3")
    await store.open()
    try:
        await fill(store, shift)
        drift = await compute_drift(store, UiConfig())
    finally:
        await store.close()
    assert (drift.latest_n, drift.reference_n) == (40, 60)
    assert drift.statistic is not None
    assert drift.alarm is alarm
    assert (drift.statistic >= 0.2) is alarm
    # Too few studies in a window: never an alarm, however far apart.
    rows = [(utc_text(NOW - timedelta(days=1)), 10.0)] * 29 + \
        [(utc_text(NOW - timedelta(days=30)), 0.0)] * 100
    few = drift_of(rows, NOW, UiConfig())
    assert few.statistic == 1.0
    assert not few.enough
    assert not few.alarm


# --- the page and the gauges, on a real gateway -------------------------------------------

def gauges(text: str) -> dict[str, float]:
    """The drift gauges' samples, by name (and window)."""
    return {s.name + "".join(f"/{v}" for v in s.labels.values()): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("pxsgate_score_drift")}


async def test_trends_page_and_drift_gauges(tmp_path: Path) -> None:
    async with ui_site(tmp_path) as site:
        store = site.gw.store
        docs = await fill(store, latest_shift=2.0)
        today = [document(0.001, "FAILED", n=2001), document(0.002, "SKIPPED", n=2002)]
        for d in today:
            await store.store_result(d, "stored" if d.status == "SKIPPED" else "failed")
        docs += today
        await site.gw.drift.refresh()

        async with site.client() as client:
            async with client.get("/ui/trends", allow_redirects=False) as r:
                assert r.status == 303  # to the login
            assert (await login(client, "vera")).status == 303
            async with client.get("/ui/trends") as r:
                assert r.status == 200
                page = await r.text()
            for bad in ("?by=month", "?days=0", "?days=x", "?days=9999"):
                async with client.get("/ui/trends" + bad) as r:
                    assert r.status == 400, bad
            async with client.get("/ui/trends?by=week&days=120") as r:
                assert r.status == 200
                weekly = await r.text()
            async with client.get("/metrics") as r:
                metrics = await r.text()

        # Per day: today's row counts what was stored today (UTC).
        day = NOW.date().isoformat()
        expected = {NOW.date(): [0, 0, 0]}
        for d in docs:
            created = datetime.fromisoformat(d.created_at).astimezone(UTC).date()
            if (NOW.date() - created).days < 90:
                counts = expected.setdefault(created, [0, 0, 0])
                counts[["SUCCEEDED", "FAILED", "SKIPPED"].index(d.status)] += 1
        for when, (ok, failed, skipped) in expected.items():
            row = re.search(rf"<tr><td>{when.isoformat()}</td><td class=\"num\">(\d+)</td>"
                            r"<td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>", page)
            assert row, when
            assert [int(g) for g in row.groups()] == [ok, failed, skipped], when
        assert f"<td>{day}</td>" in page
        assert page.count("<svg") == 4
        assert '<a href="/ui/trends">Trends</a>' in page
        assert "Drift alarm: ALARM" in page
        assert "Alarm: yes" in page
        assert "Week of" in weekly
        assert "Drift alarm: ALARM" in weekly
        # A viewer sees aggregates only.
        for d in docs:
            for identifier in (d.patient_id, d.accession_number, d.study_instance_uid):
                assert identifier not in page
                assert identifier not in weekly
        assert "MRN-TRENDS" not in page
        assert "ACC-TRENDS" not in page

        values = gauges(metrics)
        assert values["pxsgate_score_drift_alarm"] == 1.0
        assert values["pxsgate_score_drift_ks"] >= 0.2
        assert values["pxsgate_score_drift_studies/latest"] == 40.0
        assert values["pxsgate_score_drift_studies/reference"] == 60.0
