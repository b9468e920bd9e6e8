"""Soak: studies through `pxsgate serve` at a steady rate for a fixed time, with the service's
memory, open files, threads and queue depths sampled; memory must level off.

    python -m benchmarks.soak [--duration 300] [--rate 1.0] [--images 1] [--size 512]
                              [--interval 5] [--weights demo] [--device cpu] [--out DIR]

Starts the real command line (``python -m pxsgate serve``, JSON logs, data directory and
config in a temporary directory, a free loopback HTTP port) and, once it logs
``gateway.started``, sends single- or multi-image portable AP chest studies (synthetic CR,
SIZExSIZE, 12 bits stored in 16) with pynetdicom, one association per study, at --rate
studies per second for --duration seconds. The studies come from a small pre-generated pool;
each send gives its study new Study, Series and SOP Instance UIDs and a new accession number,
so every one is a new study to the service.

Every --interval seconds it samples, from outside the service:
  rss_mib, threads, fds       the service process: VmRSS and Threads of /proc/PID/status,
                              entries of /proc/PID/fd
  rss_tree_mib, fds_tree,     the same summed over the service and every descendant (the
  procs, cpu_s                decode worker processes, multiprocessing's resource tracker),
                              their number, and their CPU seconds
  health.*                    every number that GET /healthz returns, nested keys flattened
                              (studiesInProgress, inferenceQueue, deliveries.pending ...)
  stored, stored_<STATUS>     rows of the results table (a read-only SQLite connection)
  data_mib                    bytes under the data directory (spool + database)
  max_batch                   the largest inference batch so far (inference.batch log events)

When sending stops it waits (--drain, default 60 s) until every study sent has a result, stops
the service with SIGTERM (it must exit 0) and judges each series of samples taken while
studies were being sent: it levels off when the median of the last third is at most --growth
percent (default 5) above the median of the middle third, or at most --slack-mib MiB (8) for
memory and --slack-count (4) for counts above it. The first third is warm-up (allocator
arenas, first batches) and is not judged. Checked: rss_tree_mib, rss_mib, fds, fds_tree,
threads. RSS also steps up once whenever a larger inference batch than before runs (the
allocator keeps the activations' pages); when the largest batch grew within the judged window,
because the service fell behind, the verdict carries a note saying so.

Prints Markdown tables (every sample, then the verdicts) and writes
benchmarks/results/soak-<device>-<date>.json (or under --out). Exits 1 when the service died,
did not exit 0 on SIGTERM, left a study sent without a result, or something did not level off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from benchmarks import common
from benchmarks.common import (
    AE_TITLE,
    RESULTS,
    free_port,
    reuid,
    start_service,
    stop_service,
    write_config,
)
from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
JUDGED_MEMORY = ("rss_tree_mib", "rss_mib")
JUDGED_COUNTS = ("fds", "fds_tree", "threads")


# --- set-up --------------------------------------------------------------------------------


def make_pool(count: int, images: int, size: int, seed: int = 11) -> list[list[Dataset]]:
    """``count`` distinct portable AP chest studies of ``images`` CR images each."""
    rng = np.random.default_rng(seed)
    pool = []
    for index in range(1, count + 1):
        study = synth.make_study(index, seed=seed, prefix="SOAK",
                                 description="XR CHEST PORTABLE")
        datasets = []
        for i in range(images):
            pixels = synth.chest_radiograph(rng, rows=size, cols=size, view="AP",
                                            severity=float(rng.uniform(0.0, 0.8)))
            datasets.append(synth.make_image_dataset(
                pixels, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=study,
                series_description="CHEST AP PORTABLE", view_position="AP",
                body_part="CHEST", image_type=("DERIVED", "PRIMARY"), series_number=i + 1,
                instance_number=1))
        pool.append(datasets)
    return pool


# --- sampling from outside (/proc, /healthz, the database) ---------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) from /proc/PID/stat, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields 3.. (the name may hold spaces)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (a scan of /proc by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return sorted(found)


def _status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/PID/status ({} if the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def process_figures(pid: int) -> dict[str, float]:
    main = _status(pid)
    tree = [pid, *descendants(pid)]
    statuses = [main, *(_status(p) for p in tree[1:])]
    cpu = [s[1] for s in map(_proc_stat, tree) if s is not None]
    return {
        "rss_mib": round(main.get("VmRSS", 0) / 1024, 1),
        "rss_tree_mib": round(sum(s.get("VmRSS", 0) for s in statuses) / 1024, 1),
        "procs": sum(1 for s in statuses if s),
        "threads": main.get("Threads", 0),
        "fds": _fd_count(pid),
        "fds_tree": sum(_fd_count(p) for p in tree),
        "cpu_s": round(sum(cpu), 1),
    }


def flatten(value: Any, prefix: str = "health") -> dict[str, float]:
    """Every number in a JSON document (booleans are not numbers here), by dotted path."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {prefix: value}
    return {}


def health(http_port: int) -> dict[str, Any]:
    """The /healthz numbers, and health.ok (false on any error, or a 503)."""
    url = f"http://127.0.0.1:{http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: still a report
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return {"health.ok": False}
    return {"health.ok": bool(body.get("ok")), **flatten(body)}


def stored(db: Path) -> dict[str, int]:
    """Rows of the results table, in all and by status (read-only; the service writes)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as conn:
            rows = conn.execute("SELECT status, count(*) FROM results GROUP BY status").fetchall()
    except sqlite3.Error:
        return {"stored": -1}
    by_status = {f"stored_{status}": int(n) for status, n in rows}
    return {"stored": sum(by_status.values()), **by_status}


def dir_mib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return round(total / 2**20, 1)


# --- load ----------------------------------------------------------------------------------


class Sender(threading.Thread):
    """Sends a new study every 1/rate seconds (one association each) until ``duration``
    is over; when a send takes longer than the period it sends the next one at once."""

    def __init__(self, port: int, pool: list[list[Dataset]], rate: float,
                 duration: float) -> None:
        super().__init__(name="soak-sender", daemon=True)
        self.port, self.pool, self.rate, self.duration = port, pool, rate, duration
        self.stop_now = threading.Event()
        self.sent = 0
        self.failed: list[str] = []
        self.max_lag_s = 0.0
        self.send_s: list[float] = []

    def run(self) -> None:
        start = time.monotonic()
        number = 0
        while not self.stop_now.is_set():
            due = start + number / self.rate
            if due >= start + self.duration:
                break
            if self.stop_now.wait(max(0.0, due - time.monotonic())):
                break
            self.max_lag_s = max(self.max_lag_s, time.monotonic() - due)
            datasets = self.pool[number % len(self.pool)]
            reuid(datasets, number, prefix="SOAK")
            began = time.perf_counter()
            try:
                report = send_datasets("127.0.0.1", self.port, datasets, called_ae=AE_TITLE,
                                       calling_ae="PXSGATE-SOAK")
            except Exception as exc:  # keep going: the service's fate is judged elsewhere
                self.failed.append(repr(exc))
            else:
                if report.ok:
                    self.sent += 1
                else:
                    self.failed.append(f"statuses {[hex(s) for s in report.statuses]}")
            self.send_s.append(time.perf_counter() - began)
            number += 1


# --- judging -------------------------------------------------------------------------------


def levels_off(values: list[float], growth_pct: float, slack: float) -> dict[str, Any]:
    """Median of the last third against the middle third (the first third is warm-up)."""
    third = len(values) // 3
    if third < 2:
        return {"ok": False, "reason": f"too few samples ({len(values)}; at least 6)"}
    middle = statistics.median(values[third:2 * third])
    last = statistics.median(values[2 * third:])
    growth = last - middle
    pct = 100.0 * growth / middle if middle else (0.0 if growth == 0 else float("inf"))
    # The trend over the last two thirds, for the record (least squares, per sample).
    tail = np.asarray(values[third:], dtype=float)
    slope = float(np.polyfit(np.arange(tail.size), tail, 1)[0]) if tail.size > 1 else 0.0
    return {"ok": growth <= slack or pct <= growth_pct, "middle_median": middle,
            "last_median": last, "growth": round(growth, 2), "growth_pct": round(pct, 2),
            "slope_per_sample": round(slope, 3)}


def batch_note(load: list[dict[str, Any]]) -> str | None:
    """Say so when the largest inference batch grew within the judged window (the middle
    and last thirds): the forward pass's activations grow with the batch and the allocator
    keeps the pages, so RSS then steps up once to a new high-water mark, which a run this
    short cannot tell from a leak."""
    third = len(load) // 3
    if third < 2:
        return None
    before, after = load[third - 1]["max_batch"], load[-1]["max_batch"]
    if after <= before:
        return None
    return (f"the largest inference batch grew from {before} to {after} within the judged "
            "window (the service fell behind): RSS follows the batch high-water mark; run "
            "longer, on an idle machine, or at a rate the device keeps up with")


# --- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    with tempfile.TemporaryDirectory(prefix="pxsgate-soak-") as tmp:
        root = Path(tmp)
        generated = time.perf_counter()
        pool = make_pool(args.pool, args.images, args.size)
        pool_s = time.perf_counter() - generated
        http_port = free_port()
        data_dir = root / "data"
        config = write_config(root / "pxsgate.yaml", data_dir, http_port=http_port,
                              weights=args.weights, device=args.device, settle=args.settle)
        started = time.perf_counter()
        service = start_service(config)
        startup_s = time.perf_counter() - started
        pid = service.process.pid
        db = data_dir / "pxsgate.sqlite3"  # Config.db_path
        print(f"pxsgate serve pid {pid}, DICOM port {service.port}, HTTP port {http_port}, "
              f"started in {startup_s:.1f} s; pool of {args.pool} studies in {pool_s:.1f} s; "
              f"sending {args.rate:g} studies/s for {args.duration:g} s", flush=True)

        samples: list[dict[str, Any]] = []
        sender = Sender(service.port, pool, args.rate, args.duration)

        def sample(phase: str) -> dict[str, Any]:
            figures: dict[str, Any] = {
                "t_s": round(time.monotonic() - t0, 1), "phase": phase, "sent": sender.sent,
                "send_failed": len(sender.failed)}
            figures.update(process_figures(pid))
            figures.update(stored(db))
            figures.update(health(http_port))
            figures["data_mib"] = dir_mib(data_dir)
            # The largest inference batch so far: a forward pass's activations grow with the
            # batch, and the allocator keeps the peak, so RSS steps up with it.
            figures["max_batch"] = max(service.batches, default=0)
            samples.append(figures)
            if not args.quiet:
                print(f"  t={figures['t_s']:6.1f} s  sent {figures['sent']:5d}  stored "
                      f"{figures['stored']:5d}  rss {figures['rss_mib']:7.1f} MiB  tree "
                      f"{figures['rss_tree_mib']:7.1f} MiB  fds {figures['fds']:4d}  queue "
                      f"{figures.get('health.inferenceQueue', '-')}", flush=True)
            return figures

        died = False
        t0 = time.monotonic()
        sender.start()
        try:
            next_at = t0
            while True:  # during the load: a sample at 0, interval, 2 x interval ... duration
                sample("load")
                if service.process.poll() is not None:
                    died = True
                    break
                next_at += args.interval
                if next_at > t0 + args.duration + 1e-6:
                    break
                time.sleep(max(0.0, next_at - time.monotonic()))
            if died:
                sender.stop_now.set()
            sender.join()
            drain_until = time.monotonic() + args.drain
            while not died:  # then until every study sent has its result
                time.sleep(min(args.interval, max(0.0, drain_until - time.monotonic())))
                last = sample("drain")
                if service.process.poll() is not None:
                    died = True
                elif last["stored"] >= sender.sent or time.monotonic() >= drain_until:
                    break
        finally:
            sender.stop_now.set()
            exit_code = stop_service(service)
        data_mib = dir_mib(data_dir)

    load = [s for s in samples if s["phase"] == "load"]
    verdicts: dict[str, Any] = {}
    for key in JUDGED_MEMORY:
        verdicts[key] = levels_off([s[key] for s in load], args.growth, args.slack_mib)
    for key in JUDGED_COUNTS:
        verdicts[key] = levels_off([s[key] for s in load], args.growth, args.slack_count)
    final_stored = samples[-1]["stored"] if samples else 0
    note = batch_note(load)
    problems = []
    if died:
        problems.append(f"the service died (exit code {service.process.returncode})")
    elif exit_code != 0:
        problems.append(f"the service exited {exit_code} on SIGTERM, not 0")
    if final_stored < sender.sent:
        problems.append(f"{sender.sent - final_stored} studies sent have no result "
                        f"after {args.drain:g} s")
    if sender.failed:
        problems.append(f"{len(sender.failed)} sends failed (first: {sender.failed[0]})")
    for key, v in verdicts.items():
        if not v["ok"]:
            why = v.get("reason") or f"{v['growth']:+g} ({v['growth_pct']:+.1f}%)"
            problems.append(f"{key} did not level off: {why}")
    model = service.events.get("model.loaded", {})
    elapsed = samples[-1]["t_s"] if samples else 0.0
    figures: dict[str, Any] = {
        "benchmark": "soak",
        "environment": common.environment(str(model.get("device", args.device)).split(":")[0]),
        "device": str(model.get("device", args.device)),
        "precision": model.get("precision"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "image": f"{args.size}x{args.size} 12-bit CR, explicit VR little endian, "
                 f"{args.images} per study",
        "sender": "pynetdicom, one association per study",
        "startup_s": round(startup_s, 1),
        "studies_sent": sender.sent,
        "send_failures": sender.failed[:20],
        "send_failures_count": len(sender.failed),
        "send_s": {"p50": round(statistics.median(sender.send_s), 3) if sender.send_s else None,
                   "max": round(max(sender.send_s), 3) if sender.send_s else None},
        "max_lag_s": round(sender.max_lag_s, 3),
        "results_stored": {k: v for k, v in (samples[-1] if samples else {}).items()
                           if k.startswith("stored")},
        "results_per_s": round(final_stored / elapsed, 3) if elapsed else None,
        "data_mib_at_end": data_mib,
        "service_died": died,
        "service_exit_code": service.process.returncode,
        "log_levels": dict(service.levels),
        "inference_batches": {str(k): v for k, v in sorted(service.batches.items())},
        "log_tail": list(service.tail)[-10:] if problems else [],
        "verdict": {"levels_off": all(v["ok"] for v in verdicts.values()),
                    "growth_pct": args.growth, "slack_mib": args.slack_mib,
                    "slack_count": args.slack_count, "checks": verdicts, "note": note},
        "ok": not problems,
        "problems": problems,
        "samples": samples,
    }
    return figures, not problems


# --- output --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if not value.is_integer() else str(int(value))
    return str(value)


def markdown(figures: dict[str, Any]) -> str:
    samples = figures["samples"]
    fixed = ["t_s", "phase", "sent", "stored", "rss_mib", "rss_tree_mib", "procs", "threads",
             "fds", "fds_tree", "cpu_s", "data_mib", "max_batch"]
    skip = {"health.uptimeSeconds", "health.dicomPort", "health.ok"}
    extra = sorted({k for s in samples for k in s if k.startswith("health.")} - skip)
    columns = fixed + extra
    lines = ["| " + " | ".join(c.removeprefix("health.") for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(s.get(c, "")) for c in columns) + " |" for s in samples]
    lines += ["", "| series (load phase) | middle third median | last third median | growth "
              "| levels off |", "|---|---|---|---|---|"]
    for key, v in figures["verdict"]["checks"].items():
        if "reason" in v:
            lines.append(f"| {key} | | | {v['reason']} | no |")
        else:
            lines.append(f"| {key} | {_cell(v['middle_median'])} | {_cell(v['last_median'])} | "
                         f"{v['growth']:+g} ({v['growth_pct']:+.1f}%) | "
                         f"{'yes' if v['ok'] else 'NO'} |")
    return "\n".join(lines)


def headlines(figures: dict[str, Any]) -> list[dict[str, Any]]:
    checks = figures["verdict"]["checks"]
    tree = checks["rss_tree_mib"]
    sent = figures["studies_sent"]
    stored_now = figures["results_stored"].get("stored", 0)
    rows = [
        common.headline("soak: results for studies sent", stored_now, f"of {sent}",
                        goal="every study sent", met=stored_now >= sent and sent > 0),
    ]
    if "growth_pct" in tree:
        rows.append(common.headline(
            "soak: RSS of the process tree, last third vs middle third", tree["last_median"],
            "MiB", spread_text=f"{tree['growth_pct']:+.1f}%",
            goal=f"levels off (<= {figures['verdict']['growth_pct']:g}% or "
                 f"{figures['verdict']['slack_mib']:g} MiB)", met=bool(tree["ok"])))
    rows.append(common.headline(
        "soak: open files and threads level off", None, "",
        spread_text=", ".join(f"{k} {checks[k].get('last_median', '?')}"
                              for k in ("fds", "fds_tree", "threads")),
        goal="level off", met=all(checks[k]["ok"] for k in ("fds", "fds_tree", "threads"))))
    return rows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of sending (default 300)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="studies per second (default 1)")
    parser.add_argument("--images", type=int, default=1, help="AP images per study")
    parser.add_argument("--size", type=int, default=512, help="image rows = columns")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between samples (default 5)")
    parser.add_argument("--weights", default="demo", help="model.weights (default demo)")
    parser.add_argument("--device", default="cpu", help="model.device (default cpu)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="assembly.settle-seconds (default 2, the service's default)")
    parser.add_argument("--pool", type=int, default=8,
                        help="distinct pre-generated studies, re-UIDed on each send")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds to wait for the last results after sending stops")
    parser.add_argument("--growth", type=float, default=5.0,
                        help="allowed growth, percent, last third vs middle third")
    parser.add_argument("--slack-mib", type=float, default=8.0,
                        help="memory growth always allowed, MiB")
    parser.add_argument("--slack-count", type=float, default=4.0,
                        help="growth always allowed for fds and threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--quiet", action="store_true", help="no line per sample while running")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.interval <= 0 or args.images < 1:
        p.error("--rate, --duration, --interval and --images must be positive")
    started = time.perf_counter()
    figures, ok = run(args)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["headline"] = headlines(figures)
    out = common.save("soak", figures, args.out)
    print()
    print(markdown(figures))
    print()
    stored_now = figures["results_stored"].get("stored", 0)
    print(f"{figures['studies_sent']} studies sent ({figures['image']}) in "
          f"{args.duration:g} s at {args.rate:g}/s, {stored_now} results stored "
          f"({figures['results_stored']}), {figures['device']}, service exit code "
          f"{figures['service_exit_code']}")
    print("memory and open files level off" if ok else "FAILED: " + "; ".join(figures["problems"]))
    if figures["verdict"]["note"]:
        print(f"  note: {figures['verdict']['note']}")
    print(f"  figures: {out}")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
