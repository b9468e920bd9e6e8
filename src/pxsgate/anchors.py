"""The anchor pool: embeddings of normal radiographs, computed once per set of weights.

The PXS score of an image is its median distance to these embeddings. The published code
embedded every anchor again for every image (2N forward passes per score); pxsgate embeds
them once, at start-up from a folder, or ahead of time with ``pxsgate anchors build`` into a
file that is then loaded in milliseconds.

``model.anchors`` is one of:

- ``demo``: a deterministic synthetic pool of normal chest radiographs (demonstration only);
- a folder of normal radiographs: DICOM files (found by their "DICM" marker, whatever
  their name; the full DICOM preprocessing) and 8-bit PNG/JPEG files (read as PXS_test.py
  reads its CheXpert anchors: resize, crop, no equalisation); other files are logged and
  ignored;
- an embeddings file written by ``pxsgate anchors build``. It records the sha256 of the
  weights that made it, and is refused with any other weights (embeddings from one network
  are meaningless to another) or another ``preprocess.jpeg-roundtrip``. It also keeps up to
  16 of the anchor model images, the probe set of the start-up precision check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import Tensor

from pxsgate.errors import ModelError, PreprocessError
from pxsgate.preprocess import U8Array, is_image_file, load_model_image, preprocess_pixels

__all__ = [
    "DEMO_ANCHOR_COUNT",
    "DEMO_ANCHOR_SEED",
    "AnchorSet",
    "anchor_images",
    "embed_anchors",
    "load_anchor_file",
    "save_anchor_file",
]

DEMO_ANCHOR_SEED = 20200424
DEMO_ANCHOR_COUNT = 8
FILE_FORMAT = "pxsgate.anchors"
FILE_VERSION = 1
PROBE_IMAGES = 16  # anchor images kept in the file for the precision check

Embedder = Callable[[U8Array], Tensor]
log = structlog.get_logger("pxsgate.anchors")


@dataclass(frozen=True)
class AnchorSet:
    """Anchor embeddings [N, 1000] (float32, CPU), where they came from, and for which weights."""

    embeddings: Tensor
    sources: tuple[str, ...]
    weights_sha256: str
    jpeg_roundtrip: bool = False  # the preprocessing the anchor images had
    # A few of the anchor model images themselves [k, 320, 320] uint8: real radiographs for
    # the start-up precision check when the pool comes from a file.
    probe: Tensor | None = None

    def probe_images(self) -> list[tuple[str, U8Array]]:
        if self.probe is None:
            return []
        return [(name, img.numpy()) for name, img in zip(self.sources, self.probe,
                                                           strict=False)]

    @property
    def sha256(self) -> str:
        """Names this pool in results: the sha256 of the float32 embeddings."""
        data = self.embeddings.detach().to("cpu", torch.float32).contiguous().numpy()
        return hashlib.sha256(data.tobytes()).hexdigest()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def anchor_images(spec: str, *, jpeg_roundtrip: bool = False) -> list[tuple[str, U8Array]]:
    """(name, model image) of each anchor radiograph of ``demo`` or a folder.

    Any unreadable anchor is an error naming the file: a pool that silently shrank would
    change every score.
    """
    if spec == "demo":
        # The synthetic generator is loaded only for the demo pool, never by a service that
        # reads its anchors from a folder or a file.
        from pxsgate.tools import synth

        pixels = synth.normal_chest_anchors(DEMO_ANCHOR_SEED, DEMO_ANCHOR_COUNT)
        return [(f"demo-{i}", preprocess_pixels(img, "MONOCHROME2")) for i, img in
                enumerate(pixels)]
    folder = Path(spec)
    if not folder.is_dir():
        raise ModelError(f"model.anchors: {folder} is neither a folder of normal radiographs "
                         "nor an anchors file")
    images: list[tuple[str, U8Array]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        # PACS exports name files by UID (suffix ".320"): DICOM is recognised by its "DICM"
        # marker, not its name; a DICOMDIR has no pixels and is not an anchor.
        if not is_image_file(path) and (not _is_dicom_file(path) or path.name == "DICOMDIR"):
            log.info("anchors.ignored", file=path.name, reason="neither DICOM nor PNG/JPEG")
            continue
        try:
            images.append((path.name, load_model_image(path, jpeg_roundtrip=jpeg_roundtrip)))
        except PreprocessError as exc:
            raise ModelError(f"model.anchors: {path.name}: {exc}") from exc
    if not images:
        raise ModelError(f"model.anchors: no DICOM, PNG or JPEG files in {folder}")
    return images


def _is_dicom_file(path: Path) -> bool:
    """PS3.10 section 7.1: a 128-byte preamble, then "DICM"."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def embed_anchors(images: Sequence[tuple[str, U8Array]], embed: Embedder, weights_sha256: str,
                  *, chunk: int = 16, jpeg_roundtrip: bool = False) -> AnchorSet:
    """Embed the anchor images with ``embed`` (model images [n, 320, 320] -> [n, 1000])."""
    parts = [embed(np.stack([img for _, img in images[i : i + chunk]]))
             for i in range(0, len(images), chunk)]
    embeddings = torch.cat(parts).detach().to("cpu", torch.float32)
    probe = torch.from_numpy(np.stack([img for _, img in images[:PROBE_IMAGES]]))
    return AnchorSet(embeddings, tuple(name for name, _ in images), weights_sha256,
                     jpeg_roundtrip, probe)


def save_anchor_file(anchors: AnchorSet, path: Path) -> None:
    """Write the pool atomically (temporary file, fsync, rename)."""
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "weights_sha256": anchors.weights_sha256,
        "embeddings": anchors.embeddings.contiguous(),
        "sources": list(anchors.sources),
        "jpeg_roundtrip": anchors.jpeg_roundtrip,
        "probe_images": anchors.probe,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write {path}: {exc}") from exc


def load_or_embed(spec: str, embed: Embedder, weights_sha256: str, *, chunk: int = 16,
                  jpeg_roundtrip: bool = False
                  ) -> tuple[AnchorSet, list[tuple[str, U8Array]] | None]:
    """The anchor pool of ``model.anchors``: an embeddings file read as it is, else the
    images of ``demo`` or a folder embedded with ``embed``; and those images (None for a
    file), which a scorer may reuse as its probe set. Whatever backend embeds (torch here,
    or Triton), the pool is made the same way."""
    if spec != "demo" and Path(spec).is_file():
        return load_anchor_file(Path(spec), weights_sha256, jpeg_roundtrip=jpeg_roundtrip), None
    images = anchor_images(spec, jpeg_roundtrip=jpeg_roundtrip)
    return embed_anchors(images, embed, weights_sha256, chunk=chunk,
                         jpeg_roundtrip=jpeg_roundtrip), images


def load_anchor_file(path: Path, weights_sha256: str, *, jpeg_roundtrip: bool = False
                     ) -> AnchorSet:
    """Read a pool written by :func:`save_anchor_file`; refuse one made with other weights
    or another preprocessing (``preprocess.jpeg-roundtrip``) than the service's."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors have many types
        raise ModelError(f"model.anchors: {path} is not an anchors file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ModelError(f"model.anchors: {path} is not an anchors file "
                         "(write one with: pxsgate anchors build DIR -o FILE)")
    if payload.get("version") != FILE_VERSION:
        raise ModelError(f"model.anchors: {path} has version {payload.get('version')!r}; "
                         f"this pxsgate reads version {FILE_VERSION}")
    built_for = str(payload.get("weights_sha256", ""))
    if built_for != weights_sha256:
        raise ModelError(
            f"model.anchors: {path} was built with weights sha256 {built_for[:16]}..., but the "
            f"loaded weights are {weights_sha256[:16]}...; rebuild it with these weights "
            "(pxsgate anchors build DIR -o FILE)")
    embeddings = payload.get("embeddings")
    if (not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or embeddings.shape[0] == 0
            or embeddings.shape[1] != 1000):
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else None
        raise ModelError(f"model.anchors: {path} holds embeddings of shape {shape}, "
                         "not [N, 1000]")
    built_jpeg = bool(payload.get("jpeg_roundtrip", False))
    if built_jpeg != jpeg_roundtrip:
        raise ModelError(
            f"model.anchors: {path} was built with preprocess.jpeg-roundtrip {built_jpeg}, "
            f"but the service runs with {jpeg_roundtrip}; rebuild it (pxsgate anchors build)")
    sources = payload.get("sources", [])
    names = tuple(str(s) for s in sources) if isinstance(sources, list) else ()
    probe = payload.get("probe_images")
    if not (isinstance(probe, Tensor) and probe.dtype == torch.uint8 and probe.ndim == 3):
        probe = None
    return AnchorSet(embeddings.to(torch.float32), names, built_for, built_jpeg, probe)
