"""Result documents in SQLite: JSON text on the bundled SQLite against a modern SQLite build,
as JSON text and as JSONB, side by side in one run on the same synthetic documents.

    .venv/bin/python -m benchmarks.store_json [--rows 20000] [--repeats 3] [--batch 500]
        [--modern-python /tmp/jsonb-venv/bin/python] [--modern-module auto] [--out FILE]

The modern SQLite comes from a wheel installed in a separate virtual environment, never the
project's (``python3 -m venv /tmp/jsonb-venv && /tmp/jsonb-venv/bin/pip install sqlean.py``,
or ``pysqlite3-binary``). This script measures variant (a) in-process and runs itself under
``--modern-python`` (``--worker``, standard library only) for (b) and (c), importing
``sqlean`` or ``pysqlite3`` as a drop-in for ``sqlite3``; the repeats are interleaved
(a, b+c, b+c, a, ...) so that drift on a shared machine hits every variant alike. Without
``--modern-python`` only (a) is measured, and the output says so.

Variants (the table of ``pxsgate.store``, trimmed to the columns that matter here, with
indexes on study_instance_uid, patient_id, status and created_at; WAL, synchronous=FULL):
  (a) stdlib sqlite3 (3.40 here), ``document TEXT CHECK (json_valid(document))``
  (b) the modern build, the same JSON text table
  (c) the modern build, ``document BLOB CHECK (json_valid(document, 8))`` filled with
      ``jsonb(?)``, read back as ``json(document)``

Measured for each, once per repeat, on a fresh database file in a temporary directory on disk:
  insert         documents/s, one transaction (and so one WAL fsync) per document, as the
                 service stores results; the JSON text is serialised beforehand (json.dumps
                 costs the same for every variant and is reported on its own)
  bulk insert    documents/s, executemany in transactions of --batch documents, fresh file
  read           µs per row: ``SELECT document .. WHERE study_instance_uid = ?`` + json.loads
                 for every row in a shuffled order (the API path); also without json.loads
                 (what an exporter that forwards the text pays)
  view scan      µs per row: five json_extract() over every row, like the SQL views
  size           database bytes per document after a WAL checkpoint (table + indexes), and the
                 mean stored length of the document column alone
Writes benchmarks/results/store-json-cpu-<date>.json (atomically) and prints a table with the
medians, min-max over the repeats and the ratios of (b) and (c) to (a).

What bounds it: the documents are ~2-3 KB and fit in one 4 KiB page each, so a read by index is
a B-tree lookup plus one row, and the JSON cost is a small part of it; the per-document insert
is bound by the WAL fsync; the scan is bound by parsing (text) or walking (JSONB) each
document. Reads run from a warm OS page cache (the file is read once before they are timed),
as they would on a server whose database fits in memory. The machine this was written on has
2 cores and is shared (tests may run at the same time): timings are noisy, hence the repeats
and the spread; the load average before and after each repeat is saved with the figures.
Differences between the two SQLite builds are not only the version: their compile options
(saved in the JSON) differ too, e.g. Debian's build has SECURE_DELETE and OMIT_LOOKASIDE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

UID_ROOT = "1.2.826.0.1.3680043.8.498."
VIEW_PATHS = (
    "$.pxsgate.headline.value",
    "$.model.version",
    "$.pxsgate.stages.ready",
    "$.pxsgate.stages.stored",
    "$.exitCode",
)

# kind -> (column type, CHECK expression, insert expression, read expression)
KINDS: dict[str, tuple[str, str, str, str]] = {
    "text": ("TEXT", "json_valid(document)", "?", "document"),
    "jsonb": ("BLOB", "json_valid(document, 8)", "jsonb(?)", "json(document)"),
}

METRICS: tuple[tuple[str, str, bool], ...] = (
    # key, column heading, higher is better
    ("insert_docs_per_s", "insert docs/s (1 commit each)", True),
    ("bulk_docs_per_s", "bulk insert docs/s", True),
    ("read_us_per_row", "read by index µs/row (+json.loads)", False),
    ("read_fetch_us_per_row", "read by index µs/row (text only)", False),
    ("scan_us_per_row", "view scan µs/row (5 json_extract)", False),
    ("bytes_per_doc", "file bytes/doc", False),
    ("document_bytes", "document column bytes", False),
)


# ---------------------------------------------------------------------------------------------
# Synthetic documents (standard library only: the worker runs in another virtual environment)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}+00:00"


def make_documents(rows: int, seed: int) -> list[dict[str, Any]]:
    """``rows`` result documents like the service writes, deterministic in ``seed`` (the same
    documents in every process that calls this with the same arguments)."""
    rng = random.Random(seed)
    models = [
        {"id": f"PxsScore-{v}", "name": "PxsScore", "displayName": "PxsScore", "version": v,
         "author": "Data Science", "description": "PXS score model on chest x-rays",
         "createdAt": created, "weightsSha256": rng.randbytes(32).hex(),
         "anchorsSha256": rng.randbytes(32).hex(), "anchorCount": 10,
         "runtime": {"device": "cpu", "precision": "fp32"}}
        for v, created in (("0.1", "2026-11-26T17:31:10.000+00:00"),
                           ("0.2", "2026-12-02T09:12:44.000+00:00"))
    ]
    sites = ["Hospital", "North Campus", "Children's", "Imaging Center East"]
    views = [("CHEST AP PORTABLE", "ap-in-description", "names AP"),
             ("CHEST PA", "pa-in-description", "names PA"),
             ("CHEST LAT", "lateral", "names LAT")]
    start = datetime(2026, 11, 26, 17, 31, 16, 459000, tzinfo=UTC)

    def uid() -> str:
        return UID_ROOT + str(rng.getrandbits(116) + 10**20)

    documents = []
    for i in range(rows):
        received = start + timedelta(seconds=i * 41 + rng.random() * 30)
        released = received + timedelta(milliseconds=rng.randint(200, 900))
        ready = released + timedelta(milliseconds=rng.randint(300, 2500))
        inferred = ready + timedelta(milliseconds=rng.randint(80, 600))
        study_time = received - timedelta(days=rng.randint(0, 3), seconds=rng.randint(60, 9000))
        failed = rng.random() < 0.04
        series, sop = uid(), uid()
        score = f"{rng.uniform(0.0, 18.0):.6f}"
        images = []
        for k in range(rng.randint(1, 3)):
            acquired = (study_time + timedelta(seconds=k)).strftime("%Y%m%d%H%M%S")
            if k == 0:
                desc, rule, names = rng.choice(views[:2])
                images.append({"sopInstanceUid": sop, "selected": True, "rule": rule,
                               "reason": f"SeriesDescription '{desc}' {names}",
                               "acquired": acquired})
            else:
                rule, reason = rng.choice([
                    ("cath-copy", "DerivationDescription 'CATH' names CATH"),
                    ("lateral", "SeriesDescription 'CHEST LAT' names LAT"),
                    ("duplicate", "same acquisition as an image already selected"),
                ])
                images.append({"sopInstanceUid": uid(), "selected": False, "rule": rule,
                               "reason": reason, "acquired": acquired})
        flags = [] if rng.random() < 0.9 else [rng.choice(["low-confidence", "outside-range"])]
        ref = {"refSeriesInstanceUid": series, "refSopInstanceUid": [sop]}
        documents.append({
            "version": "0.2.4",
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "status": "FAILED" if failed else "SUCCEEDED",
            "studyInstanceUid": uid(),
            "patientId": f"MRN{rng.randint(0, 999999):06d}",
            "accessionNumber": f"E{rng.randint(0, 999999):06d}",
            "siteId": rng.choice(sites),
            "createdAt": _iso(inferred),
            "updatedAt": _iso(inferred + timedelta(milliseconds=rng.randint(0, 40))),
            "exitCode": 1 if failed else 0,
            "errorMessage": "inference failed: image has no usable lung field" if failed else "",
            "model": models[0] if i < rows * 0.7 else models[1],
            "results": [] if failed else [{
                "code": "partners.clara.pxs.score", "value": score, "description": "PXS Score",
                "derivedFrom": [ref], "presentOn": [ref], "refEntities": []}],
            "entities": [],
            "pxsgate": {
                "version": "0.1.0",
                "flags": flags,
                "headline": None if failed else {"sopInstanceUid": sop, "value": score},
                "selection": {
                    "candidate": True, "rule": "chest-radiograph",
                    "reason": ("Modality is 'CR'; BodyPartExamined is 'CHEST'; "
                               "1 model input image(s)"),
                    "images": images},
                "stages": {"received": _iso(received), "released": _iso(released),
                           "ready": _iso(ready), "inferred": _iso(inferred),
                           "stored": _iso(inferred)},
                "studyDateTime": study_time.strftime("%Y-%m-%dT%H:%M:%S"),
                "senders": ["RMS"] if rng.random() < 0.8 else ["RMS", "PACS"],
            },
        })
    return documents


def serialise(documents: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(d, separators=(",", ":")) for d in documents]


def data_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One variant, one repeat


def import_sqlite(name: str) -> tuple[ModuleType, str]:
    """The DB-API module and the distribution that provides it ('auto': sqlean, else
    pysqlite3)."""
    from importlib import import_module, metadata

    candidates = {"auto": ["sqlean", "pysqlite3"]}.get(name, [name])
    for candidate in candidates:
        try:
            if candidate == "sqlite3":
                return import_module("sqlite3"), f"python {platform.python_version()} stdlib"
            if candidate == "sqlean":
                return import_module("sqlean"), f"sqlean.py {metadata.version('sqlean.py')}"
            if candidate == "pysqlite3":
                return (import_module("pysqlite3.dbapi2"),
                        f"pysqlite3-binary {metadata.version('pysqlite3-binary')}")
        except ImportError:
            continue
    raise SystemExit(f"cannot import a SQLite module for {name!r} (tried {candidates}) "
                     f"under {sys.executable}")


def connect(db: ModuleType, path: Path) -> Any:
    conn = db.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def create(conn: Any, kind: str) -> None:
    column, check, _, _ = KINDS[kind]
    conn.executescript(f"""
        CREATE TABLE results (
            id                 TEXT PRIMARY KEY,
            study_instance_uid TEXT NOT NULL,
            patient_id         TEXT NOT NULL,
            status             TEXT NOT NULL,
            created_at         TEXT NOT NULL,
            document           {column} NOT NULL CHECK ({check})
        );
        CREATE INDEX results_study ON results (study_instance_uid);
        CREATE INDEX results_patient ON results (patient_id);
        CREATE INDEX results_status ON results (status);
        CREATE INDEX results_created ON results (created_at);
    """)


def run_variant(db: ModuleType, kind: str, documents: list[dict[str, Any]], texts: list[str],
                batch: int, seed: int, tmp_root: str | None) -> dict[str, Any]:
    _, _, insert_expr, read_expr = KINDS[kind]
    insert = (f"INSERT INTO results (id, study_instance_uid, patient_id, status, created_at, "
              f"document) VALUES (?, ?, ?, ?, ?, {insert_expr})")
    rows = [(d["id"], d["studyInstanceUid"], d["patientId"], d["status"], d["createdAt"], t)
            for d, t in zip(documents, texts, strict=True)]
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pxsgate-store-json-", dir=tmp_root) as tmp:
        # bulk: fresh file, transactions of `batch` documents
        conn = connect(db, Path(tmp) / "bulk.db")
        create(conn, kind)
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            conn.executemany(insert, rows[i:i + batch])
            conn.commit()
        figures["bulk_docs_per_s"] = len(rows) / (time.perf_counter() - started)
        conn.close()

        # one transaction per document, as the service does; this file is the one read below
        path = Path(tmp) / "results.db"
        conn = connect(db, path)
        create(conn, kind)
        started = time.perf_counter()
        for row in rows:
            conn.execute(insert, row)
            conn.commit()
        figures["insert_docs_per_s"] = len(rows) / (time.perf_counter() - started)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        files = [p for p in Path(tmp).iterdir() if p.name.startswith("results.db")]
        figures["bytes_per_doc"] = sum(p.stat().st_size for p in files) / len(rows)

        conn = connect(db, path)
        count, total = conn.execute(
            "SELECT count(*), sum(length(document)) FROM results").fetchone()  # warms the cache
        assert count == len(rows)
        figures["document_bytes"] = total / count

        uids = [d["studyInstanceUid"] for d in documents]
        random.Random(seed + 1).shuffle(uids)
        select = f"SELECT {read_expr} FROM results WHERE study_instance_uid = ?"
        started = time.perf_counter()
        for u in uids:
            conn.execute(select, (u,)).fetchone()
        figures["read_fetch_us_per_row"] = (time.perf_counter() - started) / len(uids) * 1e6
        loads = json.loads
        started = time.perf_counter()
        for u in uids:
            loads(conn.execute(select, (u,)).fetchone()[0])
        figures["read_us_per_row"] = (time.perf_counter() - started) / len(uids) * 1e6

        scan = ("SELECT id, " + ", ".join(f"json_extract(document, '{p}')" for p in VIEW_PATHS)
                + " FROM results")
        started = time.perf_counter()
        scanned = conn.execute(scan).fetchall()
        figures["scan_us_per_row"] = (time.perf_counter() - started) / len(scanned) * 1e6

        # untimed checks: the documents come back as they went in, the view fields are right
        by_id = {d["id"]: d for d in documents}
        sample = random.Random(seed + 2).sample(range(len(documents)), min(200, len(documents)))
        for i in sample:
            (text,) = conn.execute(select, (documents[i]["studyInstanceUid"],)).fetchone()
            assert json.loads(text) == documents[i], f"{kind}: document {i} differs"
            assert text == texts[i], f"{kind}: document {i} text differs"
        for row in scanned[:500]:
            d = by_id[row[0]]
            expected = ((d["pxsgate"]["headline"] or {}).get("value"), d["model"]["version"],
                        d["pxsgate"]["stages"]["ready"], d["pxsgate"]["stages"]["stored"],
                        d["exitCode"])
            assert tuple(row[1:]) == expected, f"{kind}: view fields differ for {row[0]}"
        figures["stored_type"] = conn.execute(
            "SELECT typeof(document) FROM results LIMIT 1").fetchone()[0]
        conn.close()
    return figures


def describe(db: ModuleType, provider: str) -> dict[str, Any]:
    conn = db.connect(":memory:")
    options = [r[0] for r in conn.execute("PRAGMA compile_options")]
    pragmas = {p: conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "cache_size")}
    conn.close()
    return {"sqlite_version": db.sqlite_version, "module": db.__name__, "provider": provider,
            "python": sys.version.split()[0], "executable": sys.executable,
            "compile_options": options, **pragmas}


def measure(module: str, kinds: list[str], rows: int, batch: int, seed: int,
            tmp_root: str | None) -> dict[str, Any]:
    """Run each of ``kinds`` once with the SQLite module ``module`` (this process)."""
    db, provider = import_sqlite(module)
    if "jsonb" in kinds and db.sqlite_version_info < (3, 45, 0):
        raise SystemExit(f"SQLite {db.sqlite_version} has no JSONB (3.45+)")
    documents = make_documents(rows, seed)
    texts = serialise(documents)
    out: dict[str, Any] = {"sqlite": describe(db, provider), "data_hash": data_hash(texts),
                           "figures": {}}
    for kind in kinds:
        out["figures"][kind] = run_variant(db, kind, documents, texts, batch, seed, tmp_root)
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def modern_once(python: str, module: str, kinds: list[str], args: argparse.Namespace
                ) -> dict[str, Any]:
    command = [python, str(Path(__file__).resolve()), "--worker", "--modern-module", module,
               "--kinds", ",".join(kinds), "--rows", str(args.rows), "--batch", str(args.batch),
               "--seed", str(args.seed)]
    if args.tmpdir:
        command += ["--tmpdir", args.tmpdir]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"the modern worker failed ({' '.join(command)}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def cell(s: dict[str, Any]) -> str:
    if s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def json_costs(rows: int, seed: int) -> dict[str, float]:
    """json.dumps and json.loads alone, µs per document (context for the figures)."""
    documents = make_documents(min(rows, 5000), seed)
    started = time.perf_counter()
    texts = serialise(documents)
    dumps = (time.perf_counter() - started) / len(texts) * 1e6
    started = time.perf_counter()
    for t in texts:
        json.loads(t)
    loads = (time.perf_counter() - started) / len(texts) * 1e6
    return {"dumps_us_per_doc": dumps, "loads_us_per_doc": loads}


def run(args: argparse.Namespace) -> dict[str, Any]:
    labels = {"a": "(a) stdlib sqlite3, JSON text"}
    runs: dict[str, list[dict[str, Any]]] = {"a": []}
    sqlite: dict[str, Any] = {}
    loads: list[dict[str, Any]] = []
    reference_hash = data_hash(serialise(make_documents(args.rows, args.seed)))
    for r in range(args.repeats):
        before = loadavg()
        order = ["a", "modern"] if r % 2 == 0 else ["modern", "a"]
        for step in order:
            started = time.perf_counter()
            if step == "a":
                out = measure("sqlite3", ["text"], args.rows, args.batch, args.seed, args.tmpdir)
                sqlite["a"] = out["sqlite"]
                runs["a"].append(out["figures"]["text"])
            elif args.modern_python:
                kinds = ["text", "jsonb"] if r % 2 == 0 else ["jsonb", "text"]
                out = modern_once(args.modern_python, args.modern_module, kinds, args)
                for key, kind in (("b", "text"), ("c", "jsonb")):
                    sqlite[key] = out["sqlite"]
                    runs.setdefault(key, []).append(out["figures"][kind])
            else:
                continue
            if out["data_hash"] != reference_hash:
                raise SystemExit(f"{step}: different documents ({out['data_hash']} != "
                                 f"{reference_hash}); same Python version needed")
            print(f"repeat {r + 1}/{args.repeats}: {step} done in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        loads.append({"repeat": r + 1, "loadavg_before": before, "loadavg_after": loadavg()})
    if "b" in sqlite:
        name = sqlite["b"]["provider"]
        labels["b"] = f"(b) {name}, JSON text"
        labels["c"] = f"(c) {name}, JSONB"
    variants: dict[str, Any] = {}
    for key, figures in runs.items():
        variants[key] = {
            "label": labels[key],
            "sqlite_version": sqlite[key]["sqlite_version"],
            "stored_type": figures[0]["stored_type"],
            **{m: summary([f[m] for f in figures]) for m, _, _ in METRICS},
        }
    for key in ("b", "c"):
        if key in variants:
            variants[key]["vs_a"] = {m: variants[key][m]["median"] / variants["a"][m]["median"]
                                     for m, _, _ in METRICS}
    return {"variants": variants, "sqlite": sqlite, "load": loads, "data_hash": reference_hash,
            "json_costs": json_costs(args.rows, args.seed)}


def table(result: dict[str, Any]) -> str:
    variants = result["variants"]
    head = ["variant", "SQLite", *[h for _, h, _ in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants.values():
        lines.append("| " + " | ".join([v["label"], v["sqlite_version"],
                                         *[cell(v[m]) for m, _, _ in METRICS]]) + " |")
    ratios = [k for k in ("b", "c") if k in variants]
    if ratios:
        lines += ["", "Ratios of medians to (a): throughput as x/(a), times and sizes as "
                  "x/(a) too (so > 1 is better for the first two columns, < 1 for the rest).",
                  "", "| variant | " + " | ".join(h for _, h, _ in METRICS) + " |",
                  "|" + "---|" * (len(METRICS) + 1)]
        for k in ratios:
            v = variants[k]
            lines.append("| " + v["label"] + " | "
                         + " | ".join(f"{v['vs_a'][m]:.2f}" for m, _, _ in METRICS) + " |")
    else:
        lines += ["", "Only (a) measured: no --modern-python given, so no modern SQLite "
                  "(JSON text or JSONB) to compare with."]
    costs = result["json_costs"]
    lines += ["", f"json.dumps {costs['dumps_us_per_doc']:.1f} µs/doc, json.loads "
              f"{costs['loads_us_per_doc']:.1f} µs/doc (outside the insert timings; "
              "json.loads is inside the first read column)."]
    return "\n".join(lines)


def headlines(data: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks import common  # not at the top: the --worker runs on the stdlib alone

    variants = data["variants"]
    a = variants["a"]
    c = variants.get("c")
    rows = []
    for metric, label, unit in (("insert_docs_per_s", "store: result inserts, one commit each",
                                 "docs/s"),
                                ("read_us_per_row", "store: whole document read by index",
                                 "µs/doc"),
                                ("scan_us_per_row", "store: view scan (5 json_extract)",
                                 "µs/row")):
        if metric not in a:
            continue
        rows.append(common.headline(
            f"{label} (JSON text, SQLite {data['sqlite']['a']['sqlite_version']})",
            round(a[metric]["median"], 1), unit,
            spread_text=f"{fmt(a[metric]['min'])}-{fmt(a[metric]['max'])}",
            reference=(f"JSONB, SQLite {data['sqlite']['c']['sqlite_version']}"
                       if c else ""),
            # As every ratio in the summary: how many times faster than the reference.
            ratio=(None if not c else a[metric]["median"] / c[metric]["median"]
                   if unit == "docs/s" else c[metric]["median"] / a[metric]["median"])))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_json",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="documents per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="documents per bulk transaction")
    parser.add_argument("--modern-python", help="interpreter with sqlean.py or pysqlite3-binary")
    parser.add_argument("--modern-module", default="auto",
                        choices=["auto", "sqlean", "pysqlite3"])
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--tmpdir", help="where the database files go (default: system temp)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where the JSON goes (default: benchmarks/results/)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kinds", default="text,jsonb", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1 or args.batch < 1:
        parser.error("--rows, --repeats and --batch must be positive")

    if args.worker:
        out = measure(args.modern_module, args.kinds.split(","), args.rows, args.batch,
                      args.seed, args.tmpdir)
        json.dump(out, sys.stdout)
        return None

    if not args.modern_python:
        print("no --modern-python given: measuring (a), the stdlib sqlite3, only",
              file=sys.stderr)
    t0 = time.perf_counter()
    result = run(args)
    elapsed = time.perf_counter() - t0
    report = table(result)
    for key, info in result["sqlite"].items():
        print(f"{result['variants'][key]['label']}: SQLite {info['sqlite_version']} "
              f"({info['provider']}, {info['executable']})")
    print()
    print(report)
    from benchmarks import common

    data = {
        "benchmark": "store_json",
        "environment": common.environment("cpu"),
        "parameters": {"rows": args.rows, "repeats": args.repeats, "batch": args.batch,
                       "seed": args.seed, "modern_python": args.modern_python,
                       "modern_module": args.modern_module, "view_paths": list(VIEW_PATHS),
                       "pragmas": {"journal_mode": "WAL", "synchronous": "FULL"}},
        "modern_measured": bool(args.modern_python),
        "elapsed_s": round(elapsed, 1),
        **result,
        "table": report,
    }
    data["headline"] = headlines(data)
    data["ok"] = True
    out = common.save("store_json", data, args.out)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return data


if __name__ == "__main__":
    main()
