"""structlog set-up: JSON lines under systemd (journald keeps them), a console format on a
terminal. Event names are stable (``association.accepted``, ``instance.stored``,
``study.skipped``, ``inference.batch``, ``result.stored``...) so alerts can match on them.

Patient names and IDs are never passed to the logger by pxsgate's code; study UIDs are
logged by their last 12 characters only.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

Format = Literal["auto", "json", "console"]


def configure_logging(fmt: Format = "auto", level: str = "info") -> None:
    """Configure structlog for this process (the CLI calls this once, at start-up)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs every PDU at INFO through the standard library; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
