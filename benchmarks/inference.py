"""PXS inference speed: the bare model, the gateway's scoring path, and the published scoring.

Side by side, in one run, on one device (CUDA when there is one, else the CPU):

- ``bare``: DenseNet-121 forward passes alone (inference_mode, channels_last, the precision
  the gateway picks), float32 input already on the device, per batch size 1..64;
- ``gateway``: ``PxsScorer.score_batch`` as the service calls it: 8-bit model images from
  host memory -> device -> ToTensor -> forward -> median distance to the cached anchors;
- ``worker``: the same through the inference worker's deadline batcher (images submitted
  concurrently from asyncio, as the pipeline does), at the configured max batch size;
- ``reference``: the published PXS code's scoring (QTIM-Lab/PXS-score ``anchor_inference``):
  one image at a time, two forward passes per anchor, N = 10 anchors;
- precision: each reduced precision's speed at the best batch size and its largest
  relative score difference from fp32 on the probe images.

    python -m benchmarks.inference [--sizes 1,2,4,8,16,32,64] [--repeats 5] [--anchors 10]

Prints tables and writes benchmarks/results/inference-<device>-<date>.json. On CUDA it also
samples GPU utilisation with nvidia-smi while the worker runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from pxsgate.anchors import anchor_images
from pxsgate.config import BatchConfig, ModelConfig
from pxsgate.infer import InferenceWorker, PxsScorer, Runtime, batch_tensor, pick_device
from pxsgate.preprocess import preprocess_pixels, to_model_input
from pxsgate.pxs import PxsSiamese, reference_pxs_score
from pxsgate.tools import synth


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm: allocator, cuDNN autotuning for this shape
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def model_images(count: int) -> np.ndarray:
    """``count`` 8-bit 320x320 model images of synthetic AP chest radiographs."""
    feed = synth.hospital_feed(seed=5, rows=640, cols=560, prefix="BENCH")
    pool = [preprocess_pixels(ds.pixel_array, str(ds.PhotometricInterpretation))
            for study in feed for ds in study.datasets
            if getattr(ds, "ViewPosition", "") == "AP"]
    return np.stack([pool[i % len(pool)] for i in range(count)])


def bench_sizes(scorer: PxsScorer, images: np.ndarray, sizes: list[int], repeats: int,
                runtime: Runtime) -> list[dict[str, Any]]:
    device = runtime.device
    rows = []
    net = scorer._net
    for size in sizes:
        batch = images[:size]
        x = batch_tensor(batch, device, channels_last=True)

        def bare(x: torch.Tensor = x) -> object:
            with torch.inference_mode(), runtime.context():
                return net(x)

        def gateway(batch: np.ndarray = batch) -> object:
            return scorer.score_batch(batch)

        bare_t = _time(bare, device, repeats)
        gate_t = _time(gateway, device, repeats)
        row = {
            "batch": size,
            "bare_ms": 1000 * statistics.median(bare_t),
            "bare_img_s": size / statistics.median(bare_t),
            "gateway_ms": 1000 * statistics.median(gate_t),
            "gateway_img_s": size / statistics.median(gate_t),
            "bare_runs_ms": [round(1000 * t, 2) for t in bare_t],
            "gateway_runs_ms": [round(1000 * t, 2) for t in gate_t],
        }
        rows.append(row)
        print(f"  batch {size:3d}: bare {row['bare_ms']:9.1f} ms {row['bare_img_s']:8.1f} img/s"
              f" | gateway {row['gateway_ms']:9.1f} ms {row['gateway_img_s']:8.1f} img/s",
              flush=True)
    return rows


class GpuSampler:
    """nvidia-smi utilisation samples every 100 ms while running (CUDA only)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def mean(self) -> float | None:
        busy = self.samples[2:]  # skip nvidia-smi's start-up samples
        return statistics.mean(busy) if busy else None


def bench_worker(scorer: PxsScorer, images: np.ndarray, max_size: int, total: int
                 ) -> dict[str, Any]:
    # As the service runs it: niced on the CPU, not on a GPU (see InferenceWorker).
    worker = InferenceWorker(lambda: scorer, BatchConfig(max_size=max_size, max_delay_ms=5),
                             nice=scorer.runtime.device.type == "cpu")
    worker.start()
    stream = np.stack([images[i % len(images)] for i in range(total)])

    async def submit_all() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(worker.score(img) for img in stream))
        return time.perf_counter() - started

    try:
        asyncio.run(submit_all())  # warm
        with GpuSampler() as gpu:
            elapsed = asyncio.run(submit_all())
    finally:
        worker.stop()
    return {"max_size": max_size, "images": total, "img_s": total / elapsed,
            "gpu_util_mean": gpu.mean() if scorer.runtime.device.type == "cuda" else None}


def bench_reference(scorer: PxsScorer, images: np.ndarray, anchors: int, count: int
                    ) -> dict[str, Any]:
    """The published scoring: per image, 2 x anchors forward passes of batch 1, fp32."""
    device = scorer.runtime.device
    siamese = PxsSiamese(scorer._net).eval()
    pool = torch.stack([torch.from_numpy(to_model_input(img)) for _, img in
                        anchor_images("demo")[:anchors]]).to(device)
    if len(pool) < anchors:  # the demo pool has 8: repeat from the probe images
        extra = [torch.from_numpy(to_model_input(img)) for img in images[: anchors - len(pool)]]
        pool = torch.cat([pool, torch.stack(extra).to(device)])
    pool = pool.contiguous(memory_format=torch.channels_last)
    times = []
    for img in images[:count]:
        x = torch.from_numpy(to_model_input(img)).to(device)
        started = time.perf_counter()
        reference_pxs_score(siamese, x, pool)
        _sync(device)
        times.append(time.perf_counter() - started)
    return {"anchors": anchors, "images": count, "s_per_image": statistics.median(times),
            "forward_passes_per_image": 2 * anchors}


def bench_precisions(base: ModelConfig, images: np.ndarray, best: int, repeats: int,
                     fp32_scores: np.ndarray) -> list[dict[str, Any]]:
    out = []
    device = pick_device(base.device)
    options = ["bf16", "fp16", "tf32"] if device.type == "cuda" else ["bf16"]
    for precision in options:
        try:
            scorer = PxsScorer.load(replace(base, precision=precision, precision_tolerance=1.0))
        except Exception as exc:  # a device without the dtype
            out.append({"precision": precision, "error": str(exc)})
            continue
        batch = images[:best]
        times = _time(lambda s=scorer, b=batch: s.score_batch(b), device, repeats)
        scores = np.array(scorer.score_batch(images[: len(fp32_scores)]))
        rel = float(np.max(np.abs(scores - fp32_scores) / np.abs(fp32_scores)))
        row = {"precision": scorer.runtime.precision, "batch": best,
               "gateway_img_s": best / statistics.median(times), "max_rel_score_diff": rel}
        print(f"  {precision}: {row['gateway_img_s']:.1f} img/s at batch {best}, "
              f"max relative score difference from fp32 {rel:.2e}", flush=True)
        out.append(row)
    return out


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--anchors", type=int, default=10, help="N for the reference scoring")
    parser.add_argument("--reference-images", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker-images", type=int, default=0,
                        help="images through the worker (default: 4 x best batch size)")
    parser.add_argument("--no-precision", action="store_true")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    return parser


def headlines(figures: dict[str, Any]) -> list[dict[str, Any]]:
    s, ref, rows = figures["summary"], figures["reference"], figures["sizes"]
    best = max(rows, key=lambda r: r["gateway_img_s"])
    ref_ms = 1000 * ref["s_per_image"]
    out = [common.headline(
        f"inference: gateway scoring path, best batch ({best['batch']})",
        round(best["gateway_img_s"], 2), "img/s",
        spread_text=f"{1000 / best['gateway_img_s']:.1f} ms/img",
        reference=f"published anchor_inference, N = {ref['anchors']}: {ref_ms:.0f} ms/img",
        ratio=s["speedup_best_vs_reference"], goal=">= 15x the reference",
        met=s["speedup_best_vs_reference"] >= 15)]
    if s["gateway_img_s_batch1"]:
        out.append(common.headline(
            "inference: gateway, one image per batch", round(1000 / s["gateway_img_s_batch1"], 1),
            "ms/img", reference="the same reference", ratio=s["speedup_batch1_vs_reference"]))
    out.append(common.headline(
        "inference: gateway path vs bare forward pass at the best batch",
        round(100 * s["gateway_vs_bare_at_best"], 1), "%",
        spread_text=f"worker (deadline batcher): {100 * s['worker_vs_bare_at_best']:.0f}%",
        goal=">= 80%", met=s["gateway_vs_bare_at_best"] >= 0.8))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    base = ModelConfig(device=args.device, batch=BatchConfig(max_size=max(sizes)))
    print("loading the model (demo weights) ...", flush=True)
    scorer = PxsScorer.load(base)
    runtime = scorer.runtime
    device = runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({name}), precision {runtime.precision}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    images = model_images(max(sizes))

    print("per batch size:", flush=True)
    rows = bench_sizes(scorer, images, sizes, args.repeats, runtime)
    best = max(rows, key=lambda r: r["gateway_img_s"])
    bare_best = max(r["bare_img_s"] for r in rows)
    print(f"reference scoring (published anchor_inference, N = {args.anchors}) ...", flush=True)
    reference = bench_reference(scorer, images, args.anchors, args.reference_images)
    ref_img_s = 1 / reference["s_per_image"]
    single = rows[0]["gateway_img_s"] if rows[0]["batch"] == 1 else None
    print("worker (deadline batcher) ...", flush=True)
    worker = bench_worker(scorer, images, best["batch"],
                          args.worker_images or max(32, 4 * best["batch"]))
    precisions: list[dict[str, Any]] = []
    if not args.no_precision:
        print("precision ...", flush=True)
        probe = images[: min(8, len(images))]
        fp32_scores = np.array(scorer.score_batch(probe))
        precisions = bench_precisions(base, images, best["batch"], args.repeats, fp32_scores)

    summary = {
        "reference_img_s": ref_img_s,
        "gateway_img_s_batch1": single,
        "gateway_img_s_best": best["gateway_img_s"],
        "best_batch": best["batch"],
        "speedup_batch1_vs_reference": single / ref_img_s if single else None,
        "speedup_best_vs_reference": best["gateway_img_s"] / ref_img_s,
        "gateway_vs_bare_at_best": best["gateway_img_s"] / bare_best,
        "worker_vs_bare_at_best": worker["img_s"] / bare_best,
    }
    print()
    print(f"reference: {reference['s_per_image'] * 1000:.0f} ms per image "
          f"({reference['forward_passes_per_image']} forward passes)")
    if single:
        print(f"gateway, one image per batch: {1000 / single:.0f} ms per image -> "
              f"{summary['speedup_batch1_vs_reference']:.1f}x the reference")
    print(f"gateway, batch {best['batch']}: {best['gateway_img_s']:.1f} img/s -> "
          f"{summary['speedup_best_vs_reference']:.1f}x the reference; "
          f"{summary['gateway_vs_bare_at_best']:.0%} of the bare model's best")
    print(f"worker: {worker['img_s']:.1f} img/s ({summary['worker_vs_bare_at_best']:.0%} of bare)"
          + (f", GPU utilisation {worker['gpu_util_mean']:.0f}%"
             if worker["gpu_util_mean"] is not None else ""))

    figures: dict[str, Any] = {
        "benchmark": "inference",
        "environment": common.environment(device.type),
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": runtime.precision,
        "repeats": args.repeats,
        "sizes": rows, "reference": reference, "worker": worker, "precisions": precisions,
        "summary": summary, "ok": True,
    }
    figures["headline"] = headlines(figures)
    out = common.save("inference", figures, args.out)
    print(f"wrote {out}")
    return figures


if __name__ == "__main__":
    main()
