"""What a sysadmin sees: Prometheus metrics scraped from the running service, and the log's
key events with their correlation fields and without PHI."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from pxsgate.tools.scu import send_datasets

from .conftest import free_port, start_service, stop_service
from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_move_when_a_study_goes_through(tmp_path: Path) -> None:
    http_port = free_port()
    svc = start_service(tmp_path, http_port=http_port)
    try:
        before = scrape(http_port)
        assert before[("pxsgate_healthy", ())] == 1.0
        study = ap_study(601, "METRICS")
        assert send_datasets("127.0.0.1", svc.port, study, calling_ae="ROUTER-M").ok
        ae = AE(ae_title="ROUTER-M")
        ae.add_requested_context("1.2.840.10008.1.1")
        refused = ae.associate("127.0.0.1", svc.port, ae_title="NOT-SERVED")
        assert not refused.is_established
        svc.wait_for([str(study[0].StudyInstanceUID)])
        after = scrape(http_port)
    finally:
        assert stop_service(svc) == 0

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("pxsgate_associations_total", calling_ae="ROUTER-M") == 1
    assert moved("pxsgate_associations_rejected_total",
                 reason="called AE title not served") == 1
    assert moved("pxsgate_instances_received_total") == 1
    assert moved("pxsgate_instance_bytes_received_total") > 100_000
    assert moved("pxsgate_studies_total", outcome="SUCCEEDED") == 1
    assert moved("pxsgate_study_latency_seconds_count") == 1
    assert 0 < moved("pxsgate_study_latency_seconds_sum") < 60
    assert moved("pxsgate_inference_batch_size_count") >= 1
    assert moved("pxsgate_inference_batch_seconds_count") >= 1
    assert after[("pxsgate_spool_bytes", ())] > 100_000
    assert after[("pxsgate_data_disk_free_bytes", ())] > 0
    assert after[("pxsgate_studies_waiting", ())] == 0
    assert after[("pxsgate_inference_queue_images", ())] == 0


async def test_key_events_carry_correlation_fields_and_no_phi(tmp_path: Path) -> None:
    scored, skipped = ap_study(602, "LOGS", images=2), ap_study(603, "LOGSKIP")
    for ds in skipped:
        ds.SeriesDescription, ds.ViewPosition = "CHEST PA", "PA"
    phi = {str(ds.PatientID) for ds in scored + skipped} | {
        str(ds.PatientName) for ds in scored + skipped}
    phi.discard("")
    assert phi, "the synthetic studies carry a patient"
    async with gateway(tmp_path) as (gw, _):
        with structlog.testing.capture_logs() as logs:
            await send(gw, scored + skipped, calling_ae="ROUTER-L")
            for study in (scored, skipped):
                await result_of(gw, str(study[0].StudyInstanceUID))
            await gw.wait_idle()
        key = gw.store.study_label(str(scored[0].StudyInstanceUID))
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in logs:
        by_event.setdefault(entry["event"], []).append(entry)
    for event in ("association.accepted", "instance.stored", "association.closed",
                  "study.ready", "inference.batch", "result.stored", "study.skipped"):
        assert event in by_event, f"no {event} in the log"
    [accepted] = by_event["association.accepted"]
    assert accepted["calling_ae"] == "ROUTER-L"
    stored = by_event["instance.stored"]
    assert {e["association_id"] for e in stored} == {accepted["association_id"]}
    assert len(key) == 12
    assert key in {e["study"] for e in stored}
    [closed] = by_event["association.closed"]
    assert closed["instances"] == 3
    assert closed["duration_ms"] >= 0
    [result] = [e for e in by_event["result.stored"] if e["study"] == key]
    assert result["images"] == 2
    assert result["ready_to_inferred_ms"] >= 0
    assert result["inferred_to_stored_ms"] >= 0
    assert any(key in e["studies"] for e in by_event["inference.batch"])
    text = repr(logs)
    for value in phi:
        assert value not in text, "a patient identifier reached the log"
    assert str(scored[0].StudyInstanceUID) not in text, "study UIDs are hashed"
