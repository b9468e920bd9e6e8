"""JPEG 2000 on the GPU: does nvImageCodec (``nvidia-nvimgcodec-cu12``) decode the JPEG 2000
lossless radiographs routers send bit-identically to the CPU decoder pxsgate uses
(pylibjpeg-openjpeg), and how much faster?

    .venv-gpu/bin/python -m benchmarks.gpu_jpeg2000 [--images 6] [--rows 2500 --cols 3000]
        [--repeats 3] [--device cuda] [--out DIR]

For each synthetic 12-bit AP chest CR (benchmarks.common.ap_chest, compressed with
pylibjpeg's JPEG 2000 lossless encoder, as the e2e benchmark sends), the pixel data's one
frame (a J2K codestream) is decoded by pydicom with pylibjpeg-openjpeg on one CPU core and
by nvImageCodec on the GPU (unchanged colour, any bit depth), the GPU result copied back to
the host, and the two arrays compared element by element. Timings per image: the CPU
decode, and the GPU decode including the copy back (the median of ``--repeats``).

It needs a CUDA device and nvImageCodec: on the CPU (``--device cpu``, the runner's default
here) or without the package it says why and records nothing (benchmarks/gpu.sh installs
the package, from PXSGATE_WHEELS on an offline host). pxsgate would decode JPEG 2000 on the
GPU only if every image here is bit-identical: scores must not depend on the decoder.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless

from benchmarks import common


def _nvimgcodec() -> Any | None:
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    codec = _nvimgcodec()
    if not device.startswith("cuda") or codec is None:
        why = ("no CUDA device" if not device.startswith("cuda")
               else "nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu12)")
        print(f"gpu_jpeg2000: skipped, {why}; nothing recorded")
        return {"benchmark": "gpu_jpeg2000", "ok": True, "skipped": why}

    decoder = codec.Decoder()
    params = codec.DecodeParams(allow_any_depth=True,
                                color_spec=codec.ColorSpec.UNCHANGED)
    rng = np.random.default_rng(24)
    cpu_s: list[float] = []
    gpu_s: list[float] = []
    identical: list[bool] = []
    first_difference = ""
    for i in range(args.images):
        ds = common.ap_chest(rng, args.rows, args.cols, number=i, prefix="J2K")
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
        cpu = get_decoder(JPEG2000Lossless)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            reference, _ = cpu.as_array(ds, decoding_plugin="pylibjpeg")  # as pxsgate does
            times.append(time.perf_counter() - t0)
        cpu_s.append(statistics.median(times))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            image = decoder.decode(codestream, params=params)
            host = np.asarray(image.cpu()).reshape(reference.shape)
            times.append(time.perf_counter() - t0)
        gpu_s.append(statistics.median(times))
        same = host.dtype.itemsize >= 2 and np.array_equal(host.astype(reference.dtype),
                                                           reference)
        identical.append(bool(same))
        if not same and not first_difference:
            first_difference = (f"image {i}: GPU {host.dtype} {host.shape}, CPU "
                                f"{reference.dtype} {reference.shape}, "
                                f"{int(np.count_nonzero(host != reference))} values differ")
        print(f"image {i}: CPU {cpu_s[-1] * 1000:.1f} ms, GPU {gpu_s[-1] * 1000:.1f} ms, "
              f"{'bit-identical' if same else 'DIFFERENT'}", flush=True)

    cpu_ms = statistics.median(cpu_s) * 1000
    gpu_ms = statistics.median(gpu_s) * 1000
    all_same = all(identical)
    headline = [
        common.headline("JPEG 2000 lossless decode on the GPU (nvImageCodec), per image",
                        round(gpu_ms, 2), "ms", spread_text=f"{args.rows}x{args.cols}",
                        reference=f"pylibjpeg-openjpeg on one CPU core {cpu_ms:.1f} ms",
                        ratio=cpu_ms / gpu_ms if gpu_ms else None),
        common.headline("GPU decode bit-identical to the CPU's", sum(identical), "images",
                        spread_text=f"of {len(identical)}", goal="all",
                        met=all_same),
    ]
    figures = {"benchmark": "gpu_jpeg2000", "environment": common.environment(device),
               "parameters": vars(args) | {"out": str(args.out)},
               "cpu_seconds": cpu_s, "gpu_seconds": gpu_s, "identical": identical,
               "first_difference": first_difference, "headline": headline,
               "ok": all_same}
    path = common.save("gpu_jpeg2000", figures, args.out)
    print(f"figures: {path}")
    return figures


if __name__ == "__main__":
    main()
