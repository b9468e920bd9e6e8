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

import os
import re
import shutil
import uuid
from collections.abc import Sequence
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
            new_dir = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if new_dir:
                _fsync_dir(self.root)
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
            raise SpoolError(f"cannot write {final.name}: {exc.strerror or exc}") from exc
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
