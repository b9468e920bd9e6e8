"""The exception tree of pxsgate.

    PxsgateError
    ├── ConfigError        invalid configuration; the message names the key path
    ├── SpoolError         an instance could not be made durable (disk full, bad UID)
    │   └── DiskFloorError    the spool's free space is below storage.min-free-mb
    ├── DicomInputError    a DICOM object pxsgate cannot use (malformed, unsupported)
    │   └── PreprocessError   pixel data the model cannot take (multi-frame, colour):
    │       │                 the image's own bytes, so trying again cannot help
    │       └── DecodeFailed  the decoder failed on it (time limit, process died): may pass
    ├── ModelError         weights or anchors cannot be loaded, or inference failed
    ├── StoreError         the SQLite store is unusable
    └── ExportError        a delivery failed; tried again later
        └── PermanentExportError  the destination refused it for good: dead-lettered now

Errors are translated at the edges: DICOM status codes in receive.py, exit codes in cli.py.
"""

from __future__ import annotations


class PxsgateError(Exception):
    """Base class of every error pxsgate raises on purpose."""


class ConfigError(PxsgateError):
    """The configuration is invalid. ``path`` is the dotted key path, e.g. ``dicom.scp.port``."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class SpoolError(PxsgateError):
    """An instance could not be written durably to the spool."""


class DiskFloorError(SpoolError):
    """The spool's file system has less free space than the configured floor."""


class DicomInputError(PxsgateError):
    """A DICOM object that pxsgate cannot use."""


class PreprocessError(DicomInputError):
    """Pixel data that the model cannot take (multi-frame, colour, empty)."""


class DecodeFailed(PreprocessError):
    """The decoder, not the image, failed (its time limit passed, its process died): a
    later try may succeed, unlike a plain PreprocessError."""


class ModelError(PxsgateError):
    """Weights or anchors cannot be loaded, or inference failed."""


class StoreError(PxsgateError):
    """The SQLite store is unusable."""


class ExportError(PxsgateError):
    """A delivery to an exporter's destination failed; the outbox tries again later."""


class PermanentExportError(ExportError):
    """The destination refused the delivery in a way a retry cannot fix (HTTP 4xx, a
    result whose source images are gone): dead-lettered at once."""
