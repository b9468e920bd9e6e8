"""Where a C-MOVE's sub-operations land: the PACS sends a prior's instances to pxsgate's own
SCP, each C-STORE carrying the move originator (PS3.7 9.1.1.1: Move Originator Application
Entity Title). The receiving thread hands those to this inbox instead of the spool: fetched
priors are never studies to score."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

# C-STORE statuses (PS3.4 Annex B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700


class MoveInbox:
    """The C-MOVE retrievals under way, by Study Instance UID: the files each one's
    sub-operations wrote. Thread-safe (retrievals run on worker threads, C-STOREs arrive on
    the SCP's association threads)."""

    def __init__(self, originator_ae_title: str) -> None:
        self.originator = originator_ae_title.strip()
        self._lock = threading.Lock()
        self._waiting: dict[str, Path] = {}
        self._names = itertools.count(1)

    def claims(self, move_originator: object) -> bool:
        """Whether a C-STORE with this Move Originator AE title belongs to a retrieval of
        ours (any other C-STORE, a C-MOVE another system asked for included, is a study
        sent to pxsgate as usual)."""
        if move_originator is None:
            return False
        if isinstance(move_originator, bytes):
            move_originator = move_originator.decode("ascii", "replace")
        return str(move_originator).strip() == self.originator

    @contextlib.contextmanager
    def expecting(self, study_uid: str, into: Path) -> Iterator[None]:
        """While the block runs, C-STOREs of ``study_uid`` are written into ``into``."""
        with self._lock:
            self._waiting[study_uid] = into
        try:
            yield
        finally:
            with self._lock:
                self._waiting.pop(study_uid, None)

    def store(self, study_uid: str, data: bytes | memoryview) -> tuple[int, str]:
        """Write one arrived instance (a whole Part-10 file); the C-STORE status and a
        comment. An instance no retrieval is waiting for (a late one, after its lookup
        ended) is refused: nothing is acknowledged that is then dropped."""
        with self._lock:
            into = self._waiting.get(study_uid)
            number = next(self._names)
        if into is None:
            return STATUS_OUT_OF_RESOURCES, "no prior retrieval is waiting for this study"
        path = into / f"move-{number:06d}.dcm"
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            return STATUS_OUT_OF_RESOURCES, f"cannot write the prior: {exc.strerror}"
        return STATUS_SUCCESS, ""
