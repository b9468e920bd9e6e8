"""The store on SQLite beside PostgreSQL: result inserts and document reads through the
Store API the service uses, on the same synthetic results, in one run.

    .venv/bin/python -m benchmarks.store_backends [--results 2000] [--repeats 3] [--out DIR]

PostgreSQL is a private cluster of Debian's postgresql started for the run (tests/postgres.py:
initdb in a temp dir, a loopback port, ``fsync`` on and ``synchronous_commit`` on, as a
production server runs, unlike the tests' cluster). SQLite is the default store: WAL,
synchronous=FULL. Each repeat fills a fresh database of each backend, alternating which goes
first, so drift on a shared machine hits both alike.

Measured for each backend and repeat:
  insert      results/s: ``store_result`` (the result, its image's embedding and one
              delivery, one transaction and so one commit each), as the service stores them
  read        ms per document: ``results(ResultFilter(study_uid=...))`` for every study in a
              shuffled order (the API's and CLI's path: one indexed lookup and json.loads; on
              PostgreSQL also the document's key order restored through its model)
  prior       ms per lookup: ``prior_image`` of a patient with earlier studies (change over
              time, once per stored result)
  researcher  ms for ``researcher_rows()`` over every result (the view with its JSON fields)

The reference for PostgreSQL's rows is SQLite's, in the same run (x ref above 1: PostgreSQL
faster). No goal: PostgreSQL buys several gateways and one place to query, not speed on one
host; the figures say what it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from benchmarks import common
from pxsgate.records import ScoredImage, Status, StudyState, now_iso
from pxsgate.results import ModelInfo, StudyIdentity, build_document
from pxsgate.store import ResultFilter, Store, StudyEmbeddings
from pxsgate.store.results import ImageEmbedding

MODEL = ModelInfo("PxsScore", "0.1", "bench", "store backends", "2026-01-01T00:00:00+00:00",
                  "ab" * 32, anchors_sha256="cd" * 32)
PATIENTS = 200


def _result(i: int, rng: random.Random) -> tuple[Any, StudyEmbeddings]:
    uid = f"1.2.826.0.1.3680043.10.543.{i + 1}"
    patient = f"PAT-{i % PATIENTS:04d}"
    day = 1 + (i // PATIENTS) % 28
    month = 1 + (i // (PATIENTS * 28)) % 12
    when = f"2024-{month:02d}-{day:02d}T08:00:00"
    score = round(rng.uniform(0, 12), 6)
    doc = build_document(
        status=Status.SUCCEEDED, identity=StudyIdentity(uid, patient, f"ACC{i}", when),
        site_id="Hospital", model=MODEL, created_at=now_iso(), updated_at=now_iso(),
        scores=[ScoredImage(f"{uid}.1.1", f"{uid}.1", score)],
        stages={"received": now_iso(), "ready": now_iso(), "inferred": now_iso(),
                "stored": now_iso()})
    vector = np.random.default_rng(i).standard_normal(1000).astype("<f2").tobytes()
    emb = StudyEmbeddings((ImageEmbedding(f"{uid}.1.1", f"{uid}.1", score, 1000, vector),),
                          when, "ab" * 32, "cd" * 32, prior_from="")
    return doc, emb


async def _measure(store: Store, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    made = [_result(i, rng) for i in range(n)]
    await store.open()
    try:
        t0 = time.perf_counter()
        for doc, emb in made:
            async with store.transaction() as tx:
                await tx.prior_image(doc, emb)
                await tx.add_result(doc, StudyState.STORED, exporters=("results-db",),
                                    embeddings=emb)
        insert_s = time.perf_counter() - t0
        order = [d.study_instance_uid for d, _ in made]
        rng.shuffle(order)
        t0 = time.perf_counter()
        for uid in order:
            docs = await store.results(ResultFilter(study_uid=uid))
            assert len(docs) == 1
        read_s = time.perf_counter() - t0
        lookups = made[-min(n, 500):]
        t0 = time.perf_counter()
        for doc, emb in lookups:
            await store.prior_for(doc.patient_id, doc.study_instance_uid, emb)
        prior_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, rows = await store.researcher_rows()
        research_s = time.perf_counter() - t0
        assert len(rows) == n
    finally:
        await store.close()
    return {"insert_per_s": n / insert_s, "read_ms": read_s / n * 1000,
            "prior_ms": prior_s / len(lookups) * 1000, "researcher_ms": research_s * 1000}


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import postgres  # the tests' private cluster, here with fsync on

    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    with postgres.cluster(durable=True) as cluster, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            backends = ["sqlite", "postgresql"] if r % 2 == 0 else ["postgresql", "sqlite"]
            for backend in backends:
                url = cluster.new_database() if backend == "postgresql" else None
                store = Store(Path(tmp) / f"{uuid.uuid4().hex}.sqlite3", url=url, node="b")
                figures = asyncio.run(_measure(store, args.results, seed=r))
                runs[backend].append(figures)
                print(f"repeat {r + 1} {backend}: "
                      + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)
    summary = {b: {k: common.spread([f[k] for f in fs]) for k in fs[0]}
               for b, fs in runs.items()}
    headline = []
    for key, label, unit, higher_better in (
            ("insert_per_s", "result inserts (one commit each)", "results/s", True),
            ("read_ms", "document read by study UID", "ms", False),
            ("prior_ms", "prior image lookup", "ms", False),
            ("researcher_ms", f"researcher_view, {args.results:,} results", "ms", False)):
        for backend in ("sqlite", "postgresql"):
            s = summary[backend][key]
            ref = summary["sqlite"][key]["median"]
            ratio = None
            if backend == "postgresql" and ref and s["median"]:
                ratio = s["median"] / ref if higher_better else ref / s["median"]
            headline.append(common.headline(
                f"store {backend}: {label}", s["median"], unit,
                spread_text=f"{_num(s['min'])}-{_num(s['max'])} {unit}",
                reference=f"sqlite {ref:,.3f} {unit}" if backend == "postgresql" else "",
                ratio=ratio))
    figures = {"benchmark": "store_backends", "environment": common.environment("cpu"),
               "parameters": {"results": args.results, "repeats": args.repeats},
               "runs": runs, "summary": summary, "headline": headline, "ok": True}
    path = common.save("store_backends", figures, args.out)
    print(f"figures: {path}")
    return figures


if __name__ == "__main__":
    main()
