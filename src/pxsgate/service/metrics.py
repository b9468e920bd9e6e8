"""Prometheus metrics (prometheus-client), one registry per Gateway, served at /metrics.

Counters and histograms are updated where things happen (reception threads, the loop, the
inference thread: prometheus-client's metrics are thread-safe). Gauges of live state
(queue depths, associations, spool bytes, free disk, GPU memory) are read when scraped,
from callbacks the Gateway sets. Labels never carry PHI: AE titles, reasons, statuses,
exporter names.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from pxsgate.trends import Drift

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds, from last instance received to result stored: the paper's deployment took ~20 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.associations_active = Gauge(
            "pxsgate_associations_active", "DICOM associations in progress", registry=r)
        self.associations = Counter(
            "pxsgate_associations", "DICOM associations accepted, by calling AE title",
            ["calling_ae"], registry=r)
        self.associations_rejected = Counter(
            "pxsgate_associations_rejected", "DICOM associations rejected, by reason",
            ["reason"], registry=r)
        self.instances = Counter(
            "pxsgate_instances_received", "instances stored and acknowledged (0x0000)",
            registry=r)
        self.instance_bytes = Counter(
            "pxsgate_instance_bytes_received", "bytes of the instances stored", registry=r)
        self.instances_moved = Counter(
            "pxsgate_instances_moved",
            "instances sent again under another study (corrections): both studies rescored",
            registry=r)
        self.instances_refused = Counter(
            "pxsgate_instances_refused", "C-STORE requests answered with an error status",
            ["status"], registry=r)
        self.stow_instances = Counter(
            "pxsgate_stow_instances", "STOW-RS parts, by outcome: stored, failed",
            ["outcome"], registry=r)
        self.studies = Counter(
            "pxsgate_studies", "studies finished, by result status", ["outcome"], registry=r)
        self.study_retries = Counter(
            "pxsgate_study_retries", "tries of a study after a failed one", registry=r)
        self.prior_lookups = Counter(
            "pxsgate_prior_lookups", "priors asked of the PACS, by what the waiting result "
            "saw (found, none-found, timeout, refused, failed)", ["outcome"], registry=r)
        self.priors_fetched = Counter(
            "pxsgate_priors_fetched", "prior studies fetched from the PACS and embedded",
            registry=r)
        self.model_input_decodes = Counter(
            "pxsgate_model_input_decodes", "model inputs decoded and preprocessed, by when: "
            "arrival (decode on arrival, while the study settles), ready (once the study is "
            "ready)", ["stage"], registry=r)
        self.early_decodes = Counter(
            "pxsgate_early_decodes", "instances meant for decode on arrival, by outcome: used "
            "(its model input was scored), unused (not selected, or its file changed), "
            "failed (decoded again when ready), skipped (not started before the study was "
            "ready, or too many waiting), evicted (the cache was full)", ["outcome"],
            registry=r)
        self.studies_in_progress = Gauge(
            "pxsgate_studies_in_progress", "studies being processed", registry=r)
        self.studies_waiting = Gauge(
            "pxsgate_studies_waiting",
            "studies ready and not finished: in progress or waiting their turn", registry=r)
        self.inference_queue = Gauge(
            "pxsgate_inference_queue_images", "images waiting for the model", registry=r)
        self.batch_size = Histogram(
            "pxsgate_inference_batch_size", "images per forward pass", buckets=BATCH_BUCKETS,
            registry=r)
        self.inference_seconds = Histogram(
            "pxsgate_inference_batch_seconds", "time of one batch on the model",
            buckets=INFERENCE_BUCKETS, registry=r)
        self.inference_failures = Counter(
            "pxsgate_inference_failures", "images the model failed on (alone)",
            registry=r)
        self.latency = Histogram(
            "pxsgate_study_latency_seconds",
            "last instance received to result stored, per scored or failed study",
            buckets=LATENCY_BUCKETS,
            registry=r)
        self.exports = Counter(
            "pxsgate_exports", "delivery attempts by exporter and outcome "
            "(delivered, failed: retried later, dead)", ["exporter", "outcome"], registry=r)
        self.deliveries_pending = Gauge(
            "pxsgate_deliveries_pending", "deliveries waiting to be sent", registry=r)
        self.spool_bytes = Gauge(
            "pxsgate_spool_bytes", "bytes of instances kept in the spool", registry=r)
        self.disk_free_bytes = Gauge(
            "pxsgate_data_disk_free_bytes", "free bytes on the data directory's file system",
            registry=r)
        self.gpu_memory_bytes = Gauge(
            "pxsgate_gpu_memory_allocated_bytes", "GPU memory held by tensors (CUDA only)",
            registry=r)
        self.up = Gauge("pxsgate_healthy", "1 while the model worker is healthy", registry=r)
        # The drift alarm (pxsgate.trends), refreshed by the supervisor every few minutes.
        self.score_drift_ks = Gauge(
            "pxsgate_score_drift_ks", "two-sample Kolmogorov-Smirnov D of the latest window's "
            "headline scores against the reference period's (NaN: a window has none)",
            registry=r)
        self.score_drift_alarm = Gauge(
            "pxsgate_score_drift_alarm", "1 when D >= ui.drift-threshold with at least "
            "ui.drift-min-studies scored studies in each window", registry=r)
        self.score_drift_studies = Gauge(
            "pxsgate_score_drift_studies", "scored studies in each window of the drift alarm",
            ["window"], registry=r)
        self.score_drift_ks.set(math.nan)

    def watch(self, *, associations: Callable[[], int], in_progress: Callable[[], int],
              waiting: Callable[[], int], inference_queue: Callable[[], int],
              spool_bytes: Callable[[], int], data_dir: Path,
              healthy: Callable[[], bool], gpu_memory: Callable[[], float] | None) -> None:
        """Connect the gauges of live state to where it lives."""
        self.associations_active.set_function(lambda: float(associations()))
        self.studies_in_progress.set_function(lambda: float(in_progress()))
        self.studies_waiting.set_function(lambda: float(waiting()))
        self.inference_queue.set_function(lambda: float(inference_queue()))
        self.spool_bytes.set_function(lambda: float(spool_bytes()))
        self.disk_free_bytes.set_function(lambda: float(_free(data_dir)))
        self.up.set_function(lambda: float(healthy()))
        if gpu_memory is not None:
            self.gpu_memory_bytes.set_function(lambda: float(gpu_memory()))

    def set_drift(self, drift: Drift) -> None:
        self.score_drift_ks.set(math.nan if drift.statistic is None else drift.statistic)
        self.score_drift_alarm.set(1.0 if drift.alarm else 0.0)
        self.score_drift_studies.labels("latest").set(drift.latest_n)
        self.score_drift_studies.labels("reference").set(drift.reference_n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
