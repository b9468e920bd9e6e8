"""model.backend triton beside local: per-image latency and throughput of the scoring path.

Both backends score the same 8-bit model images against the same anchors (an anchors file
embedded once, locally), through the Scorer the inference worker calls (``score_batch``):

- ``local``: PxsScorer, torch in this process (the worker's micro-batch is one forward pass);
- ``triton``: TritonScorer against a real tritonserver (tests/tritonserver.py: the CPU build
  of PyPI's nvidia-pytriton wheel, Python backend) serving ``pxsgate model export --format
  python``; each image is a request of its own, a batch's requests in flight together, and
  Triton's dynamic batcher gathers them into forward passes.

Per batch size: milliseconds per call (the latency of each image of that batch) and images
per second over all the images; and the largest relative difference between the two
backends' scores (fp32 both: within 1e-5).

    python -m benchmarks.triton [--sizes 1,4,8] [--images 8] [--protocol grpc|http]

On the CPU the two backends share the cores (Triton runs on the same machine), so the
figures show the cost of the protocol and the copies, not a GPU server's speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from pxsgate.anchors import save_anchor_file
from pxsgate.config import BatchConfig, ModelConfig, TritonConfig
from pxsgate.infer import PxsScorer, Scorer
from pxsgate.preprocess import preprocess_pixels
from pxsgate.tools import synth
from pxsgate.triton.export import export_model
from pxsgate.triton.scorer import TritonScorer
from tests import tritonserver


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--images", type=int, default=8, help="images per batch size")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--device", default="cpu", help="the local backend's device")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    return parser


def model_images(count: int) -> np.ndarray:
    rng = np.random.default_rng(23)
    return np.stack([preprocess_pixels(synth.chest_radiograph(
        rng, rows=512, cols=512, view="AP", severity=float(rng.uniform(0, 0.8))),
        "MONOCHROME2") for _ in range(count)])


def bench(scorer: Scorer, images: np.ndarray, size: int) -> tuple[dict[str, Any], list[float]]:
    """Score ``images`` in calls of ``size``: per-call latency, throughput, the scores."""
    scorer.score_batch(images[:size])  # warm: connections, allocator, the batcher
    calls: list[float] = []
    scores: list[float] = []
    started = time.perf_counter()
    for i in range(0, len(images) - len(images) % size, size):
        t = time.perf_counter()
        scores += scorer.score_batch(images[i : i + size])
        calls.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return {"batch": size, "calls": len(calls), "images": len(scores),
            "ms_per_call": common.percentiles([1000 * c for c in calls], 1),
            "img_s": round(len(scores) / wall, 3)}, scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pxsgate-triton-bench-"))
    batch = BatchConfig(max_size=max(sizes))
    print("local backend: the model and the demo anchors ...", flush=True)
    local = PxsScorer.load(ModelConfig(device=args.device, batch=batch))
    anchors = work / "anchors.pt"
    save_anchor_file(local.anchors, anchors)  # both backends score against these
    print("exporting the model (python backend entry) and starting tritonserver ...",
          flush=True)
    export_model(ModelConfig(batch=batch), work / "repository", "python")
    server = tritonserver.start(work / "repository", work / "server")
    try:
        triton_config = ModelConfig(backend="triton", anchors=str(anchors), batch=batch,
                                    triton=TritonConfig(url=server.url(args.protocol),
                                                        protocol=args.protocol))
        remote = TritonScorer.load(triton_config)
        images = model_images(max(args.images, max(sizes)))
        rows: list[dict[str, Any]] = []
        worst = 0.0
        for size in sizes:
            local_row, local_scores = bench(local, images, size)
            triton_row, triton_scores = bench(remote, images, size)
            diff = np.abs(np.array(triton_scores) - np.array(local_scores)) / np.abs(
                np.array(local_scores))
            worst = max(worst, float(diff.max()))
            rows.append({"batch": size, "local": local_row, "triton": triton_row})
            print(f"batch {size:>2}: local {local_row['ms_per_call']['p50']:8.1f} ms/call "
                  f"{local_row['img_s']:6.2f} img/s | triton "
                  f"{triton_row['ms_per_call']['p50']:8.1f} ms/call "
                  f"{triton_row['img_s']:6.2f} img/s", flush=True)
        remote.close()
    finally:
        server.stop()
    best_local = max(rows, key=lambda r: r["local"]["img_s"])
    best_triton = max(rows, key=lambda r: r["triton"]["img_s"])
    figures: dict[str, Any] = {
        "benchmark": "triton",
        "environment": common.environment("cpu" if args.device == "cpu" else args.device),
        "protocol": args.protocol, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "images": len(images), "anchors": len(local.anchors),
        "sizes": rows,
        "summary": {"max_relative_score_difference": worst,
                    "best_batch_local": best_local["batch"],
                    "best_batch_triton": best_triton["batch"]},
        "ok": worst <= 1e-5,
    }
    figures["headline"] = headlines(figures)
    out = common.save("triton", figures, args.out)
    print(f"wrote {out}")
    return figures


def headlines(figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = figures["sizes"]
    one = next((r for r in rows if r["batch"] == 1), rows[0])
    best = max(rows, key=lambda r: r["triton"]["img_s"])
    best_local = max(rows, key=lambda r: r["local"]["img_s"])
    local_ms, triton_ms = one["local"]["ms_per_call"]["p50"], one["triton"]["ms_per_call"]["p50"]
    worst = figures["summary"]["max_relative_score_difference"]
    return [
        common.headline(
            f"triton ({figures['protocol']}): one image per call", triton_ms, "ms/img",
            reference=f"local backend: {local_ms:.0f} ms/img",
            ratio=local_ms / triton_ms if triton_ms else None),
        common.headline(
            f"triton ({figures['protocol']}): best batch ({best['batch']})",
            best["triton"]["img_s"], "img/s",
            reference=f"local backend, best batch ({best_local['batch']}): "
                      f"{best_local['local']['img_s']:.2f} img/s",
            ratio=best["triton"]["img_s"] / best_local["local"]["img_s"]),
        common.headline(
            "triton vs local: largest relative score difference", round(worst * 1e6, 3),
            "ppm", goal="<= 10 ppm (1e-5, fp32 both)", met=worst <= 1e-5),
    ]


if __name__ == "__main__":
    main()
