"""Trends of the stored results, and the drift alarm (issue 22's Trends page).

- :func:`periods`: each day or week of a window, from the rows of
  ``Store.trend_rows`` (each study's current result): volume by status, selection yield
  (the share of the processed studies that were scored), failure rate, the headline
  scores' p10/p50/p90 and the latency from the last instance received to the result
  stored (p50/p95). Days are UTC days of the result's ``created_utc``; a week starts on
  its Monday.
- :func:`ks_statistic`: the two-sample Kolmogorov-Smirnov statistic D, the largest
  distance between the two samples' empirical distribution functions (0: the same
  distribution of values; 1: no overlap at all).
- :func:`compute_drift`: D between the headline scores of the latest
  ``ui.drift-window-days`` (7) and those of the ``ui.drift-reference-days`` (90) before
  them. The alarm is raised when D >= ``ui.drift-threshold`` (0.2) and each sample has at
  least ``ui.drift-min-studies`` (30) scored studies; with fewer, no alarm ("too few
  studies"). :class:`DriftMonitor` keeps the latest value for the Prometheus gauges
  ``pxsgate_score_drift_ks`` and ``pxsgate_score_drift_alarm`` (the supervisor refreshes
  it every few minutes: a scrape never reads the store).

Aggregates only: nothing here carries an identifier.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np

from pxsgate.config import UiConfig
from pxsgate.records import Status
from pxsgate.store import Store

By = Literal["day", "week"]
DRIFT_EVERY_S = 300.0  # the gauges' value is at most this old


def utc_text(moment: datetime) -> str:
    """``moment`` in the store's created_utc format (comparable as text)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.astimezone(UTC).microsecond // 1000:03d}Z"


def period_start(day: date, by: By) -> date:
    return day - timedelta(days=day.weekday()) if by == "week" else day


@dataclass(frozen=True)
class Period:
    """One day or week (``start``: the day, or the week's Monday)."""

    start: date
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    score_p10: float | None = None
    score_p50: float | None = None
    score_p90: float | None = None
    latency_p50: float | None = None
    latency_p95: float | None = None

    @property
    def total(self) -> int:
        return self.succeeded + self.failed + self.skipped

    @property
    def selection_yield(self) -> float | None:
        """The share of the processed studies that were scored."""
        return self.succeeded / self.total if self.total else None

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.total if self.total else None


def _percentiles(values: list[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), qs)]


def periods(rows: Sequence[Sequence[Any]], by: By, first: date, last: date) -> list[Period]:
    """Every period from the one of ``first`` to the one of ``last`` (empty ones too), from
    rows of (created_utc, status, score or None, latency seconds or None)."""
    counts: dict[date, dict[str, int]] = {}
    scores: dict[date, list[float]] = {}
    latencies: dict[date, list[float]] = {}
    for created, status, score, latency in rows:
        key = period_start(date.fromisoformat(str(created)[:10]), by)
        bucket = counts.setdefault(key, {})
        bucket[str(status)] = bucket.get(str(status), 0) + 1
        if score is not None and status == Status.SUCCEEDED:
            scores.setdefault(key, []).append(float(score))
        if latency is not None:
            latencies.setdefault(key, []).append(float(latency))
    step = timedelta(days=7 if by == "week" else 1)
    out: list[Period] = []
    key, end = period_start(first, by), period_start(last, by)
    while key <= end:
        c = counts.get(key, {})
        p10, p50, p90 = _percentiles(scores.get(key, []), (10, 50, 90))
        l50, l95 = _percentiles(latencies.get(key, []), (50, 95))
        out.append(Period(key, c.get(Status.SUCCEEDED, 0), c.get(Status.FAILED, 0),
                          c.get(Status.SKIPPED, 0), p10, p50, p90, l50, l95))
        key += step
    return out


def ks_statistic(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: max over x of |F_a(x) - F_b(x)|, the
    empirical distribution functions of the two samples (ties counted on both sides)."""
    x = np.sort(np.asarray(a, dtype=float))
    y = np.sort(np.asarray(b, dtype=float))
    if x.size == 0 or y.size == 0:
        raise ValueError("the KS statistic needs two non-empty samples")
    at = np.concatenate([x, y])
    fx = np.searchsorted(x, at, side="right") / x.size
    fy = np.searchsorted(y, at, side="right") / y.size
    return float(np.max(np.abs(fx - fy)))


@dataclass(frozen=True)
class Drift:
    """The latest window's headline scores against the reference period's."""

    statistic: float | None  # None: a sample is empty
    threshold: float
    min_studies: int
    latest_n: int
    reference_n: int
    latest_from: str  # created_utc bounds: reference [reference_from, latest_from)
    reference_from: str
    until: str

    @property
    def enough(self) -> bool:
        return min(self.latest_n, self.reference_n) >= self.min_studies

    @property
    def alarm(self) -> bool:
        return self.enough and self.statistic is not None and \
            self.statistic >= self.threshold


def drift_of(rows: Sequence[tuple[str, float]], now: datetime, config: UiConfig) -> Drift:
    """The drift of (created_utc, score) rows: those since the latest window began against
    those of the reference period before it."""
    latest_from = utc_text(now - timedelta(days=config.drift_window_days))
    reference_from = utc_text(now - timedelta(
        days=config.drift_window_days + config.drift_reference_days))
    until = utc_text(now)
    latest = [s for t, s in rows if latest_from <= t <= until]
    reference = [s for t, s in rows if reference_from <= t < latest_from]
    statistic = ks_statistic(latest, reference) if latest and reference else None
    return Drift(statistic, config.drift_threshold, config.drift_min_studies, len(latest),
                 len(reference), latest_from, reference_from, until)


async def compute_drift(store: Store, config: UiConfig, now: datetime | None = None) -> Drift:
    """The drift now (or at ``now``), read from the store: one query (in aiosqlite's
    thread), the statistic in another thread: the loop is never held."""
    moment = now or datetime.now(UTC)
    since = utc_text(moment - timedelta(
        days=config.drift_window_days + config.drift_reference_days))
    rows = await store.headline_scores(since)
    return await asyncio.to_thread(drift_of, rows, moment, config)


class DriftMonitor:
    """The latest drift, for the gauges: :meth:`refresh` reads the store and hands the
    value to ``publish``; :meth:`refresh_if_stale` does so at most every ``every_s``."""

    def __init__(self, store: Store, config: UiConfig, publish: Callable[[Drift], None],
                 every_s: float = DRIFT_EVERY_S) -> None:
        self._store = store
        self._config = config
        self._publish = publish
        self._every_s = every_s
        self._at = -math.inf
        self.latest: Drift | None = None

    async def refresh(self) -> Drift:
        drift = await compute_drift(self._store, self._config)
        self.latest, self._at = drift, time.monotonic()
        self._publish(drift)
        return drift

    async def refresh_if_stale(self) -> None:
        if time.monotonic() - self._at >= self._every_s:
            await self.refresh()
