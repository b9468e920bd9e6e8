"""structlog set-up: JSON lines on stdout under systemd (journald keeps them), a readable
console format on a terminal. Event names are stable so alerts can match on them:

    association.accepted / .rejected / .closed   connection.dropped
    instance.stored / .refused / .duplicate
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

import logging
import sys
from typing import Literal, TextIO

import structlog

Format = Literal["auto", "json", "console"]


def configure_logging(fmt: Format = "auto", level: str = "info",
                      stream: TextIO | None = None) -> None:
    """Configure structlog for this process (the CLI calls this once, at start-up): to
    ``stream``, by default the standard output of the moment."""
    out = sys.stdout if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
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
