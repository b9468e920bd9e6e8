"""End-to-end latency of one study: association release -> result stored, and ready -> stored.

Starts the Gateway in-process (demo weights, the configured device), sends N single-image
portable AP chest studies one after another with DCMTK's storescu (one association each,
a realistic 2500x3000 12-bit uncompressed CR image), and reads the stage timestamps that
every result document carries (pxsgate.stages: released, ready, inferred, stored).

    python -m benchmarks.e2e_latency [--studies 10] [--settle 2.0] [--rows 3000 --cols 2500]

Prints a table and writes benchmarks/results/e2e_latency-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pxsgate import synth
from pxsgate.config import Config
from pxsgate.scu import send_datasets
from pxsgate.server import Gateway
from pxsgate.store import ResultFilter

STORESCU = Path("/usr/bin/storescu")
HAVE_STORESCU = STORESCU.exists()
RESULTS = Path(__file__).parent / "results"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


async def run(studies: int, settle: float, rows: int, cols: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pxsgate-bench-") as tmp:
        base = Config()
        config = replace(
            base,
            dicom=replace(base.dicom, scp=replace(base.dicom.scp, host="127.0.0.1", port=0)),
            storage=replace(base.storage, data_dir=Path(tmp) / "data"),
            assembly=replace(base.assembly, settle_seconds=settle),
        )
        gateway = Gateway(config)
        await gateway.start()
        try:
            files = []
            for i in range(studies):
                study = synth.hospital_feed(seed=1000 + i, rows=rows, cols=cols,
                                            prefix=f"BENCH{i:03d}")[0]  # one AP image
                files.append(synth.write_feed([study], Path(tmp) / f"s{i}"))
            for paths in files:
                if HAVE_STORESCU:
                    await asyncio.to_thread(
                        subprocess.run,
                        [str(STORESCU), "-aec", "PxsScore", "127.0.0.1", str(gateway.port),
                         *map(str, paths)], check=True, capture_output=True)
                else:
                    from pydicom import dcmread
                    await asyncio.to_thread(send_datasets, "127.0.0.1", gateway.port,
                                            [dcmread(p) for p in paths])
                await gateway.wait_idle(limit_s=120)
            docs = await gateway.store.results(ResultFilter(status="SUCCEEDED"))
        finally:
            await gateway.stop()
    release_to_stored = [(_ts(d["pxsgate"]["stages"]["stored"])
                          - _ts(d["pxsgate"]["stages"]["released"])) for d in docs]
    ready_to_stored = [(_ts(d["pxsgate"]["stages"]["stored"])
                        - _ts(d["pxsgate"]["stages"]["ready"])) for d in docs]
    return {
        "benchmark": "e2e_latency",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "sender": "dcmtk storescu" if HAVE_STORESCU else "pynetdicom",
        "studies": len(docs),
        "image": f"{cols}x{rows} 12-bit CR, explicit VR little endian",
        "settle_seconds": settle,
        "release_to_stored_s": {"p50": _pct(release_to_stored, 50),
                                "p95": _pct(release_to_stored, 95),
                                "min": min(release_to_stored), "max": max(release_to_stored)},
        "ready_to_stored_s": {"p50": _pct(ready_to_stored, 50), "p95": _pct(ready_to_stored, 95),
                              "stdev": statistics.pstdev(ready_to_stored)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--cols", type=int, default=2500)
    args = parser.parse_args()
    started = time.perf_counter()
    figures = asyncio.run(run(args.studies, args.settle, args.rows, args.cols))
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"e2e_latency-{figures['device'].split(':')[0]}-{figures['date'][:10]}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    r, s = figures["release_to_stored_s"], figures["ready_to_stored_s"]
    print(f"{figures['studies']} studies, {figures['image']}, settle {args.settle} s, "
          f"{figures['device']}, sender {figures['sender']}")
    print(f"  association release -> result stored: p50 {r['p50']:.3f} s, p95 {r['p95']:.3f} s")
    print(f"  study ready         -> result stored: p50 {s['p50']:.3f} s, p95 {s['p95']:.3f} s")
    print(f"  figures: {out}")


if __name__ == "__main__":
    main()
