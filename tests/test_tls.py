"""DICOM TLS: a CA, server and client certificates made in the test with openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from .conftest import Service, dcmtk, start_service, stop_service

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=pxsgate test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                 f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out",
                 f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Service]:
    tls = f"""    tls:
      certificate: {pki / 'server.pem'}
      private-key: {pki / 'server.key'}
      ca-certificates: {pki / 'ca.pem'}
      require-client-certificate: true"""
    svc = start_service(tmp_path_factory.mktemp("tls"), extra_scp=tls)
    yield svc
    assert stop_service(svc) == 0


def _echo(port: int, ctx: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    ae.network_timeout = 5
    tls_args = (ctx, "localhost") if ctx is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PxsScore", tls_args=tls_args)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def client_context(pki: Path, *, with_certificate: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_certificate:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_echo_over_tls_with_a_client_certificate(tls_service: Service, pki: Path) -> None:
    assert _echo(tls_service.port, client_context(pki, with_certificate=True))


def test_client_without_certificate_is_refused(tls_service: Service, pki: Path) -> None:
    assert not _echo(tls_service.port, client_context(pki, with_certificate=False))


def test_plain_tcp_is_refused(tls_service: Service, pki: Path) -> None:
    assert not _echo(tls_service.port, None)
    assert _echo(tls_service.port, client_context(pki, with_certificate=True))  # still up


def test_dcmtk_echoscu_over_tls(tls_service: Service, pki: Path) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "--enable-tls", str(pki / "client.key"), str(pki / "client.pem"),
         "--add-cert-file", str(pki / "ca.pem"), "-aec", "PxsScore", "127.0.0.1",
         str(tls_service.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_a_silent_connection_does_not_hold_up_the_tls_port(tls_service: Service,
                                                           pki: Path) -> None:
    """A peer that connects and never starts its TLS handshake (a port scan, a load
    balancer's TCP probe) must not stop others from connecting: the handshake runs on the
    connection's own thread, within the ARTIM time, not on the thread that accepts."""
    import socket
    import threading

    with socket.create_connection(("127.0.0.1", tls_service.port)) as silent:
        # In a thread: with the handshake on the accepting thread the echo never returns.
        answers: list[bool] = []
        context = client_context(pki, with_certificate=True)
        thread = threading.Thread(target=lambda: answers.append(_echo(tls_service.port, context)),
                                  daemon=True)
        thread.start()
        thread.join(timeout=20)
        assert answers == [True]
        silent.settimeout(0.2)
        with pytest.raises(TimeoutError):
            silent.recv(1)  # still open, waiting: only the ARTIM timer closes it
