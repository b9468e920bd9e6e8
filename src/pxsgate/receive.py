"""DICOM reception: the pynetdicom SCP, access control, and the C-STORE handler.

pynetdicom runs every association on its own thread, so the handlers here run off the event
loop. The C-STORE handler does the least it can: hand the bytes as received to
:mod:`pxsgate.intake` (the checks, the fsynced spool write, the index in SQLite by the loop)
and only then answer Success. It never decodes pixel data.

Errors become DICOM status codes here (PS3.4 Annex B.2.3 and PS3.7 Annex C):
  0xA700  Refused: Out of Resources     (disk below its floor, spool at its ceiling, too
                                         many studies waiting, the store failed or did
                                         not answer in time: the sender retries later)
  0xA900  Error: Data Set does not match SOP Class (identifiers differ from the request)
  0xC210  Error: Cannot understand       (unparseable data set, missing or invalid UIDs;
                                         the code pynetdicom's own storage SCP uses)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

import structlog
from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated names
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target, validate_uid

from pxsgate.config import DicomConfig, TlsConfig
from pxsgate.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Admission,
    Arrival,
    InstanceHandler,
    Intake,
    Refusal,
)
from pxsgate.priors.inbox import MoveInbox
from pxsgate.records import Indexed, ReceivedInstance
from pxsgate.service.failpoints import Failpoints
from pxsgate.service.metrics import Metrics
from pxsgate.spool import Spool

log = structlog.get_logger("pxsgate.receive")

MAX_AE_LABELS = 64  # distinct calling AE titles with their own metric series

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 section 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation)

ClosedHandler = Callable[[str], None]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


class Receiver:
    """The storage SCP. Start it with a running loop; it hands instances to that loop."""

    def __init__(
        self,
        dicom: DicomConfig,
        spool: Spool,
        loop: asyncio.AbstractEventLoop,
        on_instance: InstanceHandler,
        on_closed: ClosedHandler,
        admit: Admission = lambda size: 0.0,
        failpoints: Failpoints | None = None,
        metrics: Metrics | None = None,
        label: Callable[[str], str] = lambda uid: uid[-12:],
        include_phi: bool = False,
        move_inbox: MoveInbox | None = None,
        intake: Intake | None = None,
    ) -> None:
        config = dicom.scp
        # Priors pxsgate retrieves by C-MOVE arrive here, told apart by their move
        # originator: they go to the inbox, never to the spool's studies.
        self._move_inbox = move_inbox
        self._config = config
        self._failpoints = failpoints or Failpoints()
        self._metrics = metrics or Metrics()
        self._label = label  # how logs name a study
        # Listing 1's switch; the headers carry PHI, so logging.include-phi must say so too.
        self._log_datasets = config.log_dimse_datasets and include_phi
        self._opened: dict[str, float] = {}  # association id -> monotonic start
        self._counts: dict[str, int] = {}  # association id -> instances stored
        self._ae_labels: set[str] = set()
        self._loop = loop
        self._on_closed = on_closed
        # A called AE title is served when it is listed and a pipeline maps it (Listing 1).
        mapped = {m.clara_ae_title.strip() for m in dicom.pipeline_mappings}
        self._titles = {t.ae_title.strip() for t in config.ae_titles} & mapped
        self._sources = {(s.host_ip, s.ae_title.strip()) for s in config.sources}
        # The gateway's Intake, shared with STOW-RS (pxsgate.stow); else one of its own.
        self._intake = intake or Intake(spool, loop, on_instance,
                                        max_dataset_mb=config.max_dataset_mb, admit=admit,
                                        failpoints=self._failpoints)
        self._ids = itertools.count(1)
        self._assoc_ids: dict[int, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        # Connections that have not asked for an association yet, oldest first, and the
        # associations past _on_requested: only the latter count against max-associations.
        self._pending: OrderedDict[int, Any] = OrderedDict()
        self._associated: dict[int, Any] = {}

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> int:
        """Open the port; return the port actually bound (useful with port 0)."""
        ae = AE(ae_title=sorted(self._titles)[0])
        # Several called AE titles are accepted, so the check is ours (_on_requested).
        ae.require_called_aet = False
        # pynetdicom's own limit counts every connection, silent ones included; ours counts
        # associations (_on_requested). Its limit stays as a backstop for threads that are
        # still winding down.
        config = self._config
        ae.maximum_associations = 2 * config.max_associations + config.max_pending_connections
        ae.network_timeout = self._config.network_timeout
        ae.acse_timeout = self._config.acse_timeout
        ae.dimse_timeout = self._config.dimse_timeout
        ae.maximum_pdu_size = self._config.max_pdu_size
        syntaxes = list(self._config.transfer_syntaxes)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        if self._config.verification.enabled:
            echo_syntaxes = list(self._config.verification.transfer_syntaxes)
            ae.add_supported_context(Verification, echo_syntaxes)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        tls = self._config.tls
        # ae.start_server(block=False), with a server class of ours (_Server: no TLS
        # handshake on the thread that accepts connections).
        server = ae.make_server(
            (self._config.host, self._config.port), evt_handlers=handlers,
            ssl_context=server_ssl_context(tls) if tls.enabled else None,
            server_class=_Server)
        thread = threading.Thread(target=make_target(server.serve_forever),
                                  name="pxsgate-accept", daemon=True)
        thread.start()
        ae._servers.append(server)  # as start_server does: server.shutdown() removes it
        self._server = server
        port: int = server.server_address[1]
        return port

    def stop(self, grace: float = 0.0) -> int:
        """Close the port (no new associations), give the associations in progress up to
        ``grace`` seconds to finish, then abort the rest (their last unanswered instance is
        not acknowledged, so the sender sends it again). Returns how many were aborted."""
        server, self._server = self._server, None
        if server is None:
            return 0
        server.shutdown()  # closes the listening socket; running associations go on
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = list(server.active_associations)
        for assoc in left:
            assoc.abort()
        return len(left)

    @property
    def active(self) -> int:
        """Associations in progress."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    # --- association events (association threads) ----------------------------------------

    def _association_id(self, assoc: Any) -> str:
        with self._lock:
            key = id(assoc)
            if key not in self._assoc_ids:
                self._assoc_ids[key] = f"a{next(self._ids):06d}"
            return self._assoc_ids[key]

    def _on_conn_open(self, event: evt.Event) -> None:
        """A TCP connection (the connection's own thread, before its association starts).
        It has artim-timeout seconds to ask for an association (TLS handshake included);
        beyond max-pending-connections such connections, the oldest is closed now: a
        router's A-ASSOCIATE-RQ follows its connection within milliseconds, a port scan's or
        a probe's never does."""
        assoc = event.assoc
        assoc.acse_timeout = self._config.artim_timeout  # read when it waits for the RQ
        with self._lock:
            _prune(self._pending)
            self._pending[id(assoc)] = assoc
            evicted = []
            while len(self._pending) > self._config.max_pending_connections:
                evicted.append(self._pending.popitem(last=False)[1])
        for old in evicted:
            self._metrics.associations_rejected.labels(reason="idle connection").inc()
            log.warning("connection.dropped", reason="too many connections without an "
                        "association request", peer=old.requestor.address,
                        max_pending_connections=self._config.max_pending_connections)
            _close_pending(old)
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if isinstance(sock, ssl.SSLSocket):
            self._handshake(assoc, sock)

    def _handshake(self, assoc: Any, sock: ssl.SSLSocket) -> None:
        """The TLS handshake, here on the connection's thread rather than on the one that
        accepts connections (where a silent peer would stop every other from connecting),
        within the ARTIM time. A failed one closes the connection."""
        previous = sock.gettimeout()
        started = time.monotonic()
        try:
            sock.settimeout(self._config.artim_timeout)
            sock.do_handshake()
            sock.settimeout(previous)
            # The A-ASSOCIATE-RQ gets what is left of the ARTIM time, not a second one.
            left = self._config.artim_timeout - (time.monotonic() - started)
            assoc.acse_timeout = max(0.1, left)
        except (OSError, ValueError) as exc:
            log.warning("connection.dropped", reason="TLS handshake failed",
                        peer=assoc.requestor.address, error=type(exc).__name__)
            with self._lock:
                self._pending.pop(id(assoc), None)
            _close_pending(assoc)

    def _on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor.primitive
        assert rq is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is in
        event.assoc.acse_timeout = self._config.acse_timeout  # ARTIM is over: release etc.
        called = rq.called_ae_title.strip()
        calling = rq.calling_ae_title.strip()
        address = event.assoc.requestor.address
        reject: tuple[int, int, int] | None = None
        reason = ""
        if called not in self._titles:
            reject, reason = REJECT_CALLED_AE, "called AE title not served"
        elif self._config.reject_unknown_sources and (address, calling) not in self._sources:
            reject, reason = REJECT_CALLING_AE, "unknown source"
        with self._lock:
            self._pending.pop(id(event.assoc), None)
            _prune(self._associated)
            if reject is None:
                if len(self._associated) >= self._config.max_associations:
                    reject, reason = REJECT_LOCAL_LIMIT, "too many associations"
                else:
                    self._associated[id(event.assoc)] = event.assoc
        if reject is not None:
            self._metrics.associations_rejected.labels(reason=reason).inc()
            log.warning("association.rejected", reason=reason, called_ae=called,
                        calling_ae=calling, peer=address,
                        max_associations=self._config.max_associations)
            event.assoc.acse.send_reject(*reject)
            event.assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        """A rejection by pynetdicom itself: its backstop limit on connections (PS3.8 local
        limit exceeded, 2-3-2). Ours (_on_requested) are counted there and do not come
        here."""
        rq = event.assoc.requestor
        self._metrics.associations_rejected.labels(reason="too many associations").inc()
        log.warning("association.rejected", reason="too many associations",
                    calling_ae=rq.ae_title.strip(), peer=rq.address,
                    max_associations=self._config.max_associations)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc_id = self._association_id(event.assoc)
        calling = event.assoc.requestor.ae_title.strip()
        with self._lock:
            self._opened[assoc_id] = time.monotonic()
        self._metrics.associations.labels(calling_ae=self._ae_label(calling)).inc()
        log.info("association.accepted", association_id=assoc_id, calling_ae=calling,
                 called_ae=_called_ae(event), peer=event.assoc.requestor.address)

    def _ae_label(self, calling: str) -> str:
        """The calling AE title as a metric label. A peer chooses it, so only the first
        MAX_AE_LABELS distinct titles get their own series; later ones count as "other"."""
        with self._lock:
            if calling in self._ae_labels or len(self._ae_labels) < MAX_AE_LABELS:
                self._ae_labels.add(calling)
                return calling
        return "other"

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            self._pending.pop(id(event.assoc), None)
            self._associated.pop(id(event.assoc), None)
            assoc_id = self._assoc_ids.pop(id(event.assoc), None)
            opened = self._opened.pop(assoc_id or "", None)
            count = self._counts.pop(assoc_id or "", 0)
        if assoc_id is None:
            return  # rejected or never accepted: it brought no instances
        duration = round((time.monotonic() - opened) * 1000, 1) if opened else None
        log.info("association.closed", association_id=assoc_id,
                 released=bool(event.assoc.is_released), instances=count,
                 duration_ms=duration)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service stopped
            self._loop.call_soon_threadsafe(self._on_closed, assoc_id)

    @staticmethod
    def _on_dimse_recv(event: evt.Event) -> None:
        """A C-STORE request whose command set carries an invalid UID (over 64 characters)
        would make pynetdicom drop the association without a word when it builds the
        request: the UID is swapped for a marker here, so that the request reaches
        _on_store and is answered 0xC210 like an invalid UID in the data set."""
        command = event.message.command_set
        if command.get("CommandField") != C_STORE_RQ_FIELD:
            return
        for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            value = command.get(keyword)
            if value is not None and not validate_uid(UID(str(value))):
                command[keyword].value = INVALID_REQUEST_UID

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        assoc_id = self._association_id(event.assoc)
        inbox = self._move_inbox
        if inbox is not None and inbox.claims(
                cast(C_STORE, event.request).MoveOriginatorApplicationEntityTitle):
            return self._prior_arrived(event, inbox, assoc_id)
        try:
            instance, indexed, delay = self._receive(event, assoc_id)
        except Refusal as refusal:
            self._metrics.instances_refused.labels(status=f"0x{refusal.status:04X}").inc()
            log.warning("instance.refused", association_id=assoc_id,
                        status=f"0x{refusal.status:04X}", reason=refusal.comment)
            return _status(refusal.status, refusal.comment)
        except Exception as exc:  # nothing a peer sends may take the association down
            self._metrics.instances_refused.labels(status="0xA700").inc()
            log.error("instance.error", association_id=assoc_id, error=repr(exc))
            return _status(STATUS_OUT_OF_RESOURCES, "internal error")
        self._metrics.instances.inc()
        self._metrics.instance_bytes.inc(instance.size)
        with self._lock:
            self._counts[assoc_id] = self._counts.get(assoc_id, 0) + 1
        sop_class = UID(instance.sop_class_uid).name
        study = self._label(instance.study_instance_uid)
        if indexed.outcome in ("duplicate", "revived"):
            # The bytes already held: one event, and the study is left as it is.
            log.info("instance.duplicate", association_id=assoc_id, size=instance.size,
                     sop_class=sop_class, study=study, revived=indexed.outcome == "revived")
        else:
            # reopens: false for a non-image object or one pxsgate made (its own SR sent
            # back by a router): indexed, without scoring the study again.
            log.info("instance.stored", association_id=assoc_id, size=instance.size,
                     sop_class=sop_class, study=study, kind=indexed.kind,
                     reopens=indexed.outcome != "attached")
        if delay > 0:
            # Backpressure: the sender waits for this answer before its next C-STORE.
            log.info("instance.delayed", association_id=assoc_id, delay_s=round(delay, 3))
            time.sleep(delay)
        if self._log_datasets:
            # Listing 1's switch, for troubleshooting: the whole header, PHI included, at
            # debug level. Off by default, so datasets never reach the logs unasked.
            header = event.dataset.copy()
            header.pop(0x7FE00010, None)  # not the pixel data
            log.debug("instance.dataset", association_id=assoc_id, dataset=str(header))
        return STATUS_SUCCESS

    def _prior_arrived(self, event: evt.Event, inbox: MoveInbox, assoc_id: str
                       ) -> int | Dataset:
        """A C-STORE sub-operation of a C-MOVE pxsgate asked for (a prior from the PACS):
        written for its lookup, never indexed as a study's instance."""
        try:
            study_uid = str(event.dataset.get("StudyInstanceUID", ""))
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # a peer's bytes can fail in any way pydicom can
            return _status(STATUS_CANNOT_UNDERSTAND, "cannot parse the data set")
        status, comment = inbox.store(study_uid, data)
        log.info("prior.instance", association_id=assoc_id, size=len(data),
                 status=f"0x{status:04X}")
        return _status(status, comment) if status else STATUS_SUCCESS

    def _receive(self, event: evt.Event, assoc_id: str
                 ) -> tuple[ReceivedInstance, Indexed, float]:
        request = cast(C_STORE, event.request)
        received = cast(BytesIO, request.DataSet)
        # The bytes as received, without copying 10+ MB images around: a Part-10 header
        # (preamble, DICM, file meta) and a zero-copy view of the data set.
        header = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        with received.getbuffer() as stream:  # released before pynetdicom reuses the buffer
            return self._store_parts(event, assoc_id, request, received, header, stream)

    def _store_parts(self, event: evt.Event, assoc_id: str, request: C_STORE,
                     received: BytesIO, header: bytes, stream: memoryview
                     ) -> tuple[ReceivedInstance, Indexed, float]:
        if INVALID_REQUEST_UID in (request.AffectedSOPInstanceUID,
                                   request.AffectedSOPClassUID):
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "invalid UID in the C-STORE request")
        arrival = Arrival(calling_ae=event.assoc.requestor.ae_title.strip(),
                          called_ae=_called_ae(event),
                          peer_address=str(event.assoc.requestor.address),
                          association_id=assoc_id,
                          transfer_syntax=event.context.transfer_syntax)
        return self._intake.store(arrival, received, header, stream, expected=(
            str(request.AffectedSOPInstanceUID), str(request.AffectedSOPClassUID)))

C_STORE_RQ_FIELD = 0x0001
# Stands in for an invalid UID of a C-STORE request's command set (_on_dimse_recv): valid
# syntax, so that pynetdicom accepts it; never a real instance's UID.
INVALID_REQUEST_UID = "0.0.0.0.0"

class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, except that a TLS connection's handshake is left to
    the connection's own thread (Receiver._handshake, within the ARTIM time): pynetdicom
    does it on the accepting thread, where one peer that connects and stays silent would
    keep every other peer from connecting."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def _prune(connections: dict[int, Any]) -> None:
    """Forget connections whose thread has ended (not every ending fires EVT_CONN_CLOSE:
    an ARTIM expiry does not)."""
    for key in [k for k, a in connections.items() if a.ident is not None and not a.is_alive()]:
        del connections[key]


def _close_pending(assoc: Any) -> None:
    """Close a connection that has not asked for an association: the socket is shut down
    (a TLS handshake in progress fails) and the association's thread, waiting for the
    A-ASSOCIATE-RQ, is woken with nothing, which is what its ARTIM expiry does."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    assoc.dul.to_user_queue.put(None)


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS server context for DICOM TLS: TLS 1.2+, the configured certificate, and client
    certificates verified against the CA bundle when required."""
    assert tls.certificate is not None
    assert tls.private_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


def _called_ae(event: evt.Event) -> str:
    """The AE title the peer called (pxsgate serves several)."""
    primitive = event.assoc.requestor.primitive
    if primitive is not None:
        return str(primitive.called_ae_title).strip()
    return str(event.assoc.acceptor.ae_title).strip()
