"""Association-time access control of Listing 1: sources, called AE titles, max-associations."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from pxsgate.tools import synth
from pxsgate.tools.scu import echo, send_datasets

from .conftest import Service, dcmtk, start_service, stop_service

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


IDLE = """    max-associations: 4
    artim-timeout: 3
    max-pending-connections: 6"""


def _closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """True when the server closed ``sock`` (EOF or reset) within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_silent_connections_take_no_association_slot(tmp_path: Path) -> None:
    """Eight TCP connections that never send an A-ASSOCIATE-RQ (a port scan, a load
    balancer's probe) do not lock the router out of max-associations: 4. DCMTK's echoscu
    and storescu are served while they sit; beyond max-pending-connections the oldest
    silent ones are closed at once, and the rest when the ARTIM timer (artim-timeout)
    expires."""
    svc = start_service(tmp_path, extra_scp=IDLE)
    silent = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(8)]
    try:
        time.sleep(0.5)  # every connection has its thread waiting for an RQ
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "PxsScore", "127.0.0.1",
                               str(svc.port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        study = synth.hospital_feed(seed=405, rows=256, cols=256, prefix="IDLE")[0]
        files = synth.write_feed([study], tmp_path / "feed")
        store = subprocess.run([dcmtk("storescu"), "-aec", "PxsScore", "127.0.0.1",
                                str(svc.port), *map(str, files)],
                               capture_output=True, text=True, timeout=30)
        assert store.returncode == 0, store.stdout + store.stderr
        # The oldest were closed when later ones connected; the newest are still open, were
        # served nothing, and are closed by the ARTIM timer.
        assert all(_closed_by_peer(s, 0.5) for s in silent[:2])
        assert not any(_closed_by_peer(s, 0.1) for s in silent[-2:])
        assert all(_closed_by_peer(s, 10) for s in silent[2:])
        uid = str(study.datasets[0].StudyInstanceUID)
        assert svc.wait_for([uid])[uid]["status"] == "SUCCEEDED"
        rejected = [e for e in svc.logs if e.get("event") == "association.rejected"]
        assert rejected == [], rejected
        dropped = [e for e in svc.logs if e.get("event") == "connection.dropped"]
        # The two at connect time, and one more for each of DCMTK's connections that found
        # six silent ones pending (the ARTIM timer may have closed some before the second).
        assert 2 < len(dropped) <= 4, dropped
    finally:
        for s in silent:
            s.close()
        assert stop_service(svc) == 0
