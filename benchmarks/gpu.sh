#!/usr/bin/env bash
# Every benchmark on an NVIDIA GPU host (H100/H200), in one command, from the repository root:
#
#     bash benchmarks/gpu.sh [NAME ...] [--quick]      # arguments go to benchmarks.run
#
# Without a NAME: inference (throughput by batch, bf16/fp16 parity), e2e (ready -> stored),
# soak and gpu_jpeg2000 (nvImageCodec against pylibjpeg, bit for bit).
#
# It uses a Python that already has a CUDA build of torch (PXSGATE_PYTHON, default python3;
# GPU images ship one), makes .venv-gpu on top of it (--system-site-packages, so that torch
# is reused, not downloaded), installs pxsgate there, installs DCMTK if it is missing, checks
# that torch sees the GPU and runs `python -m benchmarks.run --device cuda`. The figures go
# to benchmarks/results/<name>-<gpu>-<date>.json (e.g. e2e-h100-2026-11-26.json) beside the
# CPU figures, and benchmarks/results/SUMMARY.md lists both, each labelled with its machine.
#
# Offline hosts: put the wheels pxsgate needs in a folder (pip download on a connected
# machine) and set PXSGATE_WHEELS=/that/folder; put DCMTK's .deb files (apt-get download
# dcmtk libdcmtk17 ...) in PXSGATE_DEBS=/folder and they are unpacked with dpkg -x.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PXSGATE_PYTHON:-python3}"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed); run python -m benchmarks.run for CPU" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: $PY has no CUDA build of torch; set PXSGATE_PYTHON to one that has" >&2
  exit 2
fi

if [ ! -x /usr/bin/storescu ]; then
  if [ -n "${PXSGATE_DEBS:-}" ]; then
    for deb in "$PXSGATE_DEBS"/*.deb; do dpkg -x "$deb" /; done
    ldconfig
  else
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
  fi
fi

if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv-gpu
fi
PIP=(.venv-gpu/bin/python -m pip install --quiet)
if [ -n "${PXSGATE_WHEELS:-}" ]; then
  PIP+=(--no-index --find-links "$PXSGATE_WHEELS")
fi
"${PIP[@]}" -e .
# benchmarks.gpu_jpeg2000: nvImageCodec's JPEG 2000 decoder against pylibjpeg's, bit for bit.
# Optional: without it that benchmark says so and the others run.
"${PIP[@]}" nvidia-nvimgcodec-cu12 \
  || echo "gpu.sh: nvidia-nvimgcodec-cu12 not installed (put its wheel in PXSGATE_WHEELS)" >&2

.venv-gpu/bin/python - <<'EOF'
import torch
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
EOF
# Without names: the benchmarks a GPU changes (the store, ingest and UI ones are the CPU's).
names=0
for arg in "$@"; do case "$arg" in -*) ;; *) names=1 ;; esac; done
if [ "$names" = 0 ]; then set -- inference e2e soak gpu_jpeg2000 "$@"; fi
exec .venv-gpu/bin/python -m benchmarks.run --device cuda "$@"
