"""The benchmark runner works end to end (its figures are not judged here: speed goals live
in benchmarks/, not in timed tests), and its summary table says what the figures say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ingest as ingest_bench
from benchmarks import run as bench_run

REPO = Path(__file__).resolve().parent.parent
NAMES = [n for n in bench_run.BENCHMARKS if n not in bench_run.GPU_ONLY]


@pytest.mark.dcmtk
def test_quick_run_of_every_benchmark_writes_figures_and_a_summary(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu",
         "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "SUMMARY.md").read_text()
    for name in bench_run.GPU_ONLY:  # on the CPU: skipped, saying why, nothing recorded
        assert not list(tmp_path.glob(f"{name}-*.json"))
        assert f"{name}: skipped, no CUDA device" in done.stdout
    for name in NAMES:
        [path] = tmp_path.glob(f"{name}-cpu-*.json")
        figures = json.loads(path.read_text())
        env = figures["environment"]
        assert env["device"] == env["label"] == "cpu"
        assert env["machine"]["cores"] >= 1
        assert env["commit"] != "unknown"
        assert env["software"]["dcmtk"] not in ("unknown", "not installed")
        assert figures["headline"], name
        assert any(row["value"] is not None for row in figures["headline"]), name
        assert figures["ok"] is True, name
        assert f"| {name} | cpu |" in summary
        assert path.name in summary

    e2e = json.loads(next(tmp_path.glob("e2e-cpu-*.json")).read_text())
    # Every study sent got its result, for both syntaxes; the latencies come from the
    # documents' stage timestamps, so they are ordered as the stages are.
    assert {s["syntax"] for s in e2e["steps"]} == {"raw", "j2k"}
    for step in e2e["steps"]:
        assert step["results"] == step["studies"] == 4
        assert step["statuses"] == {"SUCCEEDED": 4}
        lat = step["latency_s"]
        assert 0 < lat["ready_to_inferred"]["p50"] <= lat["ready_to_stored"]["p50"]
        assert lat["ready_to_stored"]["p50"] < lat["release_to_stored"]["p50"]
        assert lat["release_to_stored"]["p50"] >= e2e["settle_seconds"] - 0.05
        assert lat["ready_to_stored"]["p99"] >= lat["ready_to_stored"]["p50"]
    # Decode on arrival against its reference in the same run: JPEG 2000 at the lowest
    # rate, interleaved with a service that has it off, side by side in the table.
    pair = {s["decode_on_arrival"]: s for s in e2e["on_arrival_steps"]}
    assert set(pair) == {True, False}
    for step in pair.values():
        assert (step["syntax"], step["statuses"]) == ("j2k", {"SUCCEEDED": 4})
    assert any("decode on arrival (default) vs when ready" in row["metric"]
               and "decode-on-arrival off, same run" in row["reference"]
               for row in e2e["headline"])
    ingest = json.loads(next(tmp_path.glob("ingest-cpu-*.json")).read_text())
    orthanc = ["orthanc"] if ingest_bench.ORTHANC.exists() else []
    assert set(ingest["receivers"]) == {"storescp", "pxsgate", "pxsgate+j2k",
                                        "pxsgate stow-rs", *orthanc}
    assert all(len(r["runs_s"]) == 2 for r in ingest["receivers"].values())
    if orthanc:  # the same files, into Orthanc too, and the ratio beside storescp's
        assert ingest["ratio_pxsgate_vs_orthanc"] > 0
        assert any("Orthanc" in row["reference"] for row in ingest["headline"])
    cli = json.loads(next(tmp_path.glob("cli-cpu-*.json")).read_text())
    assert set(cli["wall_time_s"]) == {"results", "status", "trace", "outbox list",
                                       "python -c pass"}
    assert cli["heavy_packages_imported"] == []
    assert all(row["goal"] == "<= 0.15 s" for row in cli["headline"])


def _figures(benchmark: str, label: str, date: str, value: float, met: bool | None
             ) -> dict[str, object]:
    return {
        "benchmark": benchmark,
        "environment": {"date": date, "label": label, "device": "cuda" if label != "cpu"
                        else "cpu", "commit": "abc1234",
                        "machine": {"cores": 16, "cpu": "x", "memory_gib": 128.0,
                                    "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]
                                    if label != "cpu" else []},
                        "software": {"torch": "2.13.0", "dcmtk": "3.6.7"}},
        "headline": [{"metric": "ready -> stored p50", "value": value, "unit": "s",
                      "spread": "p95 1", "reference": "paper: ~20 s", "ratio": 20 / value,
                      "goal": "< 1 s", "met": met}],
    }


def test_summary_shows_the_newest_figures_of_each_machine(tmp_path: Path) -> None:
    files = {
        "e2e-cpu-2026-11-01.json": _figures("e2e", "cpu", "2026-11-01T10:00:00+00:00", 2.5,
                                            False),
        "e2e-cpu-2026-11-26.json": _figures("e2e", "cpu", "2026-11-26T10:00:00+00:00", 0.4,
                                            True),
        "e2e-h100-2026-11-20.json": _figures("e2e", "h100", "2026-11-20T10:00:00+00:00",
                                             0.05, True),
        "old-format.json": {"benchmark": "e2e", "date": "2026-11-30"},  # no headline: skipped
    }
    for name, figures in files.items():
        (tmp_path / name).write_text(json.dumps(figures))
    (tmp_path / "broken.json").write_text("{not json")
    table = bench_run.render(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| e2e |")]
    assert len(rows) == 2  # one per machine: the newest CPU run, the H100 run
    cpu, gpu = rows
    for text in ("| cpu |", "0.4 s", "50.00x", "| yes |"):
        assert text in cpu
    for text in ("| h100 |", "0.05 s", "400.00x"):
        assert text in gpu
    assert "e2e-cpu-2026-11-01.json" not in table
    assert "NVIDIA H100 80GB HBM3" in table  # each run labelled with its machine


def test_runner_rejects_unknown_benchmarks() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "nonsense"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr
