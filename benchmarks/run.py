"""Run pxsgate's benchmarks and write the summary table.

    python -m benchmarks.run [NAME ...] [--quick] [--device auto|cpu|cuda] [--results DIR]
                             [-- EXTRA ARGS FOR ONE BENCHMARK]
    python -m benchmarks.run --summary        # only rebuild the table from saved figures
    python -m benchmarks.run --list

NAME is any of: ingest, inference, e2e, soak, store_json, ui_pages, store_backends, triton,
gpu_jpeg2000, cli (default: all of them, in that order). Each benchmark repeats its
measurement and saves its figures, with the machine, commit, date and device, as
``<results>/<name>-<machine>-<date>.json`` (the machine label is ``cpu`` or the GPU's
model, e.g. ``h100``). Then ``<results>/SUMMARY.md`` is rebuilt from the latest figures of
every benchmark on every machine found there, one table: each headline metric with its
median (or percentile), spread, the reference it was run beside in the same run and the
speed-up over it, and the goal with whether it was met.

``--quick`` runs every benchmark at a toy size (a smoke test of the scripts, a minute or
two; its figures mean nothing and go to a temporary directory unless --results is given).
Exit status 1 when a benchmark failed or reported itself not ok.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import common

# name -> (full run's arguments, --quick's arguments, takes --device)
BENCHMARKS: dict[str, tuple[list[str], list[str], bool]] = {
    "ingest": ([], ["--files", "4", "--rows", "512", "--cols", "512", "--repeats", "2",
                    "--pdu-sizes", ""], False),
    "inference": ([], ["--sizes", "1,2", "--repeats", "2", "--reference-images", "1",
                       "--no-precision"], True),
    "e2e": ([], ["--rates", "2", "--studies", "4", "--rows", "512", "--cols", "512"], True),
    "soak": ([], ["--duration", "16", "--rate", "1", "--interval", "2", "--drain", "30",
                  "--quiet"], True),
    "store_json": ([], ["--rows", "300", "--repeats", "2"], False),
    "ui_pages": ([], ["--results", "500", "--repeats", "2"], False),
    "store_backends": ([], ["--results", "100", "--repeats", "1"], False),
    "gpu_jpeg2000": ([], ["--images", "1", "--rows", "512", "--cols", "512", "--repeats", "1"],
                     True),
    "triton": ([], ["--sizes", "1", "--images", "1"], True),
    "cli": ([], ["--results", "5", "--repeats", "2"], False),
}

# Measured only on a CUDA device: elsewhere they say why and record nothing.
GPU_ONLY = ("gpu_jpeg2000",)


def run(names: list[str], *, quick: bool, device: str, results: Path,
        extra: list[str]) -> list[dict[str, Any]]:
    outcomes = []
    for name in names:
        full, small, takes_device = BENCHMARKS[name]
        argv = [*(small if quick else full), "--out", str(results)]
        if takes_device:
            argv += ["--device", device]
        argv += extra
        print(f"\n=== {name}: python -m benchmarks.{name} {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        try:
            figures = importlib.import_module(f"benchmarks.{name}").main(argv)
        except (Exception, SystemExit) as exc:  # one broken benchmark must not stop the rest
            traceback.print_exc()
            outcomes.append({"name": name, "ok": False, "error": repr(exc)})
            continue
        finally:
            print(f"=== {name}: {time.perf_counter() - started:.0f} s", flush=True)
        outcomes.append({"name": name, "ok": bool(figures and figures.get("ok", True))})
    return outcomes


def latest(results: Path) -> list[dict[str, Any]]:
    """The newest figures of each (benchmark, machine) under ``results``."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            figures = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        env = figures.get("environment") if isinstance(figures, dict) else None
        if not env or "headline" not in figures:
            continue  # figures from before the runner: kept as history, not tabled
        key = (str(figures.get("benchmark")), str(env["label"]))
        if key not in newest or env["date"] > newest[key]["environment"]["date"]:
            figures["_file"] = path.name
            newest[key] = figures
    order = list(BENCHMARKS)
    return sorted(newest.values(), key=lambda f: (
        order.index(f["benchmark"]) if f["benchmark"] in order else len(order),
        f["environment"]["label"]))


def _value(row: dict[str, Any]) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return f"{text} {row['unit']}".strip()


def render(results: Path) -> str:
    figures = latest(results)
    lines = [
        "# Benchmark summary",
        "",
        "Built by `python -m benchmarks.run` from the newest figures of each benchmark on each "
        "machine in this folder. *x ref* is the speed-up over the reference run beside it in "
        "the same run (above 1: pxsgate is faster).",
        "",
        "| benchmark | machine | metric | value | spread / percentiles | reference | x ref "
        "| goal | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        label = f["environment"]["label"]
        for row in f["headline"]:
            met = {True: "yes", False: "**no**", None: ""}[row.get("met")]
            ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else ""
            cells = [f["benchmark"], label, row["metric"], _value(row), row.get("spread", ""),
                     row.get("reference", ""), ratio, row.get("goal", ""), met]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", "Machines and runs:", ""]
    for f in figures:
        env = f["environment"]
        lines.append(f"- `{f['_file']}`: {common.describe(env)}; device {env['device']}; "
                     f"commit {env['commit']}; {env['date']}; torch "
                     f"{env['software'].get('torch')}, DCMTK {env['software'].get('dcmtk')}"
                     + (f"; wall {f['wall_s']} s" if "wall_s" in f else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes: a smoke test of the scripts, not figures")
    parser.add_argument("--device", default="auto", help="model device: auto, cpu or cuda")
    parser.add_argument("--results", type=Path, default=None,
                        help="where figures and SUMMARY.md go (default benchmarks/results; "
                             "with --quick a temporary directory)")
    parser.add_argument("--summary", action="store_true",
                        help="only rebuild SUMMARY.md from the figures already saved")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            module = importlib.import_module(f"benchmarks.{name}")
            print(f"{name:<11} {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown}; choose from {list(BENCHMARKS)}")
    if extra and len(names) != 1:
        parser.error("arguments after -- go to one benchmark: name exactly one")
    results = args.results or (Path(tempfile.mkdtemp(prefix="pxsgate-bench-"))
                               if args.quick else common.RESULTS)
    outcomes: list[dict[str, Any]] = []
    if not args.summary:
        device = common.resolve_device(args.device)
        outcomes = run(names, quick=args.quick, device=device, results=results, extra=extra)
    table = render(results)
    (results / "SUMMARY.md").parent.mkdir(parents=True, exist_ok=True)
    (results / "SUMMARY.md").write_text(table, encoding="utf-8")
    print()
    print(table)
    print(f"summary: {results / 'SUMMARY.md'}")
    failed = [o for o in outcomes if not o["ok"]]
    for o in failed:
        print(f"FAILED: {o['name']} {o.get('error', '(reported not ok)')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A benchmark that failed half-way can leave a service's worker threads behind, which
    # would keep the interpreter alive after the summary: leave without waiting for them.
    os._exit(code)
