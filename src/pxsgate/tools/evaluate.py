"""`pxsgate evaluate`: validate the stored PXS scores against clinical outcomes.

The paper validated the score by hand (ROC AUC 0.81, bootstrap 95 % CI 0.70-0.92, for ICU
admission, intubation or death within 3 days of the radiograph). This module does the same
from the store: each study's current SUCCEEDED result (its headline score, as
``radiologist_view.pxs_score``) joined with a CSV of outcomes, then the ROC AUC with a
percentile-bootstrap CI, the ROC curve, and sensitivity/specificity at chosen thresholds
and at the Youden-J optimum; written to ``evaluation.json`` and ``roc.png``.

Pure functions, in data-flow order: :func:`read_outcomes` (CSV), :func:`read_scored_studies`
(the store, never written), :func:`join` (labels), :func:`roc_auc`, :func:`bootstrap_auc`,
:func:`confusion`, :func:`youden`, :func:`plot_roc`; :func:`evaluate` ties them together.

PHI: accession numbers and study UIDs are used only to join; nothing written or printed
names them. CSV rows are named by their row number (the header is row 1, as in a
spreadsheet), and bad CSV values are never echoed.

scikit-learn and matplotlib are the optional extra ``pxsgate[evaluate]``: they are imported
inside the functions that need them, and :func:`require_extras` says how to install them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pxsgate import __version__
from pxsgate.errors import PxsgateError
from pxsgate.records import now_iso
from pxsgate.store import queries

INSTALL_HINT = "pip install 'pxsgate[evaluate]'"

# CSV header names (case-insensitive) -> the column they give.
_COLUMNS = {
    "accession_number": "accession", "accession": "accession",
    "study_instance_uid": "study_uid", "study_uid": "study_uid",
    "outcome": "outcome",
    "time": "time",
}
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


class EvaluationInputError(PxsgateError):
    """Input that cannot be evaluated: a missing or malformed CSV, bad options, too few
    matched studies, or the optional extra not installed (exit 2)."""


def require_extras() -> None:
    """Raise :class:`EvaluationInputError` unless scikit-learn and matplotlib are installed
    (found, not imported: a bad CSV is then reported in a fraction of a second)."""
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            raise EvaluationInputError(f"{package} is not installed: {INSTALL_HINT}")


def _import_extras() -> None:
    """Import what the statistics and the plot use, before any output is written."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
        import sklearn.metrics  # noqa: F401
    except ImportError as exc:
        raise EvaluationInputError(
            f"scikit-learn and matplotlib are needed ({exc.name or exc} cannot be "
            f"imported): {INSTALL_HINT}") from exc


# --- inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class When:
    """A point in time as local wall-clock time (study times carry no offset); a date alone
    (``date_only``) compares by calendar day."""

    moment: datetime  # naive, local
    date_only: bool


def parse_when(text: str) -> When:
    """An ISO 8601 date or date-time. One with an offset is converted to this machine's
    local time (the gateway runs at the site, whose StudyDate/StudyTime are local)."""
    text = text.strip()
    try:
        return When(datetime.combine(date.fromisoformat(text), datetime.min.time()), True)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)  # ValueError: the caller names the row
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    return When(moment, False)


@dataclass(frozen=True)
class OutcomeRow:
    row: int  # spreadsheet row number: the header is row 1
    accession: str  # "" when the row has none
    study_uid: str
    outcome: bool
    time: When | None


@dataclass(frozen=True)
class Outcomes:
    name: str  # the file's name, without its folder
    sha256: str
    rows: list[OutcomeRow]
    has_time: bool  # the CSV has a time column


def read_outcomes(path: Path) -> Outcomes:
    """Parse the outcomes CSV; :class:`EvaluationInputError` names the row of a bad value."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise EvaluationInputError(f"no outcomes file {path}") from exc
    except OSError as exc:
        raise EvaluationInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvaluationInputError(f"{path.name} is not UTF-8 text") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise EvaluationInputError(f"{path.name} is empty: it needs a header row")
        index = _header_index(header, path.name)
        rows = [r for r in (_outcome_row(number, cells, index)
                            for number, cells in enumerate(reader, start=2)) if r is not None]
    except csv.Error as exc:
        raise EvaluationInputError(
            f"{path.name} row {reader.line_num}: not valid CSV ({exc})") from exc
    return Outcomes(path.name, hashlib.sha256(data).hexdigest(), rows, "time" in index)


def _header_index(header: Sequence[str], name: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, cell in enumerate(header):
        column = _COLUMNS.get(cell.strip().lower())
        if column is None:
            continue  # other columns (patient names, notes) are ignored
        if column in index:
            raise EvaluationInputError(
                f"{name}: columns {index[column] + 1} and {position + 1} both give the "
                f"{column.replace('_', ' ')}")
        index[column] = position
    # A spreadsheet saved with semicolons or tabs reads as one column.
    hint = (" (the file must be comma-separated)"
            if len(header) == 1 and any(d in header[0] for d in ";\t|") else "")
    if "outcome" not in index:
        raise EvaluationInputError(f"{name} has no 'outcome' column{hint}")
    if "accession" not in index and "study_uid" not in index:
        raise EvaluationInputError(
            f"{name} has no key column: it needs 'accession_number' (or 'accession') or "
            f"'study_instance_uid' (or 'study_uid'){hint}")
    return index


def _outcome_row(number: int, cells: Sequence[str], index: dict[str, int]
                 ) -> OutcomeRow | None:
    def cell(column: str) -> str:
        at = index.get(column)
        return cells[at].strip() if at is not None and at < len(cells) else ""

    if not any(c.strip() for c in cells):
        return None  # a blank line
    accession, study_uid = cell("accession"), cell("study_uid")
    if not accession and not study_uid:
        raise EvaluationInputError(
            f"row {number} has neither an accession number nor a study instance UID")
    value = cell("outcome").lower()
    if value in _TRUE:
        outcome = True
    elif value in _FALSE:
        outcome = False
    else:  # the value itself is not echoed: a shifted column could put PHI there
        raise EvaluationInputError(
            f"row {number}: outcome must be 1/0, true/false or yes/no"
            + (" (it is empty)" if not value else ""))
    when = None
    if text := cell("time"):
        try:
            when = parse_when(text)
        except ValueError as exc:
            raise EvaluationInputError(
                f"row {number}: time is not an ISO 8601 date or date-time "
                "(e.g. 2026-03-14 or 2026-03-14T08:30)") from exc
    return OutcomeRow(number, accession, study_uid, outcome, when)


@dataclass(frozen=True)
class ScoredStudy:
    """A study's current SUCCEEDED result, as the evaluation needs it."""

    study_uid: str
    accession: str
    score: float  # the headline PXS score
    study_time: When | None  # pxsgate.studyDateTime
    model_id: str
    weights_sha256: str
    anchors_sha256: str


def read_scored_studies(db: Path | queries.QueriesMixin, exclude_rejected: bool = False
                        ) -> list[ScoredStudy]:
    """Each study's current SUCCEEDED result, read from the store's file without writing
    (pxsgate.store.queries.read_scored_studies); ``exclude_rejected``: without the studies
    whose latest review rejects them (wrong-image-used, wrong-patient, not-a-valid-exam)."""
    rows = queries.read_scored_studies(db, exclude_rejected)
    studies = []
    for uid, accession, score, when, model_id, weights, anchors in rows:
        try:
            study_time = parse_when(when) if when else None
        except ValueError:
            study_time = None
        studies.append(ScoredStudy(str(uid), str(accession), float(score), study_time,
                                   str(model_id), str(weights), str(anchors)))
    return studies


# --- the join -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Joined:
    """The evaluated studies (one score and one label each) and how the rows were used."""

    studies: list[ScoredStudy]
    labels: list[bool]
    matched_rows: int
    extra_rows: int  # matched a study an earlier row had already matched
    unmatched_rows: list[int]  # row numbers: no such study, or an ambiguous accession
    ambiguous_rows: list[int]  # (of those) an accession number of several studies
    positive_rows_without_time: int  # outcome 1, no time: positive (window not applied)
    positive_rows_without_study_time: int  # outcome 1, the study has no StudyDate
    studies_without_outcome: int  # scored studies no row names


def within_window(study: When, event: When, days: float) -> bool:
    """Whether the event is in [study time, study time + days]. When either is a date
    alone, by calendar day: the event's date between the study's and the window end's."""
    end = study.moment + timedelta(days=days)
    if study.date_only or event.date_only:
        return study.moment.date() <= event.moment.date() <= end.date()
    return study.moment <= event.moment <= end


def join(outcomes: Outcomes, scored: Sequence[ScoredStudy],
         window_days: float | None = None) -> Joined:
    """Match each CSV row to a study: by study instance UID when the row has one, else by
    accession number (an accession number shared by several scored studies matches
    none). A row is positive iff its outcome is 1 and, with ``window_days``, its time is in
    [study time, study time + window_days]; a positive row without a time (or whose study
    has no date) stays positive. A study several rows name is positive if any of them is."""
    by_uid = {s.study_uid: s for s in scored}
    by_accession: dict[str, list[ScoredStudy]] = {}
    for s in scored:
        if s.accession:
            by_accession.setdefault(s.accession, []).append(s)
    labels: dict[str, bool] = {}
    unmatched: list[int] = []
    ambiguous: list[int] = []
    extra = no_time = no_study_time = 0
    for row in outcomes.rows:
        if row.study_uid:
            study = by_uid.get(row.study_uid)
        else:
            candidates = by_accession.get(row.accession, [])
            study = candidates[0] if len(candidates) == 1 else None
            if len(candidates) > 1:
                ambiguous.append(row.row)
        if study is None:
            unmatched.append(row.row)
            continue
        positive = row.outcome
        if positive and window_days is not None:
            if row.time is None:
                no_time += 1
            elif study.study_time is None:
                no_study_time += 1
            else:
                positive = within_window(study.study_time, row.time, window_days)
        if study.study_uid in labels:
            extra += 1
        labels[study.study_uid] = labels.get(study.study_uid, False) or positive
    used = [by_uid[uid] for uid in labels]
    return Joined(used, [labels[s.study_uid] for s in used],
                  matched_rows=len(outcomes.rows) - len(unmatched), extra_rows=extra,
                  unmatched_rows=unmatched, ambiguous_rows=ambiguous,
                  positive_rows_without_time=no_time,
                  positive_rows_without_study_time=no_study_time,
                  studies_without_outcome=len(scored) - len(used))


# --- statistics -----------------------------------------------------------------------------

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)))


@dataclass(frozen=True)
class Bootstrap:
    rounds: int
    skipped: int  # resamples with a single class, which have no AUC
    seed: int
    lower: float | None  # None when every resample was skipped
    upper: float | None


def weighted_auc(counts: IntArray, labels: npt.NDArray[np.bool_], groups: IntArray
                 ) -> tuple[FloatArray, IntArray, IntArray]:
    """The AUC of resamples given as multiplicities: ``counts[r, i]`` is how often study
    ``i`` is in resample ``r``, the studies sorted by score with ``groups`` the starts of
    their runs of equal scores. Returns (AUC, positives, negatives) per resample (the AUC
    is nan without both classes). The Mann-Whitney count, as roc_auc_score computes it:
    the share of (positive, negative) pairs the positive scores above, ties counting 1/2."""
    pos = np.add.reduceat(np.where(labels, counts, 0), groups, axis=1)
    neg = np.add.reduceat(np.where(labels, 0, counts), groups, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives with a lower score than the group
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)
    return auc.astype(np.float64), n_pos.astype(np.int64), n_neg.astype(np.int64)


def bootstrap_auc(labels: Sequence[bool], scores: Sequence[float], rounds: int = 2000,
                  seed: int = 0) -> Bootstrap:
    """Percentile 95 % CI (2.5th and 97.5th percentiles) of the AUC over ``rounds``
    resamples of the studies with replacement (numpy's Generator seeded with ``seed``).
    Drawing each resample as multinomial counts of the n studies is the same as drawing n
    studies with replacement, and lets the AUCs be computed for many rounds at once;
    resamples with a single class are skipped and counted."""
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    sorted_labels = np.asarray(labels, dtype=bool)[order]
    n = len(sorted_scores)
    groups = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(n, 1))  # bounded memory: rounds x n counts per chunk
    aucs: list[FloatArray] = []
    done = 0
    while done < rounds:
        size = min(chunk, rounds - done)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.int64)
        aucs.append(weighted_auc(counts, sorted_labels, groups.astype(np.int64))[0])
        done += size
    values = np.concatenate(aucs) if aucs else np.empty(0)
    kept = values[~np.isnan(values)]
    skipped = rounds - len(kept)
    if len(kept) == 0:
        return Bootstrap(rounds, skipped, seed, None, None)
    lower, upper = np.percentile(kept, [2.5, 97.5])
    return Bootstrap(rounds, skipped, seed, float(lower), float(upper))


@dataclass(frozen=True)
class RocPoint:
    fpr: float
    tpr: float
    threshold: float | None  # None: the (0, 0) corner, above every score


def roc_points(labels: Sequence[bool], scores: Sequence[float]) -> list[RocPoint]:
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(np.asarray(labels, dtype=int),
                                     np.asarray(scores, dtype=float), drop_intermediate=False)
    return [RocPoint(float(f), float(t), float(th) if math.isfinite(th) else None)
            for f, t, th in zip(fpr, tpr, thresholds, strict=True)]


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def confusion(labels: Sequence[bool], scores: Sequence[float], threshold: float
              ) -> dict[str, Any]:
    """The 2x2 table at ``score >= threshold`` (= positive), with sensitivity,
    specificity, PPV and NPV (None where the denominator is 0)."""
    y = np.asarray(labels, dtype=bool)
    called = np.asarray(scores, dtype=float) >= threshold
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    fn, tn = int((~called & y).sum()), int((~called & ~y).sum())
    return {"threshold": threshold, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}


def youden(points: Sequence[RocPoint]) -> tuple[float, float]:
    """The threshold that maximises J = sensitivity + specificity - 1 (the highest such
    threshold on a tie; J rounded to 12 decimals, so that 1 - 1/3 ties with 2/3), and J."""
    best = max((p for p in points if p.threshold is not None),
               key=lambda p: (round(p.tpr - p.fpr, 12), p.threshold))
    assert best.threshold is not None
    return best.threshold, best.tpr - best.fpr


def parse_thresholds(text: str | None) -> list[float]:
    """``--thresholds 4,6.5`` -> [4.0, 6.5]."""
    if not text:
        return []
    values = []
    for item in text.split(","):
        try:
            value = float(item.strip())
        except ValueError as exc:
            raise EvaluationInputError(
                f"--thresholds: {item.strip()!r} is not a number (e.g. --thresholds 4,6)"
            ) from exc
        if not math.isfinite(value):
            raise EvaluationInputError(f"--thresholds: {item.strip()!r} is not finite")
        values.append(value)
    return values


# --- the picture ----------------------------------------------------------------------------

def plot_roc(path: Path, points: Sequence[RocPoint], auc: float, ci: Bootstrap, n: int,
             positives: int, marked: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """The ROC curve with the diagonal, the AUC and its CI in the legend, and each
    ``marked`` (label, confusion) as a point; a PNG written with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ci_text = (f"95% CI {ci.lower:.2f}-{ci.upper:.2f}" if ci.lower is not None
               and ci.upper is not None else "no CI")
    ax.plot([p.fpr for p in points], [p.tpr for p in points], color="tab:blue", lw=2,
            label=f"PXS score: AUC {auc:.2f} ({ci_text})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, (label, table) in enumerate(marked):
        x = 1 - (table["specificity"] if table["specificity"] is not None else 1.0)
        y = table["sensitivity"] if table["sensitivity"] is not None else 0.0
        ax.plot([x], [y], ls="none", marker=markers[i % len(markers)], ms=8,
                label=f"{label} (sens {y:.2f}, spec {1 - x:.2f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC of the PXS score: {n} studies, {positives} positive")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --- the whole evaluation -------------------------------------------------------------------

def _models(studies: Sequence[ScoredStudy]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str, str], int] = {}
    for s in studies:
        key = (s.model_id, s.weights_sha256, s.anchors_sha256)
        counts[key] = counts.get(key, 0) + 1
    return [{"id": m, "weights_sha256": w, "anchors_sha256": a, "studies": c}
            for (m, w, a), c in sorted(counts.items())]


def label_rule(window_days: float | None) -> str:
    if window_days is None:
        return "the outcome column as given"
    return (f"outcome 1 with its time within [study time, study time + {window_days:g} "
            "days]; outcome 1 without a time (or for a study without a date) counts as "
            "positive; several rows for one study: positive if any is")


def evaluate(db: Path | queries.QueriesMixin, outcomes_path: Path, out_dir: Path, *,
             window_days: float | None = None, thresholds: Sequence[float] = (),
             rounds: int = 2000, seed: int = 0, exclude_rejected: bool = False
             ) -> dict[str, Any]:
    """Join, compute, write ``evaluation.json`` and ``roc.png`` into ``out_dir``; return
    what was written to the JSON."""
    if window_days is not None and (not math.isfinite(window_days) or window_days < 0):
        raise EvaluationInputError("--window-days must be a number of days, 0 or more")
    if rounds < 1:
        raise EvaluationInputError("--rounds must be at least 1")
    require_extras()
    outcomes = read_outcomes(outcomes_path)
    if window_days is not None and not outcomes.has_time:
        raise EvaluationInputError(
            f"--window-days needs a 'time' column in {outcomes.name} (the outcome event's "
            "ISO 8601 date or date-time)")
    scored = read_scored_studies(db, exclude_rejected)
    joined = join(outcomes, scored, window_days)
    labels = joined.labels
    scores = [s.score for s in joined.studies]
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise EvaluationInputError(
            f"{len(labels)} studies matched ({positives} positive, {negatives} negative; "
            f"{len(joined.unmatched_rows)} of {len(outcomes.rows)} CSV rows unmatched): "
            "an ROC needs at least one positive and one negative study")
    _import_extras()
    auc = roc_auc(labels, scores)
    ci = bootstrap_auc(labels, scores, rounds, seed)
    points = roc_points(labels, scores)
    best, j = youden(points)
    at_best = confusion(labels, scores, best)
    tables = [confusion(labels, scores, t) for t in thresholds]
    report: dict[str, Any] = {
        "pxsgate_version": __version__,
        "created_at": now_iso(),
        "inputs": {
            "outcomes_file": outcomes.name,
            "outcomes_sha256": outcomes.sha256,
            "window_days": window_days,
            "label_rule": label_rule(window_days),
            "thresholds": list(thresholds),
            "seed": seed,
            "rounds": rounds,
            "results": "each study's current SUCCEEDED result; score = its headline PXS "
                       "score (radiologist_view.pxs_score)",
            "models": _models(joined.studies),
            "exclude_rejected": exclude_rejected,
        },
        "n": len(labels),
        "positives": positives,
        "negatives": negatives,
        "rows": {
            "csv": len(outcomes.rows),
            "matched": joined.matched_rows,
            "extra_for_same_study": joined.extra_rows,
            "unmatched": len(joined.unmatched_rows),
            "unmatched_rows": joined.unmatched_rows,
            "ambiguous_accession_rows": joined.ambiguous_rows,
            "positive_without_time": joined.positive_rows_without_time,
            "positive_without_study_time": joined.positive_rows_without_study_time,
        },
        "scored_studies_without_outcome": joined.studies_without_outcome,
        "auc": auc,
        "auc_ci95": {"lower": ci.lower, "upper": ci.upper, "method": "percentile bootstrap "
                     "(2.5th, 97.5th), studies resampled with replacement",
                     "rounds": ci.rounds, "skipped_single_class": ci.skipped,
                     "seed": ci.seed},
        "thresholds": tables,
        "youden": {**at_best, "j": j},
        "roc": [{"fpr": p.fpr, "tpr": p.tpr, "threshold": p.threshold} for p in points],
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n",
                                                 encoding="utf-8")
        marked = [(f"score >= {t['threshold']:g}", t) for t in tables]
        marked.append((f"Youden J optimum, >= {best:g}", at_best))
        plot_roc(out_dir / "roc.png", points, auc, ci, len(labels), positives, marked)
    except OSError as exc:
        raise EvaluationInputError(f"cannot write to {out_dir}: {exc.strerror or exc}"
                                   ) from exc
    return report


def _fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:.3f}"


def summary_text(report: dict[str, Any], out_dir: Path) -> str:
    """The short human summary: counts and statistics only, never an identifier."""
    rows = report["rows"]
    inputs = report["inputs"]
    ci = report["auc_ci95"]
    unmatched = rows["unmatched_rows"]
    listed = ", ".join(map(str, unmatched[:20])) + (", ..." if len(unmatched) > 20 else "")
    lines = [
        f"{inputs['outcomes_file']}: {rows['csv']} rows, {rows['matched']} matched, "
        f"{rows['unmatched']} unmatched" + (f" (rows {listed})" if unmatched else "")
        + (f"; {rows['extra_for_same_study']} named a study an earlier row named"
           if rows["extra_for_same_study"] else ""),
        f"labels: {inputs['label_rule']}",
    ]
    if rows["positive_without_time"] or rows["positive_without_study_time"]:
        lines.append(f"  positive without a time: {rows['positive_without_time']} rows; "
                     f"study without a date: {rows['positive_without_study_time']} rows")
    lines.append(f"studies: {report['n']} ({report['positives']} positive, "
                 f"{report['negatives']} negative); "
                 f"{report['scored_studies_without_outcome']} scored studies had no row")
    ci_text = (f"95% CI {ci['lower']:.3f}-{ci['upper']:.3f}" if ci["lower"] is not None
               else "no CI")
    lines.append(f"ROC AUC {report['auc']:.3f} ({ci_text}; percentile bootstrap, "
                 f"{ci['rounds']} rounds, {ci['skipped_single_class']} skipped with one "
                 f"class, seed {ci['seed']})")
    lines.append("threshold        sens   spec    PPV    NPV     TP     FP     TN     FN")
    named = [(f">= {t['threshold']:g}", t) for t in report["thresholds"]]
    named.append((f"Youden >= {report['youden']['threshold']:g}", report["youden"]))
    for name, t in named:
        lines.append(f"{name:<15} {_fmt(t['sensitivity'])}  {_fmt(t['specificity'])}  "
                     f"{_fmt(t['ppv'])}  {_fmt(t['npv'])}  {t['tp']:>5}  {t['fp']:>5}  "
                     f"{t['tn']:>5}  {t['fn']:>5}")
    models = inputs["models"]
    for m in models:
        lines.append(f"model {m['id']} (weights {m['weights_sha256'][:12] or '?'}, anchors "
                     f"{m['anchors_sha256'][:12] or '?'}): {m['studies']} studies")
    if len(models) > 1:
        lines.append(f"note: the scores of {len(models)} models are pooled")
    lines.append(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'roc.png'}")
    return "\n".join(lines) + "\n"
