"""`pxsgate evaluate`: the stored scores validated against an outcomes CSV, from outside.

Each test writes a real SQLite store with real result documents (Store + build_document,
no model needed), an outcomes CSV, and runs the real command line as a subprocess; it
checks the exit code, the summary, evaluation.json and roc.png against hand counts."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pxsgate.records import ScoredImage
from pxsgate.results import ModelInfo, ResultDocument, StudyIdentity, build_document
from pxsgate.store import Store

from .conftest import pxsgate, write_config

MODEL = ModelInfo("PxsScore", "0.1", "tests", "evaluation tests",
                  "2026-01-01T00:00:00+00:00", "ab" * 32, anchors_sha256="cd" * 32)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Study:
    """One study in the store: identifiers (PHI: they must never be printed)."""

    n: int
    score: float
    time: str | None = "2026-03-01T10:00:00"
    status: str = "SUCCEEDED"
    accession: str = ""

    @property
    def uid(self) -> str:
        return f"1.2.826.0.1.3680043.10.543.{self.n}"

    @property
    def acc(self) -> str:
        return self.accession or f"ACC{700000 + self.n}"

    @property
    def patient(self) -> str:
        return f"MRN{900000 + self.n}"

    def document(self, score: float | None = None) -> ResultDocument:
        identity = StudyIdentity(self.uid, self.patient, self.acc, self.time)
        value = self.score if score is None else score
        ok = self.status == "SUCCEEDED"
        scores = [ScoredImage(f"{self.uid}.1.1", f"{self.uid}.1", value)] if ok else []
        return build_document(
            status=self.status, identity=identity, site_id="TEST", model=MODEL,
            created_at=f"2026-03-01T11:{self.n % 60:02d}:00.000+01:00",
            updated_at=f"2026-03-01T11:{self.n % 60:02d}:01.000+01:00", scores=scores,
            exit_code=2 if self.status == "FAILED" else 0,
            error_message={"SUCCEEDED": "", "FAILED": "inference failed",
                           "SKIPPED": "not a candidate"}[self.status])


def make_store(tmp: Path, studies: Sequence[Study],
               superseded: Sequence[tuple[Study, float]] = ()) -> Path:
    """A config whose store holds these studies' results; ``superseded``: (study, score)
    stored first, so that the study's later result is its current one."""
    config = write_config(tmp / "pxsgate.yaml", tmp / "data")

    async def fill() -> None:
        store = Store(tmp / "data" / "pxsgate.sqlite3")
        await store.open()
        try:
            for study, score in superseded:
                await store.store_result(study.document(score), "stored")
            for study in studies:
                await store.store_result(study.document(), "stored")
        finally:
            await store.close()

    asyncio.run(fill())
    return config


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]],
              encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def evaluate(config: Path, outcomes: Path, out: Path, *args: str,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if env is None:
        return pxsgate("evaluate", "--config", config, "--outcomes", outcomes, "--out", out,
                       *args, check=False)
    return subprocess.run(
        [sys.executable, "-m", "pxsgate", "evaluate", "--config", str(config),
         "--outcomes", str(outcomes), "--out", str(out), *args],
        text=True, capture_output=True, timeout=120, check=False, env=env)


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    return data


def assert_no_phi(text: str, studies: Sequence[Study], extra: Sequence[str] = ()) -> None:
    for s in studies:
        for identifier in (s.uid, s.acc, s.patient):
            assert identifier not in text
    for identifier in extra:
        assert identifier not in text


# --- the hand-checked case ------------------------------------------------------------------

# Scores 1..6, outcomes 0,0,1,0,1,1: positives score 3, 5, 6; negatives 1, 2, 4.
HAND = [Study(i, float(i)) for i in range(1, 7)]
HAND_OUTCOMES = [0, 0, 1, 0, 1, 1]
FAILED = Study(20, 0.0, status="FAILED")
SKIPPED = Study(21, 0.0, status="SKIPPED")
SHARED = [Study(22, 9.0, accession="ACCSHARED"), Study(23, 9.5, accession="ACCSHARED")]
UNKNOWN_ACCESSION = "ACC123999"


@dataclass
class Run:
    studies: list[Study]
    proc: subprocess.CompletedProcess[str]
    out: Path
    report: dict[str, Any]


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("hand")
    everything = [*HAND, FAILED, SKIPPED, *SHARED]
    # Study 3 was scored 100 first, then re-scored 3: only its current result counts.
    config = make_store(tmp, everything, superseded=[(HAND[2], 100.0)])
    # Header names in any case, aliases, a column the command ignores, a BOM, a blank
    # line; rows keyed by accession, by study UID, or both.
    rows: list[list[str]] = []
    for study, outcome in zip(HAND, HAND_OUTCOMES, strict=True):
        by_uid = study.n % 2 == 0
        rows.append([study.patient, "" if by_uid else study.acc,
                     study.uid if by_uid or study.n == 5 else "",
                     ["no", "0", "False"][study.n % 3] if not outcome
                     else ["YES", "1", "true"][study.n % 3]])
    rows.insert(3, [])  # row 5: blank
    rows += [
        ["MRN1", UNKNOWN_ACCESSION, "", "1"],  # row 9: no such study
        ["MRN2", "", FAILED.uid, "1"],  # row 10: not SUCCEEDED
        ["MRN3", "ACCSHARED", "", "0"],  # row 11: accession of two studies
    ]
    outcomes = write_csv(tmp / "outcomes.csv",
                         ["Patient_ID", "Accession", "STUDY_UID", "Outcome"], rows,
                         encoding="utf-8-sig")
    out = tmp / "out"
    db = tmp / "data" / "pxsgate.sqlite3"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    proc = evaluate(config, outcomes, out, "--thresholds", "3,4.5", "--rounds", "300")
    assert proc.returncode == 0, proc.stderr
    # The store is only read: the same bytes, and no -wal/-shm left behind.
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["pxsgate.sqlite3"]
    return Run(everything, proc, out, report(out))


def test_auc_matches_the_hand_count(hand: Run) -> None:
    # (positive, negative) pairs the positive scores above: 3 beats 1, 2 (not 4): 2;
    # 5 beats 1, 2, 4: 3; 6 beats 1, 2, 4: 3. 8 of 3 x 3 = 9 pairs: AUC = 8/9.
    r = hand.report
    assert (r["n"], r["positives"], r["negatives"]) == (6, 3, 3)
    assert r["auc"] == pytest.approx(8 / 9)
    assert "ROC AUC 0.889" in hand.proc.stdout
    # The curve, point by point (score >= threshold is positive), from (0, 0) to (1, 1).
    curve = [(p["threshold"], round(p["fpr"] * 3, 9), round(p["tpr"] * 3, 9))
             for p in r["roc"]]  # in thirds
    assert curve == [(None, 0, 0), (6, 0, 1), (5, 0, 2), (4, 1, 2), (3, 1, 3), (2, 2, 3),
                     (1, 3, 3)]
    assert r["inputs"]["models"] == [{"id": "PxsScore-0.1", "weights_sha256": "ab" * 32,
                                      "anchors_sha256": "cd" * 32, "studies": 6}]
    assert r["inputs"]["outcomes_file"] == "outcomes.csv"
    assert len(r["inputs"]["outcomes_sha256"]) == 64
    assert (r["inputs"]["seed"], r["inputs"]["rounds"]) == (0, 300)
    assert r["pxsgate_version"]
    assert r["created_at"]


def test_sensitivity_and_specificity_match_a_hand_count(hand: Run) -> None:
    at = {t["threshold"]: t for t in hand.report["thresholds"]}
    # >= 3: called positive 3, 4, 5, 6 -> TP 3 (3, 5, 6), FP 1 (4), TN 2 (1, 2), FN 0.
    assert {k: at[3][k] for k in ("tp", "fp", "tn", "fn")} == {"tp": 3, "fp": 1, "tn": 2,
                                                              "fn": 0}
    assert at[3]["sensitivity"] == 1
    assert at[3]["specificity"] == pytest.approx(2 / 3)
    assert at[3]["ppv"] == pytest.approx(3 / 4)
    assert at[3]["npv"] == 1
    # >= 4.5: called positive 5, 6 -> TP 2, FP 0, TN 3 (1, 2, 4), FN 1 (3).
    assert {k: at[4.5][k] for k in ("tp", "fp", "tn", "fn")} == {"tp": 2, "fp": 0, "tn": 3,
                                                                "fn": 1}
    assert at[4.5]["sensitivity"] == pytest.approx(2 / 3)
    assert (at[4.5]["specificity"], at[4.5]["ppv"]) == (1, 1)
    assert at[4.5]["npv"] == pytest.approx(3 / 4)
    # Youden J: >= 3 and >= 5 both give J = 2/3; the higher threshold is reported.
    youden = hand.report["youden"]
    assert youden["threshold"] == 5
    assert youden["j"] == pytest.approx(2 / 3)
    assert (youden["tp"], youden["fp"], youden["tn"], youden["fn"]) == (2, 0, 3, 1)
    assert "Youden >= 5" in hand.proc.stdout


def test_unmatched_rows_are_counted_and_no_identifier_is_shown(hand: Run) -> None:
    rows = hand.report["rows"]
    assert rows["csv"] == 9  # the blank line is not a row of data
    assert (rows["matched"], rows["unmatched"]) == (6, 3)
    assert rows["unmatched_rows"] == [9, 10, 11]  # the header is row 1, the blank row 5
    assert rows["ambiguous_accession_rows"] == [11]
    assert hand.report["scored_studies_without_outcome"] == 2  # the two sharing an accession
    assert "3 unmatched (rows 9, 10, 11)" in hand.proc.stdout
    everything = hand.proc.stdout + hand.proc.stderr + json.dumps(hand.report)
    assert_no_phi(everything, hand.studies, [UNKNOWN_ACCESSION, "ACCSHARED", "MRN1"])


def test_roc_png_is_a_real_picture(hand: Run) -> None:
    png = hand.out / "roc.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (600, 600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10  # a drawing, not a blank canvas
    assert f"wrote {hand.out / 'evaluation.json'} and {png}" in hand.proc.stdout


def test_ties_count_one_half(tmp_path: Path) -> None:
    studies = [Study(1, 1.0), Study(2, 2.0), Study(3, 2.0), Study(4, 3.0)]
    config = make_store(tmp_path, studies)
    outcomes = write_csv(tmp_path / "o.csv", ["study_instance_uid", "outcome"],
                         [[s.uid, o] for s, o in zip(studies, "0011", strict=True)])
    proc = evaluate(config, outcomes, tmp_path / "out", "--rounds", "50")
    assert proc.returncode == 0, proc.stderr
    # Positives 2 (study 3), 3; negatives 1, 2 (study 2). Pairs: (2, 1) 1, (2, 2) a tie
    # 1/2, (3, 1) 1, (3, 2) 1: 3.5 of 4 = 0.875.
    assert report(tmp_path / "out")["auc"] == pytest.approx(0.875)


def test_a_study_named_by_several_rows_is_positive_if_any_row_is(tmp_path: Path) -> None:
    low, high = Study(1, 1.0), Study(2, 2.0)
    config = make_store(tmp_path, [low, high])
    outcomes = write_csv(tmp_path / "o.csv", ["accession_number", "study_uid", "outcome"],
                         [[low.acc, "", "0"], [high.acc, "", "1"], ["", high.uid, "0"]])
    proc = evaluate(config, outcomes, tmp_path / "out", "--rounds", "50")
    assert proc.returncode == 0, proc.stderr
    r = report(tmp_path / "out")
    assert (r["n"], r["positives"], r["negatives"], r["auc"]) == (2, 1, 1, 1.0)
    assert (r["rows"]["matched"], r["rows"]["extra_for_same_study"]) == (3, 1)
    assert "1 named a study an earlier row named" in proc.stdout


# --- the bootstrap --------------------------------------------------------------------------

def _spread(n: int) -> tuple[list[Study], list[str]]:
    """n studies whose scores overlap between the classes (AUC about 0.8)."""
    rng = np.random.default_rng(12345)
    outcomes = ["1" if i % 3 == 0 else "0" for i in range(n)]
    studies = [Study(i, round(float(rng.normal(2.0 if o == "1" else 0.8)), 4) + 5)
               for i, o in enumerate(outcomes)]
    return studies, outcomes


def test_bootstrap_ci_is_reproducible_with_its_seed(tmp_path: Path) -> None:
    studies, outcomes = _spread(45)
    config = make_store(tmp_path, studies)
    csv_path = write_csv(tmp_path / "o.csv", ["accession_number", "outcome"],
                         [[s.acc, o] for s, o in zip(studies, outcomes, strict=True)])
    runs = {}
    for name, args in (("default", ()), ("seed0", ("--seed", "0", "--rounds", "2000")),
                       ("seed1", ("--seed", "1"))):
        proc = evaluate(config, csv_path, tmp_path / name, *args)
        assert proc.returncode == 0, proc.stderr
        runs[name] = report(tmp_path / name)
    default = runs["default"]
    ci = default["auc_ci95"]
    assert (ci["rounds"], ci["seed"]) == (2000, 0)  # the defaults
    assert ci["skipped_single_class"] == 0
    assert ci["lower"] <= default["auc"] <= ci["upper"]
    assert 0.5 < ci["lower"] < ci["upper"] <= 1
    assert runs["seed0"]["auc_ci95"] == ci  # same seed: the same interval, to the bit
    assert runs["seed1"]["auc_ci95"]["seed"] == 1
    assert (runs["seed1"]["auc_ci95"]["lower"], runs["seed1"]["auc_ci95"]["upper"]) != (
        ci["lower"], ci["upper"])
    assert runs["seed1"]["auc"] == default["auc"]


def test_single_class_resamples_are_skipped_and_counted(tmp_path: Path) -> None:
    studies = [Study(1, 1.0), Study(2, 2.0)]
    config = make_store(tmp_path, studies)
    csv_path = write_csv(tmp_path / "o.csv", ["study_uid", "outcome"],
                         [[studies[0].uid, "0"], [studies[1].uid, "1"]])
    proc = evaluate(config, csv_path, tmp_path / "out", "--rounds", "400", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    ci = report(tmp_path / "out")["auc_ci95"]
    # Two studies: a resample has both classes with probability 1/2.
    assert 100 < ci["skipped_single_class"] < 300
    assert (ci["lower"], ci["upper"]) == (1.0, 1.0)
    assert f"{ci['skipped_single_class']} skipped with one class" in proc.stdout


def test_bootstrap_auc_equals_roc_auc_score_on_each_resample() -> None:
    from sklearn.metrics import roc_auc_score

    from pxsgate.tools.evaluate import weighted_auc

    rng = np.random.default_rng(3)
    scores = np.sort(rng.integers(0, 6, 30).astype(float))  # many ties
    labels = rng.random(30) < 0.4
    groups = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]]).astype(np.int64)
    counts = rng.multinomial(30, np.full(30, 1 / 30), size=50).astype(np.int64)
    aucs, _, _ = weighted_auc(counts, labels, groups)
    for row, auc in zip(counts, aucs, strict=True):
        y, s = np.repeat(labels, row), np.repeat(scores, row)
        if y.all() or not y.any():
            assert np.isnan(auc)
        else:
            assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# --- the time window ------------------------------------------------------------------------

def test_window_days_decides_the_label_by_the_event_time(tmp_path: Path) -> None:
    at = "2026-03-01T10:00:00"
    a, b, c, d, e, f, g = (Study(i, float(i), time=at) for i in range(1, 8))
    h = Study(8, 8.0, time=None)  # no StudyDate: the window cannot be applied
    studies = [a, b, c, d, e, f, g, h]
    config = make_store(tmp_path, studies)
    csv_path = write_csv(tmp_path / "o.csv", ["accession_number", "outcome", "time"], [
        [a.acc, "1", "2026-03-06T09:00:00"],  # 5 days after the study: outside 3 days
        [b.acc, "1", "2026-03-02T08:00"],  # within
        [c.acc, "1", ""],  # positive without a time: stays positive
        [d.acc, "1", "2026-02-28T10:00:00"],  # before the study
        [e.acc, "1", "2026-03-01"],  # the study's day, a date alone: by calendar day
        [f.acc, "0", "2026-03-02T10:00:00"],  # outcome 0: negative, whatever its time
        [g.acc, "0", ""],
        [h.acc, "1", "2026-04-01T00:00:00+02:00"],  # an offset is accepted
    ])
    proc = evaluate(config, csv_path, tmp_path / "plain", "--rounds", "50")
    assert proc.returncode == 0, proc.stderr
    plain = report(tmp_path / "plain")
    # As given: positives a1 b2 c3 d4 e5 h8, negatives f6 g7: of the 6 x 2 = 12 pairs,
    # only h's two are won (f and g score above a..e): AUC 2/12.
    assert (plain["positives"], plain["negatives"]) == (6, 2)
    assert plain["auc"] == pytest.approx(2 / 12)

    proc = evaluate(config, csv_path, tmp_path / "window", "--window-days", "3",
                    "--rounds", "50")
    assert proc.returncode == 0, proc.stderr
    windowed = report(tmp_path / "window")
    # Within 3 days: b, c (no time), e (same day), h (no study date); a (5 days) and d
    # (before) become negative. Positives 2 3 5 8, negatives 1 4 6 7: pairs won:
    # 2 beats 1; 3 beats 1; 5 beats 1, 4; 8 beats all 4 -> 1 + 1 + 2 + 4 = 8 of 16.
    assert (windowed["positives"], windowed["negatives"]) == (4, 4)
    assert windowed["auc"] == pytest.approx(8 / 16)
    assert windowed["inputs"]["window_days"] == 3
    assert windowed["rows"]["positive_without_time"] == 1
    assert windowed["rows"]["positive_without_study_time"] == 1
    assert "within [study time, study time + 3 days]" in proc.stdout

    no_time = write_csv(tmp_path / "n.csv", ["accession_number", "outcome"], [[a.acc, "1"]])
    proc = evaluate(config, no_time, tmp_path / "x", "--window-days", "3")
    assert proc.returncode == 2
    assert "--window-days needs a 'time' column" in proc.stderr


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "rows", "message"), [
    (["accession_number", "outcome"], [["ACC700001", "1"], ["ACC700002", "maybe"]],
     "row 3: outcome must be 1/0, true/false or yes/no"),
    (["accession_number", "outcome"], [["ACC700001", ""]], "row 2: outcome must be"),
    (["patient_id", "outcome"], [["MRN900001", "1"]], "has no key column"),
    (["accession_number", "result"], [["ACC700001", "1"]], "has no 'outcome' column"),
    (["accession_number;outcome"], [["ACC700001;1"]], "must be comma-separated"),
    (["accession", "accession_number", "outcome"], [["A", "B", "1"]],
     "columns 1 and 2 both give the accession"),
    (["accession_number", "outcome", "time"], [["ACC700001", "1", "yesterday"]],
     "row 2: time is not an ISO 8601 date"),
    (["accession_number", "study_uid", "outcome"], [["", "", "1"]],
     "row 2 has neither an accession number nor a study instance UID"),
    (["accession_number", "outcome"], [["ACC700001", "1"], ["ACC700002", "1"]],
     "at least one positive and one negative"),
    (["accession_number", "outcome"], [["ACC123456", "1"], ["ACC123457", "0"]],
     "0 studies matched"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path: Path, header: list[str],
                                                rows: list[list[str]], message: str) -> None:
    studies = [Study(1, 1.0), Study(2, 2.0)]
    config = make_store(tmp_path, studies)
    csv_path = write_csv(tmp_path / "o.csv", header, rows)
    proc = evaluate(config, csv_path, tmp_path / "out")
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "out" / "evaluation.json").exists()
    assert_no_phi(proc.stderr, studies, ["maybe", "ACC123456"])


def test_missing_or_empty_file_and_bad_options_exit_2(tmp_path: Path) -> None:
    config = make_store(tmp_path, [Study(1, 1.0), Study(2, 2.0)])
    proc = evaluate(config, tmp_path / "nowhere.csv", tmp_path / "out")
    assert proc.returncode == 2
    assert "no outcomes file" in proc.stderr
    (tmp_path / "empty.csv").write_text("")
    proc = evaluate(config, tmp_path / "empty.csv", tmp_path / "out")
    assert proc.returncode == 2
    assert "empty" in proc.stderr
    ok = write_csv(tmp_path / "o.csv", ["study_uid", "outcome"], [["1.2.3", "1"]])
    proc = evaluate(config, ok, tmp_path / "out", "--thresholds", "4,high")
    assert proc.returncode == 2
    assert "--thresholds" in proc.stderr


def test_without_the_extra_it_says_how_to_install_it(tmp_path: Path) -> None:
    studies = [Study(1, 1.0), Study(2, 2.0)]
    config = make_store(tmp_path, studies)
    shadow = tmp_path / "shadow" / "sklearn"
    shadow.mkdir(parents=True)  # an sklearn that is found but cannot be imported
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sklearn'\", name='sklearn')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    ok = write_csv(tmp_path / "o.csv", ["study_uid", "outcome"],
                   [[studies[0].uid, "0"], [studies[1].uid, "1"]])
    proc = evaluate(config, ok, tmp_path / "out", env=env)
    assert proc.returncode == 2
    assert "pip install 'pxsgate[evaluate]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
