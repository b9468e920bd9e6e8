"""Intake: one received data set made durable and indexed, whatever protocol brought it.

The checks a peer's bytes must pass before anything is acknowledged (size, admission, the
whole header parsed without the pixel data, a Deflated data set inflated in bounded chunks,
the declared pixel data within max-dataset-mb once decoded, valid UIDs), the fsynced spool
write, and the index in SQLite by the event loop. What fails becomes a :class:`Refusal` with
the DICOM status a C-STORE answers (PS3.4 Annex B.2.3):
  0xA700  Out of Resources   (too large, backpressure, disk or spool full, store failed)
  0xA900  Data Set does not match SOP Class (identifiers differ from the request)
  0xC210  Cannot understand  (unparseable data set, missing or invalid UIDs)
:mod:`pxsgate.receive` (DIMSE C-STORE) is its caller; any other way in can be.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Literal

import structlog
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pxsgate.errors import SpoolError
from pxsgate.records import Indexed, ReceivedInstance, now_iso
from pxsgate.service.failpoints import Failpoints
from pxsgate.spool import Spool, is_valid_uid

log = structlog.get_logger("pxsgate.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

# How long an association thread waits for the loop to index an instance before it answers
# Out of Resources (the instance stays in the spool, so the sender's retry is idempotent).
INDEX_TIMEOUT_S = 30.0


InstanceHandler = Callable[[ReceivedInstance], Awaitable[Indexed]]
# Asked before an instance is written, with its size: seconds to delay the answer (0: none),
# or the reason to refuse it with 0xA700 (backpressure, the spool ceiling).
Admission = Callable[[int], "float | str"]


class Refusal(Exception):
    """A data set refused, as a C-STORE answers it: ``status`` and ``comment`` (its
    ErrorComment). A plain exception, not a frozen dataclass: leaving a
    ``@contextmanager`` block (Spool.writing) sets its ``__traceback__``, which a frozen
    dataclass refuses, and the refusal then became an "internal error" without its
    reason."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment




@dataclass(frozen=True)
class Arrival:
    """Who sent a data set, and how it is encoded."""

    calling_ae: str
    called_ae: str
    peer_address: str
    association_id: str
    transfer_syntax: UID


class Intake:
    """Stores received data sets; called on the receiving thread (never the loop's), it
    blocks until the loop has indexed each one."""

    def __init__(self, spool: Spool, loop: asyncio.AbstractEventLoop,
                 on_instance: InstanceHandler, *, max_dataset_mb: float,
                 admit: Admission = lambda size: 0.0,
                 failpoints: Failpoints | None = None) -> None:
        self._spool = spool
        self._loop = loop
        self._on_instance = on_instance
        self._admit = admit
        self._failpoints = failpoints or Failpoints()
        self._max_mb = max_dataset_mb
        self._max_dataset = int(max_dataset_mb * 2**20)

    def store(self, arrival: Arrival, received: BytesIO, header: bytes, stream: memoryview,
              expected: tuple[str, str] | None = None, expected_study: str | None = None
              ) -> tuple[ReceivedInstance, Indexed, float]:
        """Store one data set: ``header`` (the Part-10 preamble and file meta) and
        ``stream`` (a view of the data set as received, ``received``'s buffer) written to
        the spool and indexed. ``expected``: the SOP Instance and Class UIDs the request
        named, which the data set must carry; ``expected_study``: the StudyInstanceUID it
        must carry (a STOW-RS URL's). Returns the instance, what indexing did, and
        the seconds the answer is to be delayed (backpressure); raises Refusal."""
        size = len(header) + len(stream)
        if size > self._max_dataset:
            raise Refusal(STATUS_OUT_OF_RESOURCES,
                           f"data set larger than {self._max_mb:g} MB")
        verdict = self._admit(size)
        if isinstance(verdict, str):
            raise Refusal(STATUS_OUT_OF_RESOURCES, verdict)
        try:
            ds = self._header(arrival.transfer_syntax, received, stream)
            sop_uid = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
            study_uid = str(ds.get("StudyInstanceUID", ""))
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        except Refusal:
            raise
        except Exception as exc:  # a peer's bytes can fail in any way pydicom can
            # pxsgate's words only: pydicom's message may quote a value (PHI).
            raise Refusal(STATUS_CANNOT_UNDERSTAND,
                           f"unreadable data set ({type(exc).__name__})") from exc
        if expected is not None and (sop_uid, sop_class) != expected:
            raise Refusal(STATUS_DATASET_MISMATCH, "SOP UIDs differ from the C-STORE request")
        if expected_study is not None and study_uid != expected_study:
            raise Refusal(STATUS_DATASET_MISMATCH,
                          "StudyInstanceUID differs from the study of the request")
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if not is_valid_uid(uid):
                raise Refusal(STATUS_CANNOT_UNDERSTAND, f"missing or invalid {name}")
        # Retention leaves a study alone from its file's write until it is indexed.
        with self._spool.writing(study_uid):
            # The SHA-256 runs beside the write and its fsync (both release the GIL): a
            # 15 MB image's hash costs ~10 ms of the ~25 ms its durable write takes.
            digest = _Sha256((header, stream))
            digest.start()
            try:
                path = self._spool.write(study_uid, sop_uid, (header, stream))
            except SpoolError as exc:
                raise Refusal(STATUS_OUT_OF_RESOURCES, str(exc)) from exc
            finally:
                digest.join()
            self._failpoints.hit("after-spool-write")
            instance = ReceivedInstance(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                transfer_syntax_uid=str(arrival.transfer_syntax),
                path=path,
                size=size,
                sha256=digest.hexdigest,
                calling_ae=arrival.calling_ae,
                called_ae=arrival.called_ae,
                peer_address=arrival.peer_address,
                association_id=arrival.association_id,
                received_at=now_iso(),
            )
            indexed = self._index(instance)
        self._failpoints.hit("after-index")
        return instance, indexed, verdict

    def _header(self, syntax: UID, received: BytesIO, data: memoryview) -> Dataset:
        """Parse the whole header, everything before Pixel Data, without reading (and
        copying) the pixel data: a data set that cannot be read is refused now, not
        acknowledged and then found unreadable. A Deflated data set is inflated in bounded
        chunks first (a decompression bomb is refused before it fills memory). The pixel
        data it declares must fit max-dataset-mb once decoded."""
        if syntax == DeflatedExplicitVRLittleEndian:
            kept, total = _inflate(data, self._max_dataset, self._max_mb)
            stream = BytesIO(kept)
        else:
            stream, total = received, len(data)
        stream.seek(0)
        try:
            ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                              stop_when=lambda tag, vr, length: tag >= PIXEL_DATA)
            _check_pixel_data_length(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                                     total)
        finally:
            received.seek(0)
        for elem in ds.elements():
            _check_length(elem)
        decoded = _decoded_pixel_bytes(ds)
        if decoded > self._max_dataset:
            raise Refusal(STATUS_OUT_OF_RESOURCES,
                           f"pixel data larger than {self._max_mb:g} MB "
                           "once decoded")
        return ds

    def _index(self, instance: ReceivedInstance) -> Indexed:
        """Block this association thread until the loop has indexed the instance."""
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._await(self._on_instance(instance)), self._loop
            )
            return future.result(timeout=INDEX_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            raise Refusal(STATUS_OUT_OF_RESOURCES, "the store did not answer") from exc
        except Exception as exc:  # the store's failure must become a status, not a crash
            log.error("instance.index_failed", error=str(exc))
            raise Refusal(STATUS_OUT_OF_RESOURCES, "the store failed") from exc

    @staticmethod
    async def _await(awaitable: Awaitable[Indexed]) -> Indexed:
        return await awaitable



class _Sha256(threading.Thread):
    """The SHA-256 of a data set's parts, on a thread of its own (hashlib releases the GIL
    while it hashes a large buffer)."""

    def __init__(self, parts: tuple[bytes | memoryview, ...]) -> None:
        super().__init__(name="pxsgate-sha256", daemon=True)
        self._parts = parts
        self.hexdigest = ""

    def run(self) -> None:
        digest = hashlib.sha256()
        for part in self._parts:
            digest.update(part)
        self.hexdigest = digest.hexdigest()


PIXEL_DATA = 0x7FE00010
INFLATE_CHUNK = 1 << 20  # bytes inflated at a time
# Of a Deflated data set, the inflated bytes kept for reading its header: the rest is
# inflated only to be counted against max-dataset-mb.
HEADER_KEPT = 64 * 2**20

def _inflate(deflated: memoryview, limit: int, limit_mb: float) -> tuple[bytes, int]:
    """A Deflated Explicit VR Little Endian data set (PS3.5 A.5) inflated in chunks, every
    byte counted and only the first HEADER_KEPT kept: one that inflates past ``limit``
    bytes is refused with 0xA700 having taken at most about HEADER_KEPT of memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    pending: bytes | memoryview = deflated
    try:
        while True:
            out = inflater.decompress(pending, INFLATE_CHUNK)
            total += len(out)
            if total > limit:
                raise Refusal(STATUS_OUT_OF_RESOURCES,
                               f"data set larger than {limit_mb:g} MB once inflated")
            if len(kept) < HEADER_KEPT:
                kept += out[:HEADER_KEPT - len(kept)]
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and len(out) < INFLATE_CHUNK):
                break
    except zlib.error as exc:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "the deflated data set does not inflate"
                       ) from exc
    return bytes(kept), total


def _check_pixel_data_length(stream: BytesIO, implicit: bool, little: bool, total: int
                             ) -> None:
    """The header was read up to Pixel Data (the stream is at its tag, if it has one): a
    defined length must fit the ``total`` bytes of the data set. The element most often
    cut short, and the one read_dataset stopped before."""
    start = stream.tell()
    head = stream.read(12)
    stream.seek(start)
    if len(head) < 8 or int.from_bytes(head[0:2], "little" if little else "big") != 0x7FE0:
        return  # no Pixel Data (an SR, a header alone)
    order: Literal["little", "big"] = "little" if little else "big"
    if implicit:
        length, header = int.from_bytes(head[4:8], order), 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        if len(head) < 12:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "Pixel Data runs past the end")
        length, header = int.from_bytes(head[8:12], order), 12
    else:
        length, header = int.from_bytes(head[6:8], order), 8
    if length != 0xFFFFFFFF and start + header + length > total:
        raise Refusal(STATUS_CANNOT_UNDERSTAND,
                       "Pixel Data runs past the end of the data set")


def _check_length(elem: Any) -> None:
    """A raw element whose value is shorter than its declared length ran past the end of
    the data set: pydicom keeps what there was, silently."""
    length = getattr(elem, "length", None)
    value = getattr(elem, "value", None)
    if (length is not None and length != 0xFFFFFFFF and isinstance(value, bytes)
            and len(value) != length):
        raise Refusal(STATUS_CANNOT_UNDERSTAND,
                       f"element ({elem.tag >> 16:04X},{elem.tag & 0xFFFF:04X}) runs past "
                       "the end of the data set")


def _decoded_pixel_bytes(ds: Dataset) -> int:
    """What the declared pixel data takes once decoded: Rows x Columns x frames x samples
    x bytes per sample, from the header alone (0 without Rows or Columns)."""
    def number(keyword: str, default: int) -> int:
        try:
            value = ds.get(keyword, default)
            return max(0, int(value if value not in (None, "") else default))
        except Exception:  # a value pydicom cannot convert: the pipeline judges the image
            return default

    rows, columns = number("Rows", 0), number("Columns", 0)
    frames = max(1, number("NumberOfFrames", 1))
    samples = max(1, number("SamplesPerPixel", 1))
    bits = max(1, number("BitsAllocated", 16))
    return (rows * columns * frames * samples * bits + 7) // 8
