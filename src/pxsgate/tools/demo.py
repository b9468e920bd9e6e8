"""``pxsgate demo``: the whole system on a synthetic hospital feed, over real DICOM.

It starts the Gateway in-process on an ephemeral loopback port with a temporary data dir and
demonstration weights, sends itself a small feed (portable AP chests, one with a CATH copy
and a screenshot, a PA/lateral study, a knee, a CT) with a real C-STORE client, waits for the
results and prints which studies were scored or skipped and why, and one result document.
It exits non-zero if any study's outcome differs from what the feed expects.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from pxsgate.config import Config
from pxsgate.records import Status
from pxsgate.results import pxs_entries
from pxsgate.service.gateway import Gateway
from pxsgate.store import ResultFilter
from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets


def demo_config(base: Config, data_dir: Path) -> Config:
    """The embedded default: loopback, ephemeral port, a short settle time, demo model; no
    HTTP port and no exporters (synthetic results never leave the machine)."""
    scp = replace(base.dicom.scp, host="127.0.0.1", port=0, reject_unknown_sources=False)
    return replace(
        base,
        dicom=replace(base.dicom, scp=scp),
        storage=replace(base.storage, data_dir=data_dir, min_free_mb=16),
        assembly=replace(base.assembly, settle_seconds=0.5),
        model=replace(base.model, weights="demo", anchors="demo", device="auto"),
        http=replace(base.http, port=0),
        exporters=(),
    )


def _describe(doc: dict[str, Any]) -> str:
    if doc["status"] == Status.SUCCEEDED:
        scores = pxs_entries(doc)
        values = ", ".join(r["value"] for r in scores)
        images = doc["pxsgate"]["selection"]["images"]
        left_out = [i for i in images if not i["selected"]]
        text = f"PXS {values} ({len(scores)} of {len(images)} image(s) scored)"
        if left_out:
            text += "; not used: " + "; ".join(i["reason"] for i in left_out)
        return text
    return str(doc["errorMessage"])


def _outcome(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "none"
    return "scored" if doc["status"] == Status.SUCCEEDED else str(doc["status"]).lower()


async def run_demo(base: Config, out: TextIO, *, data_dir: Path | None = None,
                   rows: int = 1024, cols: int = 1024) -> int:
    with tempfile.TemporaryDirectory(prefix="pxsgate-demo-") as tmp:
        config = demo_config(base, data_dir or Path(tmp))
        gateway = Gateway(config)
        print("pxsgate demo: starting the gateway (demonstration weights) ...", file=out)
        await gateway.start()
        try:
            return await _drive(gateway, config, out, rows, cols)
        finally:
            await gateway.stop()


async def _drive(gateway: Gateway, config: Config, out: TextIO, rows: int, cols: int) -> int:
    assert gateway.model is not None
    title = config.dicom.scp.ae_titles[0].ae_title
    print(f"  listening as {title} on 127.0.0.1:{gateway.port}, data in "
          f"{config.storage.data_dir}", file=out)
    print(f"  model {gateway.model.id}: {gateway.model.description}", file=out)
    feed = synth.hospital_feed(seed=0, rows=rows, cols=cols)
    images = sum(len(s.datasets) for s in feed)
    started = time.perf_counter()
    for study in feed:
        report = await asyncio.to_thread(send_datasets, "127.0.0.1", gateway.port,
                                         list(study.datasets), called_ae=title,
                                         calling_ae="DEMO-ROUTER")
        if not report.ok:
            print(f"  C-STORE of {study.key} answered {report.statuses}", file=out)
            return 1
    print(f"  sent {len(feed)} studies ({images} images) by C-STORE in "
          f"{time.perf_counter() - started:.1f} s; waiting for results ...", file=out)
    await gateway.wait_idle(limit_s=300)
    docs = {d["studyInstanceUid"]: d for d in await gateway.store.results(ResultFilter())}
    return _report(feed, docs, out)


def _report(feed: Sequence[synth.FeedStudy], docs: dict[str, dict[str, Any]],
            out: TextIO) -> int:
    width = max(len(s.key) for s in feed)
    print(f"\n  {'study':<{width}} {'expected':<9} {'outcome':<9} detail", file=out)
    mismatches = 0
    shown: dict[str, Any] | None = None
    for study in feed:
        doc = docs.get(str(study.datasets[0].StudyInstanceUID))
        outcome = _outcome(doc)
        flags = doc["pxsgate"]["flags"] if doc else []
        expected = outcome == study.expected and flags == list(study.expected_flags)
        mark = "" if expected else "  <-- unexpected"
        mismatches += bool(mark)
        detail = _describe(doc) if doc else "no result stored"
        if flags:
            detail += f"; review flags: {', '.join(flags)}"
        print(f"  {study.key:<{width}} {study.expected:<9} {outcome:<9} {detail}{mark}",
              file=out)
        if doc and doc["status"] == Status.SUCCEEDED and (shown is None or len(study.datasets) > 1):
            shown = doc
    if shown is not None:
        print("\n  One result document, as stored in SQLite and printed by "
              "`pxsgate results --json`:", file=out)
        print(json.dumps(shown, indent=2), file=out)
    if mismatches:
        print(f"\npxsgate demo: {mismatches} study outcome(s) differ from the feed's "
              "expectations", file=out)
        return 1
    print("\npxsgate demo: every study was scored or skipped as expected.", file=out)
    return 0
