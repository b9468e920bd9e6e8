"""A real HTTP(S) server on loopback that records what the HTTP exporter POSTs.

It runs in a thread (http.server), so it serves both in-process gateways and ``pxsgate
serve`` subprocesses. ``answers`` scripts the status codes of the next requests (then 200);
``hold`` makes it keep requests open without answering, like a hung endpoint; ``reply``
gives the answer's body and Content-Type (default ``{}``), as a FHIR server answers.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    document: dict[str, Any]
    status: int
    client_cn: str | None = None


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    token: str | None = None
    hold: threading.Event = field(default_factory=threading.Event)  # set: hang requests
    release: threading.Event = field(default_factory=threading.Event)
    arrived: int = 0  # requests whose body was read, answered or not
    gets: int = 0  # GET requests (a redirected POST becomes one)
    # (status, the request) -> (body, Content-Type) of the answer; None: "{}"
    reply: Callable[[int, Received], tuple[bytes, str | None]] | None = None

    def accepted(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]


@contextmanager
def http_receiver(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    receiver = Receiver(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                receiver.arrived += 1
            if receiver.hold.is_set():
                receiver.release.wait(60)
            with lock:
                status = receiver.answers.pop(0) if receiver.answers else 200
                if receiver.token is not None and (
                        self.headers.get("Authorization") != f"Bearer {receiver.token}"):
                    status = 401
                cn = None
                if isinstance(self.connection, ssl.SSLSocket):
                    cert = self.connection.getpeercert()
                    if cert:
                        cn = dict(x[0] for x in cert["subject"]).get("commonName")
                received = Received(dict(self.headers), json.loads(body), status, cn)
                receiver.requests.append(received)
            answer, content_type = b"{}", None
            if receiver.reply is not None:
                answer, content_type = receiver.reply(status, received)
            self.send_response(status)
            if 300 <= status < 400:  # as a proxy moving the endpoint (http -> https) does
                self.send_header("Location", receiver.url)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:
            # What a redirected POST became (301/302 turn it into a GET): a page that
            # answers 200, as an index or a search would.
            with lock:
                receiver.gets += 1
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    receiver.url = f"{scheme}://localhost:{server.server_address[1]}/results"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()


def server_tls(pki: Path, require_client: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client:
        context.load_verify_locations(pki / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
    return context
