"""What every benchmark shares: the record of where it ran, repeat statistics, saving the
figures, the headline rows of the summary table, and ``pxsgate serve`` as a subprocess
(tests/harness.py, shared with the tests).

Every JSON a benchmark writes under ``benchmarks/results/`` carries ``environment`` (date,
commit, machine, device, package versions) and ``headline``: the few rows that go into
the summary table, each a metric with its value, spread, the reference it was run beside
and the ratio to it, and the goal with whether it was met.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from pxsgate.tools import synth
from tests import harness
from tests.harness import free_port as free_port  # re-exported: the benchmarks use it

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
AE_TITLE = "PxsScore"
STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"


# --- where it ran --------------------------------------------------------------------------


def commit() -> str:
    """The commit, with "+dirty" when tracked files differ from it (the figures then belong
    to the working tree, not to the commit)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpus() -> list[dict[str, str]]:
    """The NVIDIA GPUs nvidia-smi lists (name, memory, driver), or [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True)
    rows = [line.split(", ") for line in out.stdout.splitlines() if line.strip()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def dcmtk_version() -> str:
    if not Path(STORESCU).exists():
        return "not installed"
    out = subprocess.run([STORESCU, "--version"], capture_output=True, text=True)
    match = re.search(r"OFFIS DCMTK\)?\s*v?([\d.]+)", out.stdout) or re.search(
        r"v(\d+\.\d+\.\d+)", out.stdout)
    return match.group(1) if match else "unknown"


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (torch is imported only
    here, and only for ``auto``)."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_label(device: str) -> str:
    """Short label for file names and the summary: the GPU's model (``h100``, ``h200``,
    ``a100`` ...) on CUDA, else ``cpu``."""
    if device.startswith("cuda"):
        for gpu in gpus():
            match = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", gpu["name"])
            if match:
                return match.group(1).lower()
        return "cuda"
    return "cpu"


def environment(device: str) -> dict[str, Any]:
    """Date, commit, machine and software of a run on ``device`` (``cpu``/``cuda``)."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "label": machine_label(device),
        "device": device,
        "machine": {
            "hostname": platform.node(),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": mem_total_gib(),
            "gpus": gpus(),
            "kernel": platform.release(),
        },
        "software": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "pydicom", "pynetdicom", "numpy",
                                                  "pylibjpeg-openjpeg")},
            "dcmtk": dcmtk_version(),
        },
    }


def describe(env: dict[str, Any]) -> str:
    """One line naming the machine, for tables: ``cpu: 2-core Intel Xeon ..., 23 GiB``."""
    m = env["machine"]
    gpu = ", ".join(g["name"] for g in m.get("gpus") or [])
    where = f"{m['cores']}-core {m['cpu']}, {m['memory_gib']:g} GiB"
    return f"{env['label']}: {gpu + ' + ' if gpu else ''}{where}"


# --- statistics ----------------------------------------------------------------------------


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max and the relative spread (max - min) / median of repeats."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "rel_spread": None}
    median = statistics.median(values)
    return {
        "n": len(values),
        "median": round(median, digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "rel_spread": round((max(values) - min(values)) / median, 3) if median else None,
        "values": [round(v, digits) for v in values],
    }


def percentiles(values: list[float], digits: int = 4) -> dict[str, Any]:
    """p50/p95/p99 (linear interpolation), min, max and n of a latency sample."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "min": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), digits),
            "p95": round(float(p95), digits), "p99": round(float(p99), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def headline(metric: str, value: float | None, unit: str, *, spread_text: str = "",
             reference: str = "", ratio: float | None = None, goal: str = "",
             met: bool | None = None) -> dict[str, Any]:
    """One row of the summary table."""
    return {"metric": metric, "value": value, "unit": unit, "spread": spread_text,
            "reference": reference, "ratio": None if ratio is None else round(ratio, 3),
            "goal": goal, "met": met}


def save(name: str, figures: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write ``figures`` to ``results/<name>-<label>-<date>.json`` (a later run the same
    day on the same kind of machine replaces it: the table shows the latest)."""
    env = figures["environment"]
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}-{env['label']}-{env['date'][:10]}.json"
    partial = out.with_suffix(".json.partial")  # never a half-written table source
    partial.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(partial, out)
    return out


# --- test images ---------------------------------------------------------------------------


def ap_chest(rng: np.random.Generator, rows: int, cols: int, *, number: int = 0,
             prefix: str = "BENCH") -> Dataset:
    """A portable AP chest CR image (12 bits stored), explicit VR little endian."""
    study = synth.make_study(number, seed=int(rng.integers(1 << 31)), prefix=prefix,
                             description="XR CHEST PORTABLE")
    pixels = synth.chest_radiograph(rng, rows=rows, cols=cols, view="AP",
                                    severity=float(rng.uniform(0.0, 0.8)))
    return synth.make_image_dataset(
        pixels, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=study,
        series_description="CHEST AP PORTABLE", view_position="AP", body_part="CHEST",
        image_type=("DERIVED", "PRIMARY"), series_number=1, instance_number=1)


def reuid(datasets: list[Dataset], number: int, prefix: str = "BENCH") -> str:
    """Give a pooled study (in place) new UIDs, patient and accession number: a new study
    of a new patient to the service. Returns the accession number."""
    study_uid = str(generate_uid())
    accession = f"{prefix}{number:08d}"[-16:]
    for ds in datasets:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = accession
        ds.PatientID = f"P{accession}"
        ds.StudyID = str(number % 10**6)
    return accession


# --- pxsgate serve as a subprocess ---------------------------------------------------------


def write_config(path: Path, data_dir: Path, *, http_port: int, weights: str = "demo",
                 device: str = "cpu", settle: float | None = None,
                 pictures: bool = True, decode_on_arrival: bool = True) -> Path:
    """A serve config: loopback DICOM on a free port, the data directory, JSON logs. Every
    other setting keeps the service's default (``settle`` None: the default settle time;
    ``pictures`` False: pictures.enabled off, to measure what they cost;
    ``decode_on_arrival`` False: preprocess.decode-on-arrival off, the reference for it)."""
    model = f"model:\n  weights: {json.dumps(weights)}\n  device: {json.dumps(device)}\n"
    if not pictures:
        model += "pictures:\n  enabled: false\n"
    if not decode_on_arrival:
        model += "preprocess:\n  decode-on-arrival: false\n"
    return harness.write_config(path, data_dir, http_port=http_port, settle=settle,
                                min_free_mb=64, ae_titles=(AE_TITLE,), extra=model)


@dataclass
class Service(harness.Service):
    """``pxsgate serve`` as a subprocess (tests/harness.py), counting the sizes of its
    inference batches too; it keeps no more of its log than the harness bounds."""

    batches: Counter[int] = field(default_factory=Counter)  # inference.batch sizes

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("event") == "inference.batch" and isinstance(event.get("batch_size"), int):
            self.batches[event["batch_size"]] += 1


def start_service(config: Path, timeout: float = 300.0) -> Service:
    """Start ``pxsgate serve`` and wait for ``gateway.started`` (the model is loaded and
    warm, the port open)."""
    try:
        return harness.start(config, Service, timeout)
    except harness.DidNotStart as exc:
        raise SystemExit(str(exc)) from None


def stop_service(service: Service, timeout: float = 90.0) -> int:
    return harness.stop(service, timeout)


def read_only(db: Path) -> sqlite3.Connection:
    """A read-only connection to the service's store (the service is the only writer)."""
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
