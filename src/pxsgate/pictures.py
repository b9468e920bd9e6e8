"""Pictures of each study for people: every instance's thumbnail and each scored image's
exact model input, made when the study is processed and kept after retention deletes the
DICOM files, so that pages never decode DICOM on request.

Under ``storage.data-dir/pictures/``:

- ``ab/cd/<key>.input.png``: the 8-bit 320x320 image the model scored (lossless PNG, about
  45 KB), saved right after it was decoded; the Secondary Capture exporter reads it back;
- ``ab/cd/<key>.thumb.webp``: the instance's thumbnail (longest side ``THUMBNAIL_SIDE``,
  windowed as the preprocessing normalises, not equalised; WebP, a few KB), made for every
  instance of the study, used or not, after its result is stored, by
  :class:`Thumbnailer` in a decode process that runs only when a core is idle;
- ``secret``: the key of the names (made at first use, mode 0600).

``<key>`` is an HMAC-SHA256 of the SOP Instance UID under that secret: no UID, nor
anything that a UID can be checked against without the secret, appears in a path; the
pages name a picture by its key (:meth:`FilePictures.by_key`). Writes are atomic (a
temporary file, fsynced, renamed into place); a picture that cannot be written is logged
and skipped, never failing the study. Pictures are removed only by ``pictures.keep-days``
(:meth:`FilePictures.prune`, run by retention), never with the spool's files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import io
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import structlog
from PIL import Image, features

from pxsgate.errors import PreprocessError
from pxsgate.preprocess import THUMBNAIL_SIDE, U8Array
from pxsgate.records import StoredInstance

__all__ = [
    "MAX_PENDING_STUDIES",
    "MAX_THUMBNAILS_PER_STUDY",
    "THUMBNAIL_SIDE",
    "FilePictures",
    "Kind",
    "PictureStore",
    "StudyPicture",
    "Thumbnailer",
    "pictures_of_study",
    "study_pictures",
]

log = structlog.get_logger("pxsgate.pictures")

Kind = Literal["model-input", "thumbnail"]
MODEL_INPUT_SUFFIX = ".input.png"
WEBP = features.check("webp")  # Debian's Pillow has it; PNG where it does not
THUMBNAIL_SUFFIX = ".thumb.webp" if WEBP else ".thumb.png"
THUMBNAIL_SUFFIXES = (".thumb.webp", ".thumb.png")
WEBP_QUALITY = 85
MAX_THUMBNAILS_PER_STUDY = 64  # a CT series sent by mistake: its first 64 images only
MAX_PENDING_STUDIES = 256  # studies waiting for thumbnails; beyond it the oldest is dropped
PRUNE_EVERY_S = 3600.0
TEMP_PREFIX = ".tmp-"
_KEY = re.compile(r"^[0-9a-f]{64}$")


class PictureStore(Protocol):
    """Where a study's pictures are kept (:class:`FilePictures`). The save methods never
    raise: a failure is logged and returns None."""

    def save_model_input(self, sop_uid: str, image: U8Array) -> Path | None: ...

    def save_thumbnail(self, sop_uid: str, image: U8Array) -> Path | None: ...

    def model_input(self, sop_uid: str) -> Path | None: ...

    def thumbnail(self, sop_uid: str) -> Path | None: ...

    def key(self, sop_uid: str) -> str: ...

    def by_key(self, key: str, kind: Kind) -> Path | None: ...

    def load_model_input(self, sop_uid: str) -> U8Array | None: ...

    def prune(self, older_than: float) -> int: ...


class FilePictures:
    """The pictures as files under ``root``, named by key in two-level fan-out folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._secret: bytes | None = None

    # --- names ----------------------------------------------------------------------------

    def _load_secret(self) -> bytes:
        if self._secret is None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / "secret"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(secrets.token_hex(32))
                    f.flush()
                    os.fsync(f.fileno())
            text = path.read_text(encoding="ascii").strip()
            if len(text) < 32:
                raise OSError(f"pictures secret is too short ({len(text)} characters)")
            self._secret = text.encode("ascii")
        return self._secret

    def key(self, sop_uid: str) -> str:
        """The picture's name: HMAC-SHA256 of the SOP Instance UID (64 hex digits)."""
        return hmac.new(self._load_secret(), b"sop:" + sop_uid.encode(),
                        hashlib.sha256).hexdigest()

    def _folder(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4]

    def _path(self, key: str, kind: Kind) -> Path:
        suffix = MODEL_INPUT_SUFFIX if kind == "model-input" else THUMBNAIL_SUFFIX
        return self._folder(key) / (key + suffix)

    # --- writes ---------------------------------------------------------------------------

    def save_model_input(self, sop_uid: str, image: U8Array) -> Path | None:
        """The exact model input (2-D uint8), as lossless PNG."""
        return self._save(sop_uid, "model-input", image, "PNG", {})

    def save_thumbnail(self, sop_uid: str, image: U8Array) -> Path | None:
        """A thumbnail (2-D uint8, already small), as WebP (PNG without WebP support)."""
        if WEBP:
            return self._save(sop_uid, "thumbnail", image, "WEBP",
                              {"quality": WEBP_QUALITY, "method": 4})
        return self._save(sop_uid, "thumbnail", image, "PNG", {"optimize": True})

    def _save(self, sop_uid: str, kind: Kind, image: U8Array, fmt: str,
              options: Mapping[str, Any]) -> Path | None:
        try:
            if image.dtype != np.uint8 or image.ndim != 2:
                raise ValueError(f"a picture is a 2-D uint8 array, got {image.dtype} "
                                 f"{image.shape}")
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=fmt, **options)
            path = self._path(self.key(sop_uid), kind)
            _write_atomic(path, buffer.getvalue())
            return path
        except Exception as exc:  # the disk, the encoder: the study goes on without it
            error = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) \
                else f"{type(exc).__name__}: {exc}"[:200]
            log.warning("pictures.write_failed", kind=kind, error=error)
            return None

    # --- reads ----------------------------------------------------------------------------

    def model_input(self, sop_uid: str) -> Path | None:
        return self._of(sop_uid, "model-input")

    def thumbnail(self, sop_uid: str) -> Path | None:
        return self._of(sop_uid, "thumbnail")

    def _of(self, sop_uid: str, kind: Kind) -> Path | None:
        try:
            return self._existing(self.key(sop_uid), kind)
        except OSError:  # the folder cannot be read (its secret): as if there were none
            return None

    def by_key(self, key: str, kind: Kind) -> Path | None:
        """The picture named ``key`` (as :func:`study_pictures` lists them), or None; a
        key that is not 64 hexadecimal digits is None too (never a path elsewhere)."""
        if not _KEY.match(key):
            return None
        return self._existing(key, kind)

    def _existing(self, key: str, kind: Kind) -> Path | None:
        folder = self._folder(key)
        suffixes = (MODEL_INPUT_SUFFIX,) if kind == "model-input" else THUMBNAIL_SUFFIXES
        for suffix in suffixes:
            path = folder / (key + suffix)
            if path.is_file():
                return path
        return None

    def load_model_input(self, sop_uid: str) -> U8Array | None:
        """The model input as the array the model scored; None when there is none or it
        cannot be read (then the caller decodes the DICOM again)."""
        try:
            path = self.model_input(sop_uid)
            if path is None:
                return None
            with Image.open(path) as img:
                if img.mode != "L":
                    return None
                return np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # a damaged file: decode again
            log.warning("pictures.read_failed", kind="model-input", error=type(exc).__name__)
            return None

    # --- keep-days ------------------------------------------------------------------------

    def prune(self, older_than: float) -> int:
        """Remove the pictures last written before ``older_than`` (a Unix time), and
        temporary files a crash left behind; return how many pictures went."""
        removed = 0
        if not self.root.is_dir():
            return 0
        stale_temp = time.time() - PRUNE_EVERY_S
        for first in _subfolders(self.root):
            for second in _subfolders(first):
                with os.scandir(second) as entries:
                    for entry in entries:
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime
                            if entry.name.startswith(TEMP_PREFIX):
                                if mtime < stale_temp:
                                    os.unlink(entry.path)
                            elif mtime < older_than:
                                os.unlink(entry.path)
                                removed += 1
                        except FileNotFoundError:
                            continue
                with contextlib.suppress(OSError):  # not empty: kept
                    os.rmdir(second)
            with contextlib.suppress(OSError):
                os.rmdir(first)
        return removed


def _subfolders(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return [Path(e.path) for e in entries
                if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, fsynced,
    renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


# --- a study's pictures, for the pages ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyPicture:
    """One instance of a study with its decision and its pictures. ``key`` names the
    pictures without a UID (``FilePictures.by_key(key, kind)``); the paths are None where
    there is no such picture (a model input exists only for a scored image)."""

    sop_instance_uid: str
    series_instance_uid: str
    key: str
    selected: bool | None  # None: no decision recorded for it (a non-image object)
    rule: str
    reason: str
    thumbnail: Path | None
    model_input: Path | None


def study_pictures(detail: Mapping[str, Any], pictures: PictureStore) -> list[StudyPicture]:
    """Every instance of a study (``Store.study_detail``), in the order received, with its
    decision and its pictures; pxsgate's own objects (its SR, its SC) are left out. Reads
    the file system only (a stat per picture): no DICOM is opened."""
    decisions = {d["sop_instance_uid"]: d for d in detail.get("decisions", ())
                 if d.get("sop_instance_uid")}
    out = []
    for inst in detail.get("instances", ()):
        if inst.get("kind") == "own":
            continue
        uid = str(inst["sop_instance_uid"])
        decision = decisions.get(uid)
        key = pictures.key(uid)
        out.append(StudyPicture(
            sop_instance_uid=uid, series_instance_uid=str(inst["series_instance_uid"]),
            key=key, selected=None if decision is None else bool(decision["selected"]),
            rule="" if decision is None else str(decision["rule"]),
            reason="" if decision is None else str(decision["reason"]),
            thumbnail=pictures.by_key(key, "thumbnail"),
            model_input=pictures.by_key(key, "model-input")))
    return out


class _StudyDetails(Protocol):
    async def study_detail(self, study_uid: str) -> dict[str, Any] | None: ...


async def pictures_of_study(store: _StudyDetails, pictures: PictureStore,
                            study_uid: str) -> list[StudyPicture] | None:
    """:func:`study_pictures` of a study in the store (None: no such study)."""
    detail = await store.study_detail(study_uid)
    if detail is None:
        return None
    return await asyncio.to_thread(study_pictures, detail, pictures)


# --- thumbnails, in the background -------------------------------------------------------------


class Thumbnailer:
    """Makes the thumbnails of each processed study's instances after its result is stored,
    one image at a time, through ``make`` (``DecodePool.thumbnail``: a decode process that
    runs only when a core is idle), so that it never delays a result.

    Bounded: at most ``max_studies`` studies wait (beyond that the oldest waiting one is
    dropped, logged), each with at most ``MAX_THUMBNAILS_PER_STUDY`` instances; an instance
    that has its thumbnail already is skipped. Stopped with :meth:`close` (what is waiting
    is not made). Retention asks :meth:`pending` so that a study's files stay until its
    thumbnails are made."""

    def __init__(self, pictures: PictureStore, make: Callable[[Path], Awaitable[U8Array]],
                 *, label: Callable[[str], str] = lambda uid: "",
                 max_studies: int = MAX_PENDING_STUDIES) -> None:
        self._pictures = pictures
        self._make = make
        self._label = label
        self._max_studies = max_studies
        self._waiting: collections.OrderedDict[str, list[tuple[str, Path]]] = \
            collections.OrderedDict()
        self._current: str | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.made = 0  # thumbnails made since the start (a count for tests and metrics)
        self.failed = 0

    def submit(self, study_uid: str, instances: Iterable[StoredInstance]) -> None:
        """Make the thumbnails of the study's instances (on the loop)."""
        if self._closed:
            return
        wanted = [(i.sop_instance_uid, i.path) for i in instances]
        if len(wanted) > MAX_THUMBNAILS_PER_STUDY:
            log.info("pictures.capped", study=self._label(study_uid), instances=len(wanted),
                     thumbnails=MAX_THUMBNAILS_PER_STUDY)
            wanted = wanted[:MAX_THUMBNAILS_PER_STUDY]
        if not wanted:
            return
        self._waiting.pop(study_uid, None)
        self._waiting[study_uid] = wanted
        while len(self._waiting) > self._max_studies:
            dropped, _ = self._waiting.popitem(last=False)
            log.warning("pictures.dropped", study=self._label(dropped),
                        note="too many studies waiting for thumbnails")
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def pending(self, study_uid: str) -> bool:
        """Whether the study's thumbnails are still to be made (its files are needed)."""
        return study_uid == self._current or study_uid in self._waiting

    async def wait_idle(self) -> None:
        """Until every study submitted has its thumbnails (or failed them)."""
        await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        self._waiting.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._idle.set()

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            study_uid, wanted = self._waiting.popitem(last=False)
            self._current = study_uid
            try:
                await self._study(study_uid, wanted)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the thumbnails of later studies
                log.error("pictures.thumbnails_failed", study=self._label(study_uid),
                          error=repr(exc)[:300])
            finally:
                self._current = None

    async def _study(self, study_uid: str, wanted: Sequence[tuple[str, Path]]) -> None:
        made = failed = 0
        for sop_uid, path in wanted:
            if await asyncio.to_thread(self._pictures.thumbnail, sop_uid) is not None:
                continue
            try:
                image = await self._make(path)
            except PreprocessError as exc:  # not an image, or not one it can decode
                failed += 1
                log.debug("pictures.thumbnail_skipped", study=self._label(study_uid),
                          error=str(exc)[:200])
                continue
            if await asyncio.to_thread(self._pictures.save_thumbnail, sop_uid, image):
                made += 1
        self.made += made
        self.failed += failed
        if made or failed:
            log.debug("pictures.thumbnails", study=self._label(study_uid), made=made,
                      skipped=failed)
