"""End to end: single-image studies sent by DCMTK storescu at set rates into ``pxsgate serve``;
latency from the association release to the result committed, and the highest rate the
service sustains before latency grows.

    python -m benchmarks.e2e [--rates auto] [--studies 30] [--syntaxes raw,j2k]
                             [--rows 3000 --cols 2500] [--device auto] [--settle S]
                             [--pictures on|off] [--off-reference j2k]

Starts the real command line (``python -m pxsgate serve``, default settings apart from the
loopback ports and a temporary data directory; demo weights) and, for each transfer syntax
and each rate in turn, sends --studies new studies, one portable AP chest CR image each
(2500x3000, 12 bits stored, explicit VR little endian or JPEG 2000 lossless; re-UIDed copies
of a small pool of synthetic radiographs, each study a new patient), one ``storescu``
process and association per study, launched on a fixed schedule (study i at i / rate s,
whether or not the previous send has finished: a modality router does not wait for us).

Each result document carries its stage timestamps (``pxsgate.stages``: received, released,
ready, inferred, stored; "stored" is stamped on the document as it is written, one
transaction commit - an fsync, about a millisecond here - before it is durable), from which:
  release_to_stored   association release -> result committed (includes the settle time,
                      ``assembly.settle-seconds``, default 2 s: the wait for more images)
  ready_to_stored     study ready (settled) -> result committed: decode, preprocessing,
                      batching, the forward pass, the document, the commit
  ready_to_inferred   study ready -> scores back from the model
  scheduled_to_stored the send's scheduled time -> result committed: everything, including
                      a sender or receiver that falls behind
with p50/p95/p99 per step. A step "keeps up" when every study has its result, no send failed
and scheduled_to_stored does not grow: not over the step (the median of its last third is at
most 1.25 x the first third's + 0.25 s), and its p50 not above 1.5 x the p50 at the syntax's
lowest rate + 0.5 s (a latency that is higher but steady is a queue the service only just
holds). The sweep of a syntax stops at the first step that does not keep up; the sustained
rate is the highest that did (studies/hour and /day).

The reference for decode on arrival (``preprocess.decode-on-arrival``, on by default: an
image is decoded while its study settles), in the same run: a second service with it off
(every image decoded once its study is ready, as before issue 24) runs beside the first,
idle but for its share of a comparison made before each --off-reference syntax's sweep
(default j2k): --studies studies each at the syntax's lowest rate, sent in blocks to one
service then the other (on, off, off, on), so that a load that drifts during the run (a
shared machine) weighs on both alike. The table sets the two side by side.

Writes benchmarks/results/e2e-<machine>-<date>.json; prints a table per step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.uid import JPEG2000Lossless

from benchmarks import common
from pxsgate.config import Config

PAPER_STUDY_S = 20.0  # the published deployment: ~20 s per study
PAPER_INFERENCE_S = 12.9  # of which inference
GOAL_READY_S = {"cpu": 1.0, "gpu": 0.1}
GOAL_STUDIES_PER_DAY = 100_000
SYNTAXES = {  # name -> (description, storescu's proposal options)
    "raw": ("uncompressed", []),  # explicit VR little endian
    "j2k": ("JPEG 2000 lossless", ["-xv", "-R"]),
}
DEFAULT_RATES = {  # studies per second, by device and syntax
    ("cpu", "raw"): "0.5,1,2,3,4", ("cpu", "j2k"): "0.25,0.5,1",
    ("gpu", "raw"): "1,2,4,8,16", ("gpu", "j2k"): "1,2,4,8",
}


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Send:
    accession: str
    path: Path
    scheduled: float = 0.0  # wall-clock time the send was due
    began: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    error: str = ""


def make_pool(syntax: str, count: int, rows: int, cols: int, seed: int = 21) -> list[Dataset]:
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(count):
        ds = common.ap_chest(rng, rows, cols, number=i, prefix="E2E")
        if syntax == "j2k":
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        pool.append(ds)
    return pool


def write_studies(pool: list[Dataset], directory: Path, first: int, count: int) -> list[Send]:
    directory.mkdir(parents=True, exist_ok=True)
    sends = []
    for number in range(first, first + count):
        ds = copy.copy(pool[number % len(pool)])  # shallow: the pixel data is shared
        ds.file_meta = copy.deepcopy(ds.file_meta)
        accession = common.reuid([ds], number, prefix="E2E")
        path = directory / f"{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sends.append(Send(accession, path))
    return sends


def storescu(port: int, send: Send, options: list[str]) -> None:
    send.began = time.time()
    proc = subprocess.run([common.STORESCU, *options, "-aet", "E2E-SENDER", "-aec",
                           common.AE_TITLE, "127.0.0.1", str(port), str(send.path)],
                          capture_output=True, text=True)
    send.seconds = time.time() - send.began
    send.returncode = proc.returncode
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        send.error = lines[-1][:200] if lines else f"exit {proc.returncode}"


def send_on_schedule(port: int, sends: list[Send], rate: float, options: list[str]) -> None:
    """Launch study i's storescu at start + i / rate (in parallel when sends overlap)."""
    start = time.time() + 0.2
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        for i, send in enumerate(sends):
            send.scheduled = start + i / rate
            time.sleep(max(0.0, send.scheduled - time.time()))
            futures.append(pool.submit(storescu, port, send, options))
        for future in futures:
            future.result()


def decode_counts(http_port: int) -> dict[str, float]:
    """A service's model-input decodes by stage and decodes on arrival by outcome
    (``/metrics``): e.g. ``{"early_decodes.used": 12.0, "model_input_decodes.ready": 0.0}``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                    timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    counts = {}
    for match in re.finditer(r'^pxsgate_(model_input_decodes|early_decodes)_total'
                             r'\{\w+="([\w-]+)"\} (\S+)$', text, re.MULTILINE):
        counts[f"{match[1]}.{match[2]}"] = float(match[3])
    return counts


def wait_results(db: Path, accessions: list[str], limit_s: float) -> dict[str, dict[str, Any]]:
    """The current result document of each accession, once all are stored (or at the
    limit: those stored by then)."""
    wanted = set(accessions)
    deadline = time.monotonic() + limit_s
    found: dict[str, dict[str, Any]] = {}
    while True:
        with common.read_only(db) as conn:
            rows = conn.execute(
                "SELECT accession_number, document FROM results WHERE current = 1 AND "
                f"accession_number IN ({','.join('?' * len(wanted))})", sorted(wanted),
            ).fetchall()
        found = {acc: json.loads(doc) for acc, doc in rows}
        if len(found) >= len(wanted) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def latencies(sends: list[Send], docs: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"scheduled_to_stored": [], "release_to_stored": [],
                                   "ready_to_stored": [], "ready_to_inferred": [],
                                   "send": []}
    for send in sends:  # in schedule order
        doc = docs.get(send.accession)
        out["send"].append(send.seconds)
        if doc is None or doc["status"] != "SUCCEEDED":
            continue
        st = {k: _ts(v) for k, v in doc["pxsgate"]["stages"].items() if v}
        out["scheduled_to_stored"].append(st["stored"] - send.scheduled)
        out["release_to_stored"].append(st["stored"] - st["released"])
        out["ready_to_stored"].append(st["stored"] - st["ready"])
        out["ready_to_inferred"].append(st["inferred"] - st["ready"])
    return out


def grows(series: list[float]) -> dict[str, Any]:
    third = max(1, len(series) // 3)
    if len(series) < 3:
        return {"grows": False, "reason": "too few studies to judge"}
    first = float(np.median(series[:third]))
    last = float(np.median(series[-third:]))
    return {"grows": last > 1.25 * first + 0.25, "first_third_median_s": round(first, 3),
            "last_third_median_s": round(last, 3)}


def judge(step: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    """Whether ``step`` kept up: every study scored, no send failed, and the latency
    (scheduled send -> result stored) neither grew during the step nor rose above the
    baseline's (the syntax's lowest rate: the service idle between studies) by more than
    half, + 0.5 s. A higher but steady latency is a queue the service only just holds."""
    p50 = step["latency_s"]["scheduled_to_stored"]["p50"]
    base = baseline["latency_s"]["scheduled_to_stored"]["p50"] if baseline else p50
    step["above_baseline"] = bool(p50 is not None and base is not None
                                  and p50 > 1.5 * base + 0.5)
    step["kept_up"] = bool(step["results"] == step["studies"]
                           and step["send_failures_count"] == 0
                           and step["statuses"].get("SUCCEEDED") == step["studies"]
                           and not step["trend"]["grows"] and not step["above_baseline"])


def feed(service: common.Service, db: Path, pool: list[Dataset], syntax: str,
         rate: float, first: int, count: int, directory: Path
         ) -> tuple[list[Send], dict[str, dict[str, Any]], float]:
    """``count`` new studies sent at ``rate``: the sends, their result documents, and the
    seconds the sends took."""
    sends = write_studies(pool, directory, first, count)
    began = time.monotonic()
    send_on_schedule(service.port, sends, rate, SYNTAXES[syntax][1])
    send_window = time.monotonic() - began
    docs = wait_results(db, [s.accession for s in sends], limit_s=60.0 + count / rate)
    for send in sends:
        send.path.unlink(missing_ok=True)
    return sends, docs, send_window


def summarize(service: common.Service, syntax: str, rate: float, sends: list[Send],
              docs: dict[str, dict[str, Any]], send_window: float) -> dict[str, Any]:
    count = len(sends)
    lat = latencies(sends, docs)
    failures = [s.error for s in sends if s.returncode != 0]
    statuses: dict[str, int] = {}
    for doc in docs.values():
        statuses[doc["status"]] = statuses.get(doc["status"], 0) + 1
    trend = grows(lat["scheduled_to_stored"])
    stored_times = sorted(_ts(d["pxsgate"]["stages"]["stored"]) for d in docs.values())
    return {
        "syntax": syntax, "rate_per_s": rate, "studies": count, "results": len(docs),
        "statuses": statuses, "send_failures": failures[:5], "send_failures_count": len(failures),
        "send_window_s": round(send_window, 2),
        "completion_rate_per_s": (round((len(stored_times) - 1)
                                        / (stored_times[-1] - stored_times[0]), 3)
                                  if len(stored_times) > 1 and stored_times[-1] > stored_times[0]
                                  else None),
        "latency_s": {k: common.percentiles(v) for k, v in lat.items()},
        "trend": trend,
        "batches_so_far": dict(sorted(service.batches.items())),
    }


def run_step(service: common.Service, db: Path, pool: list[Dataset], syntax: str,
             rate: float, first: int, count: int, directory: Path) -> dict[str, Any]:
    return summarize(service, syntax, rate,
                     *feed(service, db, pool, syntax, rate, first, count, directory))


# Decode on arrival against the reference, in blocks of studies sent to one service then
# the other, ABBA: a machine whose load drifts during the run weighs on both alike.
COMPARE_ORDER = (True, False, False, True)


def compare_on_arrival(services: dict[bool, tuple[common.Service, Path]],
                       pool: list[Dataset], syntax: str, rate: float, first: int,
                       count: int, directory: Path) -> list[dict[str, Any]]:
    """``count`` studies at ``rate`` into each service (decode on arrival on: True, off:
    False), interleaved in blocks; a step of each, the reference marked
    ``decode_on_arrival`` False."""
    block = max(1, -(-count // 2))  # two blocks each
    fed: dict[bool, tuple[list[Send], dict[str, dict[str, Any]], float]] = {
        True: ([], {}, 0.0), False: ([], {}, 0.0)}
    sent = {True: 0, False: 0}
    for on in COMPARE_ORDER:
        size = min(block, count - sent[on])
        if size <= 0:
            continue
        service, db = services[on]
        sends, docs, window = feed(service, db, pool, syntax, rate, first, size, directory)
        first += size
        sent[on] += size
        all_sends, all_docs, all_window = fed[on]
        fed[on] = (all_sends + sends, all_docs | docs, all_window + window)
    steps = []
    for on in (True, False):
        step = summarize(services[on][0], syntax, rate, *fed[on])
        judge(step, baseline=None)
        step["decode_on_arrival"] = on
        step["interleaved_with"] = "decode-on-arrival off" if on else "decode-on-arrival on"
        steps.append(step)
        print_step(step, count, " (decode on arrival, interleaved)" if on
                   else " (decode-on-arrival off: the reference, interleaved)")
    return steps


def sweep(args: argparse.Namespace, device: str) -> dict[str, Any]:
    kind = "gpu" if device.startswith("cuda") else "cpu"
    steps: list[dict[str, Any]] = []
    sustained: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pxsgate-e2e-") as tmp:
        root = Path(tmp)
        pools = {}
        for syntax in args.syntaxes:
            t = time.perf_counter()
            pools[syntax] = make_pool(syntax, args.pool, args.rows, args.cols)
            print(f"pool of {args.pool} {syntax} images in {time.perf_counter() - t:.1f} s",
                  flush=True)
        http_port = common.free_port()
        config = common.write_config(root / "pxsgate.yaml", root / "data", http_port=http_port,
                                     weights=args.weights, device=args.device,
                                     settle=args.settle, pictures=args.pictures == "on")
        service = common.start_service(config)
        db = root / "data" / "pxsgate.sqlite3"
        compared = [s for s in args.syntaxes if s in args.off_reference]
        # The reference for decode on arrival: a service with it off, idle beside the
        # other except while its blocks of the comparison are sent.
        reference: common.Service | None = None
        reference_steps: list[dict[str, Any]] = []
        number = 0
        try:
            reference_port = common.free_port()
            if compared:
                reference = common.start_service(common.write_config(
                    root / "reference.yaml", root / "reference-data",
                    http_port=reference_port, weights=args.weights, device=args.device,
                    settle=args.settle, pictures=args.pictures == "on",
                    decode_on_arrival=False))
            services = {True: (service, db)}
            if reference is not None:
                services[False] = (reference, root / "reference-data" / "pxsgate.sqlite3")
            for syntax in args.syntaxes:
                # Warm-up (not measured): the first decode of this syntax, the first batch.
                for warmed, warm_db in services.values():
                    warm = write_studies(pools[syntax], root / "warm", 900_000 + number, 2)
                    number += 2
                    for send in warm:
                        storescu(warmed.port, send, SYNTAXES[syntax][1])
                    wait_results(warm_db, [s.accession for s in warm], limit_s=120.0)
                rates = rates_of(args, kind, syntax)
                if syntax in compared:
                    reference_steps += compare_on_arrival(
                        services, pools[syntax], syntax, rates[0], number, args.studies,
                        root / "studies")
                    number += 2 * args.studies
                best = None
                for rate in rates:
                    step = run_step(service, db, pools[syntax], syntax, rate, number,
                                    args.studies, root / "studies")
                    number += args.studies
                    judge(step, baseline=next(
                        (s for s in steps if s["syntax"] == syntax), None))
                    steps.append(step)
                    print_step(step, args.studies)
                    if not step["kept_up"]:
                        break
                    best = rate
                    if service.process.poll() is not None:
                        break
                sustained[syntax] = {
                    "rate_per_s": best, "studies_per_hour": best and round(best * 3600),
                    "studies_per_day": best and round(best * 86400),
                    "highest_rate_tried": rate,
                    "bounded_above": not steps[-1]["kept_up"],
                }
            # What decoding on arrival did, in each service (the reference's: none).
            decodes = {"service": decode_counts(http_port)}
            if reference is not None:
                decodes["reference"] = decode_counts(reference_port)
        finally:
            exit_code = common.stop_service(service)
            reference_exit = None if reference is None else common.stop_service(reference)
    model = service.events.get("model.loaded", {})
    return {"steps": steps, "sustained": sustained, "service_exit_code": exit_code,
            "on_arrival_steps": reference_steps, "reference_exit_code": reference_exit,
            "decodes": decodes,
            "model": {k: model.get(k) for k in ("device", "precision", "weights_sha256")},
            "goal_kind": kind, "log_levels": dict(service.levels),
            "log_tail": list(service.tail)[-10:] if exit_code != 0 else []}


def rates_of(args: argparse.Namespace, kind: str, syntax: str) -> list[float]:
    return [float(r) for r in (args.rates if args.rates != "auto"
                               else DEFAULT_RATES[kind, syntax]).split(",")]


def print_step(step: dict[str, Any], studies: int, label: str = "") -> None:
    lat = step["latency_s"]
    print(f"  {step['syntax']:<4} {step['rate_per_s']:6.2f}/s{label}  {step['results']}/"
          f"{studies} stored  release->stored p50 {lat['release_to_stored']['p50']} s "
          f"p95 {lat['release_to_stored']['p95']} s  ready->stored p50 "
          f"{lat['ready_to_stored']['p50']} s p99 "
          f"{lat['ready_to_stored']['p99']} s  trend {step['trend']}  "
          f"{'keeps up' if step['kept_up'] else 'latency grows'}", flush=True)


def on_arrival_row(figures: dict[str, Any], syntax: str, name: str) -> dict[str, Any] | None:
    """Release -> stored with decode on arrival (the default) beside the same with it off,
    from the interleaved comparison of the same run; None without one."""
    pair = {s["decode_on_arrival"]: s for s in figures.get("on_arrival_steps") or ()
            if s["syntax"] == syntax}
    if set(pair) != {True, False}:
        return None
    on, off = pair[True]["latency_s"], pair[False]["latency_s"]
    on_p50, off_p50 = on["release_to_stored"]["p50"], off["release_to_stored"]["p50"]
    settle = figures["settle_seconds"]
    goal = syntax == "j2k" and on_p50 is not None
    return common.headline(
        f"e2e {name}: association release -> result stored, p50 at "
        f"{pair[True]['rate_per_s']:g}/s, decode on arrival (default) vs when ready",
        on_p50, "s",
        spread_text=f"ready -> stored p50 {on['ready_to_stored']['p50']} s vs "
                    f"{off['ready_to_stored']['p50']} s when ready",
        reference=f"preprocess.decode-on-arrival off, same run, interleaved: {off_p50} s",
        ratio=off_p50 / on_p50 if on_p50 and off_p50 else None,
        goal=f"<= settle + 0.4 s ({settle + 0.4:g} s)" if syntax == "j2k" else "",
        met=bool(on_p50 <= settle + 0.4) if goal else None)


def headlines(figures: dict[str, Any]) -> list[dict[str, Any]]:
    kind = figures["goal_kind"]
    goal_ready = GOAL_READY_S[kind]
    machine = "this 2-core CPU" if kind == "cpu" else "one H100"
    rows = []
    for syntax in figures["args"]["syntaxes"]:
        steps = [s for s in figures["steps"] if s["syntax"] == syntax]
        if not steps:
            continue
        low = steps[0]  # the lowest rate: latency without queueing
        lat = low["latency_s"]
        name = f"{figures['image']} {SYNTAXES[syntax][0]}"
        ready = lat["ready_to_stored"]
        if ready["p50"] is not None:
            rows.append(common.headline(
                f"e2e {name}: study ready -> result stored, p50 at {low['rate_per_s']:g}/s",
                ready["p50"], "s", spread_text=f"p95 {ready['p95']}, p99 {ready['p99']}",
                goal=f"< {goal_ready:g} s on {machine}" if syntax == "raw" else "",
                met=ready["p50"] < goal_ready if syntax == "raw" else None))
        release = lat["release_to_stored"]
        if release["p50"] is not None:
            rows.append(common.headline(
                f"e2e {name}: association release -> result stored, p50 (includes the "
                f"{figures['settle_seconds']:g} s settle)", release["p50"], "s",
                spread_text=f"p95 {release['p95']}, p99 {release['p99']}",
                reference=f"paper: ~{PAPER_STUDY_S:g} s per study",
                ratio=PAPER_STUDY_S / release["p50"] if release["p50"] else None))
        if (row := on_arrival_row(figures, syntax, name)) is not None:
            rows.append(row)
        inferred = lat["ready_to_inferred"]
        if inferred["p50"] is not None:
            rows.append(common.headline(
                f"e2e {name}: study ready -> scores back (decode, preprocessing, model), p50",
                inferred["p50"], "s", spread_text=f"p95 {inferred['p95']}",
                reference=f"paper: {PAPER_INFERENCE_S:g} s of inference",
                ratio=PAPER_INFERENCE_S / inferred["p50"] if inferred["p50"] else None))
        sus = figures["sustained"].get(syntax, {})
        per_day = sus.get("studies_per_day")
        bound = "" if sus.get("bounded_above") else " (every rate tried kept up: at least)"
        rows.append(common.headline(
            f"e2e {name}: sustained single-image studies/day{bound}", per_day, "studies/day",
            spread_text=(f"{sus.get('rate_per_s')}/s kept up; "
                         f"{sus.get('highest_rate_tried')}/s "
                         f"{'did not' if sus.get('bounded_above') else 'did'}"),
            goal=f">= {GOAL_STUDIES_PER_DAY:,}/day on one GPU host" if syntax == "raw" else "",
            met=(per_day is not None and per_day >= GOAL_STUDIES_PER_DAY)
            if kind == "gpu" and syntax == "raw" else None))
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="auto",
                   help="comma-separated studies/s, ascending (auto: by device and syntax)")
    p.add_argument("--studies", type=int, default=30, help="studies per rate (default 30)")
    p.add_argument("--syntaxes", type=lambda s: s.split(","), default=["raw", "j2k"],
                   help="comma-separated: raw (explicit VR LE), j2k (JPEG 2000 lossless)")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--cols", type=int, default=2500)
    p.add_argument("--pool", type=int, default=4, help="distinct synthetic radiographs")
    p.add_argument("--device", default="auto", help="model.device (default auto)")
    p.add_argument("--weights", default="demo")
    p.add_argument("--pictures", choices=("on", "off"), default="on",
                   help="pictures.enabled (default on; off: what thumbnails and model "
                        "inputs cost, by comparison)")
    p.add_argument("--settle", type=float, default=None,
                   help="assembly.settle-seconds (default: the service's default, 2 s)")
    p.add_argument("--off-reference", type=lambda s: [x for x in s.split(",") if x],
                   default=["j2k"],
                   help="comma-separated syntaxes whose lowest rate is run again by a service "
                        "with preprocess.decode-on-arrival off, the reference (default j2k; "
                        "empty: none)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    unknown = (set(args.syntaxes) | set(args.off_reference)) - set(SYNTAXES)
    if unknown:
        parser().error(f"unknown syntax {sorted(unknown)}; choose from {sorted(SYNTAXES)}")
    device = common.resolve_device(args.device)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "benchmark": "e2e",
        "environment": common.environment(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "image": f"{args.cols}x{args.rows} 12-bit CR",
        "settle_seconds": (Config().assembly.settle_seconds if args.settle is None
                           else args.settle),
        "sender": f"DCMTK storescu {common.dcmtk_version()}, one process and association "
                  "per study",
    }
    figures.update(sweep(args, device))
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["ok"] = (figures["service_exit_code"] == 0
                     and figures["reference_exit_code"] in (0, None)
                     and all(s["results"] == s["studies"] for s in figures["steps"]
                             if s["kept_up"])
                     and all(s["results"] == s["studies"]
                             for s in figures["on_arrival_steps"]))
    figures["headline"] = headlines(figures)
    out = common.save("e2e", figures, args.out)
    for row in figures["headline"]:
        print(f"  {row['metric']}: {row['value']} {row['unit']} ({row['spread']})"
              + (f"; {row['ratio']:.1f}x vs {row['reference']}" if row["ratio"] else ""))
    print(f"  figures: {out}")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
