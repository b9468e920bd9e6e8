"""Association-time access control of Listing 1: sources, called AE titles, max-associations."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE

from pxsgate import synth
from pxsgate.scu import echo, send_datasets

from .conftest import Service, start_service, stop_service

RESTRICTED = """    max-associations: 1
    log-dimse-datasets: true
    reject-unknown-sources: true
    sources:
      - host-ip: 127.0.0.1
        ae-title: RMS"""


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # UNMAPPED is a listed AE title that no pipeline-mapping names.
    # log-dimse-datasets logs headers (PHI) only when logging.include-phi says so too.
    svc = start_service(tmp_path_factory.mktemp("restricted"), extra_scp=RESTRICTED,
                        level="debug", ae_titles=("PxsScore", "UNMAPPED"),
                        extra="  include-phi: true\n")
    yield svc
    assert stop_service(svc) == 0


def _associate(port: int, calling: str, called: str = "PxsScore") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_listed_source_is_accepted(restricted: Service) -> None:
    assert echo("127.0.0.1", restricted.port, calling_ae="RMS") == 0


def test_unknown_calling_ae_is_rejected_and_logged(restricted: Service) -> None:
    assoc = _associate(restricted.port, "INTRUDER")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    time.sleep(0.2)
    events = [e for e in restricted.logs if e.get("event") == "association.rejected"]
    assert any(e["calling_ae"] == "INTRUDER" and e["reason"] == "unknown source"
               for e in events)


def test_called_ae_without_a_pipeline_is_rejected(restricted: Service) -> None:
    assoc = _associate(restricted.port, "RMS", called="UNMAPPED")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)


def test_max_associations_rejects_as_local_limit(restricted: Service) -> None:
    first = _associate(restricted.port, "RMS")
    try:
        assert first.is_established  # type: ignore[attr-defined]
        second = _associate(restricted.port, "RMS")
        assert second.is_rejected  # type: ignore[attr-defined]
        rj = second.acceptor.primitive  # type: ignore[attr-defined]
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
    finally:
        first.release()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not [e for e in restricted.logs if e.get("event") == "association.rejected"
               and e.get("reason") == "too many associations"]:
        assert time.monotonic() < deadline, "the limit's rejection is logged"
        time.sleep(0.05)


def test_log_dimse_datasets_logs_the_header_at_debug(restricted: Service) -> None:
    # The troubleshooting switch: the whole header (PHI included, which is why it is off by
    # default and at debug level), never the pixel data.
    study = synth.hospital_feed(seed=404, rows=512, cols=512, prefix="ACCESS")[0]
    assert send_datasets("127.0.0.1", restricted.port, list(study.datasets),
                         calling_ae="RMS").ok
    restricted.wait_for([str(study.datasets[0].StudyInstanceUID)])
    logged = [e for e in restricted.logs if e.get("event") == "instance.dataset"]
    assert logged
    assert logged[-1]["level"] == "debug"
    assert str(study.datasets[0].PatientID) in logged[-1]["dataset"]
    assert "Pixel Data" not in logged[-1]["dataset"]
