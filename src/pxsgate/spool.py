"""Durable instance files: one Part-10 file per SOP instance, fsynced before it is acknowledged.

Layout: ``<spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. UIDs come from the network and
are untrusted: a name is only built from a UID that matches the PS3.5 section 9.1 grammar
(digits and dots, no leading zeros, at most 64 characters), so nothing a peer sends can
escape the spool directory.

A write goes to a temporary name in the same directory, is fsynced, renamed into place and
the directory fsynced (the rename itself must be durable), so a crash leaves either the old
file, the new file or a ``.tmp`` leftover that :meth:`Spool.remove_leftovers` deletes; never
a half-written instance under its real name.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from pxsgate.errors import DiskFloorError, SpoolError

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TMP_SUFFIX = ".tmp"


def is_valid_uid(uid: str) -> bool:
    """True when ``uid`` is a syntactically valid DICOM UID (PS3.5 section 9.1)."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory; safe to use from several association threads at once."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        # Reception (association threads) and retention (the loop) never touch one study's
        # files at once: a study being written is not purged, and a write to a study being
        # purged waits until the purge is recorded.
        self._turns = threading.Condition()
        self._writing: collections.Counter[str] = collections.Counter()
        self._purging: set[str] = set()

    @contextlib.contextmanager
    def writing(self, study_uid: str) -> Iterator[None]:
        """Held by an association thread from writing an instance of the study until it is
        indexed."""
        with self._turns:
            self._turns.wait_for(lambda: study_uid not in self._purging)
            self._writing[study_uid] += 1
        try:
            yield
        finally:
            with self._turns:
                self._writing[study_uid] -= 1
                if not self._writing[study_uid]:
                    del self._writing[study_uid]

    def begin_purge(self, study_uid: str) -> bool:
        """Claim a study for deleting its files; False while an instance of it is being
        written (it is about to be re-opened: not finished after all)."""
        with self._turns:
            if self._writing[study_uid]:
                return False
            self._purging.add(study_uid)
            return True

    def end_purge(self, study_uid: str) -> None:
        with self._turns:
            self._purging.discard(study_uid)
            self._turns.notify_all()

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        for name, uid in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise SpoolError(f"{name} {uid[:80]!r} is not a valid DICOM UID")
        return self.root / study_uid / f"{sop_instance_uid}.dcm"

    def write(self, study_uid: str, sop_instance_uid: str,
              parts: Sequence[bytes | memoryview]) -> Path:
        """Write ``parts`` (concatenated) durably; return the final path. A re-sent instance
        replaces the file."""
        final = self.path_for(study_uid, sop_instance_uid)
        self._check_floor(sum(len(p) for p in parts))
        directory = final.parent
        tmp = directory / f".{sop_instance_uid}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            try:
                directory.mkdir(parents=True)
                _fsync_dir(self.root)  # the new directory's entry must be durable too
            except FileExistsError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(f"cannot write the instance file: {exc.strerror or exc}") from exc
        return final

    def _check_floor(self, incoming: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise DiskFloorError(
                f"spool disk below its floor ({free // 2**20} MiB free, "
                f"floor {self.min_free_bytes // 2**20} MiB)"
            )

    def instance_files(self) -> list[Path]:
        """Every instance file in the spool (``<study>/<sop>.dcm``)."""
        return [p for p in self.root.glob("*/*.dcm") if not p.name.startswith(".")]

    def remove_leftovers(self) -> int:
        """Delete temporary files a crash left behind; return how many."""
        count = 0
        for tmp in self.root.glob(f"*/.*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            count += 1
        return count
