"""structlog set-up: JSON lines on stdout under systemd (journald keeps them), a readable
console format on a terminal. Event names are stable so alerts can match on them:

    association.accepted / .rejected / .closed   connection.dropped
    instance.stored / .refused / .duplicate / .moved
    study.ready / .skipped / .retry / .failed / .crashed / .purged   result.stored
    inference.batch / .isolating / .failed / .stuck   export.delivered / .failed / .dead
    gateway.started / .stopping / .stopped / .unhealthy   spool.recovered  studies.resumed

Correlation fields: ``association_id`` (a000123) on everything an association did,
``study`` (a keyed hash of the StudyInstanceUID, 12 hex digits, which ``pxsgate trace``
accepts; the UID itself only with ``logging.include-phi``) on everything about a study,
``studies`` on an inference batch, ``delivery`` on exports; durations in ``*_ms`` fields.
Patient names and IDs are never passed to the logger by pxsgate's code.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Literal, TextIO

import structlog

Format = Literal["auto", "json", "console"]


# Library loggers whose messages may quote a data set's values (pydicom's warnings quote
# the value they could not read, a patient's name included; pynetdicom quotes a request's
# non-conformant UIDs) or a request's URL: their text is withheld unless
# logging.include-phi says otherwise.
_QUOTING_LOGGERS = ("py.warnings", "pydicom", "pynetdicom", "aiohttp")
WITHHELD = "message withheld: it may quote data set values (logging.include-phi shows it)"


class LibraryRecords(logging.Formatter):
    """What the libraries log through the standard library (and Python's warnings, and
    uncaught exceptions in threads), as one line in the service's own format: a JSON object
    like structlog's (event ``library.log``), or a console line. Without ``include_phi``
    the text of records that may quote data (pydicom, warnings, aiohttp, any traceback) is
    withheld; the logger, the level and the exception's type remain."""

    def __init__(self, use_json: bool, include_phi: bool) -> None:
        super().__init__()
        self._json = use_json
        self._phi = include_phi

    def format(self, record: logging.LogRecord) -> str:
        quoting = record.name.startswith(_QUOTING_LOGGERS) or record.exc_info is not None
        message = record.getMessage() if self._phi or not quoting else WITHHELD
        fields: dict[str, object] = {"logger": record.name, "message": message}
        if record.exc_info and record.exc_info[0] is not None:
            fields["exception"] = record.exc_info[0].__name__
            if self._phi:
                fields["traceback"] = self.formatException(record.exc_info)
        level = record.levelname.lower()
        if not self._json:
            extra = f" ({fields['exception']})" if "exception" in fields else ""
            return f"{level:<8} {record.name}: {message}{extra}"
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z")
        return json.dumps({**fields, "event": "library.log", "level": level,
                           "timestamp": stamp}, default=str)


def route_library_logs(use_json: bool, include_phi: bool, out: TextIO | None = None) -> None:
    """Send the standard library's logging, warnings and threads' uncaught exceptions
    through LibraryRecords on ``out`` (stdout): every line the process writes is the
    service's format, and none quotes data unless the switch says so."""
    handler = logging.StreamHandler(sys.stdout if out is None else out)
    handler.setFormatter(LibraryRecords(use_json, include_phi))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "pxsgate", False):
            root.removeHandler(old)
    handler.pxsgate = True  # type: ignore[attr-defined]  # marks ours, for a re-configure
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)

    def thread_failed(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            logging.getLogger("pxsgate.thread").error(
                "uncaught exception in thread %s",
                args.thread.name if args.thread else "?",
                exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback))

    threading.excepthook = thread_failed


def configure_logging(fmt: Format = "auto", level: str = "info",
                      stream: TextIO | None = None, include_phi: bool = False) -> None:
    """Configure structlog for this process (the CLI calls this once, at start-up): to
    ``stream``, by default the standard output of the moment. The libraries' records go
    the same way (route_library_logs)."""
    out = sys.stdout if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    route_library_logs(use_json, include_phi, out)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs every PDU at INFO through the standard library; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
