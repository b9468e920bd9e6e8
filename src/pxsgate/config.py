"""Typed, frozen configuration: load a YAML file, validate it, and never mutate it afterwards.

The ``dicom:`` section is the Clara DICOM Adapter layout of the paper's Listing 1, so an
existing adapter configuration loads unchanged. Every other section is pxsgate's own; the key
names are the contract in docs/architecture.md. YAML keys are kebab-case; each dataclass
field maps to its key by turning ``_`` into ``-``.

Validation happens in :func:`load_config` before any socket opens. An unknown key, a wrong
type or an out-of-range value raises :class:`~pxsgate.errors.ConfigError` whose ``path`` is
the dotted key path (``dicom.scp.ae-titles[0].ae-title``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import yaml

from pxsgate import default_rules
from pxsgate.errors import ConfigError
from pxsgate.records import REVIEW_FLAGS, Status

if TYPE_CHECKING:  # matchers imports pydicom (~0.2 s): only when rules are compiled
    from pxsgate.matchers import Action, Rule

DEFAULT_CONFIG_PATH = Path("config/pxsgate.yaml")
CONFIG_ENV = "PXSGATE_CONFIG"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (IMPLICIT_VR_LE, EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE)
# The compressed syntaxes routers send (PS3.5 Annex A.4), all decodable by the installed
# pydicom plugins (pylibjpeg-libjpeg, -openjpeg, -rle).
COMPRESSED = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4), 12-bit CR
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE Lossless
)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _check_ae_title(value: Any) -> str | None:
    # PS3.5 section 6.2 (AE VR): at most 16 characters, no backslash or control characters,
    # and not only spaces.
    text = str(value)
    if not text.strip():
        return "an AE title cannot be empty"
    if len(text) > 16:
        return f"an AE title has at most 16 characters, got {len(text)}"
    if "\\" in text or any(ord(c) < 32 for c in text):
        return "an AE title cannot contain a backslash or control characters"
    return None


def _check_port(value: Any) -> str | None:
    return None if 0 <= int(value) <= 65535 else "must be between 0 and 65535"


def _check_pdu(value: Any) -> str | None:
    # 0 means unlimited in PS3.8; otherwise at least the 4096 bytes every peer must take.
    return None if value == 0 or 4096 <= value <= 2**32 - 1 else "must be 0 or 4096..2^32-1"


def _check_positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _check_fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be greater than 0 and at most 1"


def _check_non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _check_uids(value: Any) -> str | None:
    for uid in value:
        if len(uid) > 64 or not _UID_RE.match(uid):
            return f"{uid!r} is not a valid DICOM UID"
    return None


def _check_decodable(value: Any) -> str | None:
    # Every accepted syntax must be decodable by the preprocessing stage: refuse to accept
    # what would be acknowledged and then fail (issue 3).
    from pydicom.pixels.decoders.base import get_decoder

    if problem := _check_uids(value):
        return problem
    for uid in value:
        if uid in UNCOMPRESSED:
            continue
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            return f"{uid} cannot be decoded here (no pixel data decoder installed for it)"
    return None


def _check_database(value: Any) -> str | None:
    if value == "sqlite":
        return None
    parsed = urllib.parse.urlsplit(str(value))
    if parsed.scheme not in ("postgresql", "postgres") or not parsed.path.strip("/"):
        return ("must be sqlite or a PostgreSQL URL with a database name, "
                "postgresql://user@host:5432/pxsgate")
    if parsed.password is not None or "password=" in parsed.query:
        # Messages and logs quote the URL: a password in it would spread.
        return ("must not carry a password: use storage.database-password-file, or "
                "PGPASSWORD / PGPASSFILE / ~/.pgpass")
    return None


def _check_node_name(value: Any) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", str(value)):
        return None
    return "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def redact_url(url: str) -> str:
    """A URL as messages show it: without a user's password or query."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parsed.username}@" if parsed.username else "") + host + (
        f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def _check_sha256(value: Any) -> str | None:
    if re.fullmatch(r"[0-9a-f]{64}", str(value)):
        return None
    return "must be a sha256: 64 lowercase hexadecimal digits (sha256sum prints it)"


def _check_hl7_text(value: Any) -> str | None:
    # A name or code written into one HL7 v2 component: its delimiters would be escaped, so
    # "PXS^PXS score^L" would arrive as one literal value, not three parts.
    text = str(value)
    if any(c in text for c in "|^~\\&"):
        return "cannot contain the HL7 delimiters | ^ ~ \\ &: give each part its own key"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "cannot contain control characters"
    return None


def _check(fn: Callable[[Any], str | None],
           without_pydicom: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    """A field's check; ``without_pydicom``: the part of it that needs no pydicom, all
    that ``load_config(..., skip_dicom_checks=True)`` runs."""
    if without_pydicom is None:
        return {"check": fn}
    return {"check": fn, "check_without_pydicom": without_pydicom}


@dataclass(frozen=True)
class AeTitleConfig:
    ae_title: str = field(metadata=_check(_check_ae_title))
    # Study completion for studies sent to this AE title (default: the assembly section).
    settle_seconds: float | None = field(default=None, metadata=_check(_check_non_negative))
    quiet_timeout_seconds: float | None = field(default=None,
                                                metadata=_check(_check_positive))


@dataclass(frozen=True)
class VerificationConfig:
    enabled: bool = True
    transfer_syntaxes: tuple[str, ...] = field(
        default=(IMPLICIT_VR_LE, EXPLICIT_VR_LE), metadata=_check(_check_uids)
    )


@dataclass(frozen=True)
class SourceConfig:
    host_ip: str
    ae_title: str = field(metadata=_check(_check_ae_title))


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (PS3.15 Annex B.9, the BCP 195 profile): off unless a certificate is given."""

    certificate: Path | None = None  # PEM server certificate (chain)
    private_key: Path | None = None  # PEM private key of that certificate
    # PEM CA bundle that client certificates are verified against.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class ScpConfig:
    host: str = "0.0.0.0"
    port: int = field(default=11112, metadata=_check(_check_port))
    ae_titles: tuple[AeTitleConfig, ...] = (AeTitleConfig("PxsScore"),)
    max_associations: int = field(default=4, metadata=_check(_check_positive))
    verification: VerificationConfig = VerificationConfig()
    log_dimse_datasets: bool = False
    reject_unknown_sources: bool = False
    sources: tuple[SourceConfig, ...] = ()
    # Transfer syntaxes accepted for storage; the uncompressed ones by default.
    transfer_syntaxes: tuple[str, ...] = field(
        default=UNCOMPRESSED + COMPRESSED, metadata=_check(_check_decodable, _check_uids)
    )
    # Seconds a peer may stay silent inside an association before it is aborted, and the
    # limits on waiting for an A-ASSOCIATE/A-RELEASE (ACSE) and for a DIMSE message.
    network_timeout: float = field(default=60.0, metadata=_check(_check_positive))
    acse_timeout: float = field(default=30.0, metadata=_check(_check_positive))
    dimse_timeout: float = field(default=60.0, metadata=_check(_check_positive))
    # A connection that has not sent its A-ASSOCIATE-RQ (a port scan, a load balancer's TCP
    # probe, a half-dead router) holds no association slot: it is closed after
    # artim-timeout seconds (the ARTIM timer, PS3.8 9.1.5; the TLS handshake included), and
    # beyond max-pending-connections of them the oldest is closed at once.
    artim_timeout: float = field(default=10.0, metadata=_check(_check_positive))
    max_pending_connections: int = field(default=16, metadata=_check(_check_positive))
    # The largest P-DATA PDU pxsgate accepts (PS3.8 D.1); big PDUs mean fewer reads.
    max_pdu_size: int = field(default=262144, metadata=_check(_check_pdu))
    # A larger data set is refused with 0xA700 once received (it would not fit the spool).
    max_dataset_mb: float = field(default=1024.0, metadata=_check(_check_positive))
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class PipelineMapping:
    name: str
    clara_ae_title: str = field(metadata=_check(_check_ae_title))
    pipeline_id: str = ""


@dataclass(frozen=True)
class DicomConfig:
    scp: ScpConfig = ScpConfig()
    pipeline_mappings: tuple[PipelineMapping, ...] = (
        PipelineMapping("pxs-score", "PxsScore", "112233445566778899aabbccddeeff00"),
    )


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = Path("/var/lib/pxsgate")
    # Below this much free space on the spool's file system, C-STORE answers 0xA700
    # (Out of Resources) and writes nothing; the sender retries later.
    min_free_mb: float = field(default=1024.0, metadata=_check(_check_non_negative))
    # Spooled images are deleted this long after their study's result is stored and every
    # delivery of it is done (delivered or dead-lettered). 0: as soon as that is so.
    retention_hours: float = field(default=24.0, metadata=_check(_check_non_negative))
    # A ceiling on the spool's size (0 = none). Above it, finished studies are deleted
    # before their retention is up, oldest first; when only studies still being worked on
    # are left, C-STORE answers 0xA700 until there is room again.
    max_spool_gb: float = field(default=0.0, metadata=_check(_check_non_negative))
    # The store: "sqlite" (one file, storage.data-dir/pxsgate.sqlite3) or a PostgreSQL
    # URL, postgresql://user@host:5432/pxsgate, shared by several gateways. Never with a
    # password: database-password-file, or libpq's PGPASSWORD / PGPASSFILE / ~/.pgpass.
    database: str = field(default="sqlite", metadata=_check(_check_database))
    database_password_file: Path | None = None
    # This gateway's name among those sharing a PostgreSQL store (default: the host name).
    # Its instances, study jobs and spool files are its own: only it resumes or purges
    # them. Keep it when moving a data-dir to another host.
    node_name: str | None = field(default=None, metadata=_check(_check_node_name))
    # A delivery being sent is leased to its node this long; a node that dies mid-delivery
    # loses it to another node after that (at least once, across nodes).
    delivery_lease_seconds: float = field(default=120.0, metadata=_check(_check_positive))


@dataclass(frozen=True)
class PicturesConfig:
    """Each study's pictures for the pages (pxsgate.pictures): every instance's thumbnail
    and each scored image's model input, under storage.data-dir/pictures, kept after
    retention deletes the DICOM files."""

    enabled: bool = True
    # Pictures are removed this many days after they were made (a rescore makes them
    # again); null: kept for ever (about 50 KB per scored image, a few KB per thumbnail).
    keep_days: float | None = field(default=None, metadata=_check(_check_positive))


@dataclass(frozen=True)
class JobsConfig:
    """Each study's job: retries, limits and shutdown."""

    # Tries to score a study before it is stored as FAILED (a model or decoding error on
    # any of its images). A try interrupted by a crash or a stop counts too, so an image
    # that brings the service down cannot do so forever.
    max_attempts: int = field(default=3, metadata=_check(_check_positive))
    # Wait before try n+1: retry-backoff-seconds x 2^(n-1).
    retry_backoff_seconds: float = field(default=2.0, metadata=_check(_check_non_negative))
    # A batch that has not come back from the model in this time fails its images (they are
    # retried); the model worker is then reported unhealthy and systemd's watchdog, no
    # longer fed, restarts the service.
    batch_time_limit_seconds: float = field(default=120.0, metadata=_check(_check_positive))
    # Decoding one image (a codec looping on a malformed file): past this, the decode
    # processes are replaced and the image fails (its study retries).
    decode_time_limit_seconds: float = field(default=120.0, metadata=_check(_check_positive))
    # Studies processed at once; further ready studies queue (as UIDs, their images stay
    # files in the spool).
    max_studies_in_progress: int = field(default=16, metadata=_check(_check_positive))
    # SIGTERM: associations in progress get this long to finish, then studies in progress
    # get it again; what is left resumes at the next start.
    shutdown_grace_seconds: float = field(default=30.0, metadata=_check(_check_non_negative))


@dataclass(frozen=True)
class BackpressureConfig:
    """When studies arrive faster than they are scored, reception slows down rather than
    letting the backlog grow without bound: from ``delay-above-studies`` studies waiting,
    each C-STORE answer is delayed (up to ``max-delay-seconds``, growing with the backlog);
    from ``refuse-above-studies`` C-STORE answers 0xA700 (Out of Resources) and the sender
    retries later."""

    delay_above_studies: int = field(default=200, metadata=_check(_check_positive))
    refuse_above_studies: int = field(default=1000, metadata=_check(_check_positive))
    max_delay_seconds: float = field(default=2.0, metadata=_check(_check_non_negative))


@dataclass(frozen=True)
class AssemblyConfig:
    settle_seconds: float = field(default=2.0, metadata=_check(_check_non_negative))
    quiet_timeout_seconds: float = field(default=60.0, metadata=_check(_check_positive))


class RuleList(Sequence["Rule"]):
    """Selection rules as configured, compiled (pxsgate.matchers) when first used.

    Compiling needs pydicom's data dictionary, and importing pydicom takes ~0.2 s: the
    commands that only read the store (``pxsgate results``, ``status``, ...) load their
    config with ``skip_dicom_checks`` and never pay it. Every other load compiles the rules
    a file gives as it reads them, so a mistake is reported with its key path before
    anything starts (the built-in defaults, which tests hold valid, compile on first use).
    A compile error raises :class:`ConfigError`, naming the key path, whenever it comes.
    Equal when the compiled rules are; the cache is this object's own (two threads
    compiling at once both get equal rules)."""

    __slots__ = ("_actions", "_compiled", "_data", "_path")

    def __init__(self, data: Any, path: str, actions: tuple[Action, Action]) -> None:
        self._data = data
        self._path = path
        self._actions = actions
        self._compiled: tuple[Rule, ...] | None = None

    def compiled(self) -> tuple[Rule, ...]:
        """The rules, compiled once; ConfigError when they are not valid."""
        if self._compiled is None:
            from pxsgate.matchers import parse_rules

            self._compiled = parse_rules(self._data, self._path, self._actions)
        return self._compiled

    @overload
    def __getitem__(self, index: int) -> Rule: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Rule, ...]: ...

    def __getitem__(self, index: int | slice) -> Rule | tuple[Rule, ...]:
        return self.compiled()[index]

    def __len__(self) -> int:
        return len(self.compiled())

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.compiled())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RuleList):
            return self.compiled() == other.compiled()
        if isinstance(other, tuple):
            return self.compiled() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.compiled())

    def __repr__(self) -> str:
        state = "compiled" if self._compiled is not None else "not compiled yet"
        return f"RuleList({self._path}, {state})"


def _rules(actions: tuple[Action, Action]
           ) -> Callable[[Any, str, bool], RuleList]:
    def parse(value: Any, path: str, compile_now: bool) -> RuleList:
        rules = RuleList(value, path, actions)
        if compile_now:
            rules.compiled()
        return rules
    return parse


@dataclass(frozen=True)
class SelectionConfig:
    """Which studies are candidates and which images are model input (matchers.py has the
    rule language, default_rules.py the defaults). First matching rule decides."""

    study_rules: RuleList = field(
        default_factory=lambda: RuleList(default_rules.STUDY_RULES_DATA,
                                         "selection.study-rules", ("accept", "reject")),
        metadata={"parse": _rules(("accept", "reject"))})
    image_rules: RuleList = field(
        default_factory=lambda: RuleList(default_rules.IMAGE_RULES_DATA,
                                         "selection.image-rules", ("select", "exclude")),
        metadata={"parse": _rules(("select", "exclude"))})
    # More model-input images than this in one study: flagged many-ap-images for review.
    many_ap_images: int = field(default=3, metadata=_check(_check_positive))
    # At most this many model-input images of one study are scored (the latest acquired);
    # the rest are recorded as not used and the study is flagged images-capped.
    max_images_per_study: int = field(default=8, metadata=_check(_check_positive))


@dataclass(frozen=True)
class PreprocessConfig:
    # Decode worker processes (0 = automatic: one core is left to reception, so CPU cores - 1,
    # at least 1 and at most 8). Pixel codecs can hold the GIL for a second per JPEG 2000
    # image; in their own processes (at nice 19) they never stall reception, and a codec
    # that crashes on a malformed image takes down one worker, not the service.
    workers: int = field(default=0, metadata=_check(_check_non_negative))
    # Reproduce the training pipeline's JPEG quality-95 round trip (PXS_preprocessing.py)
    # for sites whose model was trained on such files.
    jpeg_roundtrip: bool = False
    # Decode on arrival: an instance the selection rules could choose (its header alone
    # says so) is decoded and preprocessed as soon as it is stored, in a decode process left
    # idle by studies that are ready, while its study settles; its 8-bit model input is kept
    # in memory until the study is ready (at most on-arrival-cache-mb; what does not fit,
    # fails or is not started in time is decoded when the study is ready, as with false).
    decode_on_arrival: bool = True
    on_arrival_cache_mb: float = field(default=64.0, metadata=_check(_check_positive))


@dataclass(frozen=True)
class BatchConfig:
    max_size: int = field(default=16, metadata=_check(_check_positive))
    max_delay_ms: float = field(default=5.0, metadata=_check(_check_non_negative))


def _check_triton_url(value: Any) -> str | None:
    # tritonclient takes host:port, without a scheme.
    text = str(value)
    if "://" in text or "/" in text:
        return "must be host:port (no scheme or path), e.g. localhost:8001"
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return "must be host:port, e.g. localhost:8001 (grpc) or localhost:8000 (http)"
    return None


@dataclass(frozen=True)
class TritonConfig:
    """model.backend triton: the embedding network runs on a Triton Inference Server (an
    entry written by ``pxsgate model export``); anchors, score and change stay here."""

    # host:port of Triton's gRPC (default 8001) or HTTP (8000) endpoint, per protocol.
    url: str = field(default="localhost:8001", metadata=_check(_check_triton_url))
    model_name: str = "pxs_embedding"
    model_version: str = ""  # "" = the version Triton's version policy serves
    protocol: Literal["grpc", "http"] = "grpc"
    # One request (one image) at most; past it the image fails and its study retries.
    timeout_seconds: float = field(default=30.0, metadata=_check(_check_positive))


@dataclass(frozen=True)
class ModelConfig:
    # local: the model runs in this process (torch); triton: its embedding network runs on
    # the Triton Inference Server of model.triton.
    backend: Literal["local", "triton"] = "local"
    triton: TritonConfig = TritonConfig()
    weights: str = "demo"
    # The weights file's sha256 (of the file; for "demo", of its state_dict). When set, other
    # weights refuse to load: the service does not start and says which hash it found.
    sha256: str | None = field(default=None, metadata=_check(_check_sha256))
    anchors: str = "demo"
    device: str = "auto"
    batch: BatchConfig = BatchConfig()
    # Forward-pass precision. auto: on CUDA the fastest of bf16 autocast (GPUs with native
    # bf16), fp16 autocast and TF32 convolutions whose scores stay within
    # precision-tolerance of IEEE fp32 on a probe set at start-up, else fp32; fp32 on the
    # CPU. An explicit bf16/fp16/tf32 is checked the same way and falls back to fp32.
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    precision_tolerance: float = field(default=0.01, metadata=_check(_check_positive))
    # torch.compile mode (CUDA): none, default, reduce-overhead (CUDA graphs), max-autotune.
    # Compiled graphs are made for the batch sizes 1, 2, 4 ... max-size at start-up, and
    # each batch is padded up to the next of them.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    # CPU threads for inference (0 = torch's default, one per core).
    threads: int = field(default=0, metadata=_check(_check_non_negative))
    name: str = "PxsScore"
    version: str = "0.1"
    author: str = "Data Science"
    description: str = "PXS score model on chest x-rays"


@dataclass(frozen=True)
class ResultsConfig:
    site_id: str = "Hospital"


@dataclass(frozen=True)
class ChangeConfig:
    """Change over time: each SUCCEEDED result also gets the PXS distance of its headline
    image to the same patient's most recent prior scored image (same weights, strictly
    earlier study time, at most ``look-back-days`` before; null = no limit)."""

    enabled: bool = True
    look_back_days: float | None = field(default=365.0, metadata=_check(_check_positive))


@dataclass(frozen=True)
class PriorSourceConfig:
    """The PACS asked for a patient's earlier studies: by DIMSE (Study Root C-FIND, then
    C-GET on the same association or C-MOVE to pxsgate's own AE title) or by DICOMweb
    (QIDO-RS, then WADO-RS)."""

    type: Literal["dimse", "dicomweb"] = "dimse"
    # --- dimse
    host: str | None = None
    port: int | None = field(default=None, metadata=_check(_check_port))
    ae_title: str | None = field(default=None, metadata=_check(_check_ae_title))  # called
    calling_ae_title: str = field(default="PXSGATE", metadata=_check(_check_ae_title))
    retrieve: Literal["c-get", "c-move"] = "c-get"
    # C-MOVE's destination: one of dicom.scp.ae-titles (default: the first), which the PACS
    # must know with pxsgate's address.
    move_destination: str | None = field(default=None, metadata=_check(_check_ae_title))
    # --- dicomweb
    url: str | None = None
    bearer_token_file: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    ca_certificates: Path | None = None
    # --- both: one query or retrieval, at most
    timeout_seconds: float = field(default=30.0, metadata=_check(_check_positive))

    @property
    def label(self) -> str:
        """How results and logs name it (no credentials)."""
        if self.type == "dicomweb":
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class PriorsConfig:
    """Priors from PACS: a scored study whose patient has no usable prior in the store
    (same weights, within change.look-back-days) has its prior fetched from the PACS,
    embedded and kept, so that its result carries the change from day one."""

    enabled: bool = False
    # A result waits at most this long for its prior, then is stored without change.
    wait_seconds: float = field(default=20.0, metadata=_check(_check_positive))
    max_studies: int = field(default=3, metadata=_check(_check_positive))  # newest first
    rate_per_minute: int = field(default=30, metadata=_check(_check_positive))
    source: PriorSourceConfig | None = None


@dataclass(frozen=True)
class HttpConfig:
    """The service's HTTP port: /healthz, the results API and STOW-RS ingress. Results
    carry PHI, so it listens on loopback unless told otherwise, and can require a bearer
    token."""

    host: str = "127.0.0.1"
    port: int = field(default=8787, metadata=_check(_check_port))  # 0 = off
    # A file holding the token that every request except /healthz must present as
    # "Authorization: Bearer TOKEN" (a file, so the secret stays out of the config).
    bearer_token_file: Path | None = None
    # HTTPS (same keys as dicom.scp.tls); with ca-certificates, a client certificate
    # verified against them is accepted in place of the token.
    tls: TlsConfig = TlsConfig()
    # STOW-RS ingress (POST /dicomweb/studies): the largest request body; each part is
    # also held to dicom.scp.max-dataset-mb.
    stow_max_request_mb: float = field(default=4096.0, metadata=_check(_check_positive))


def _check_networks(value: Any) -> str | None:
    import ipaddress

    for text in value:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"{text!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
    return None


def _check_header(value: Any) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9-]{1,64}", str(value)):
        return None
    return "must be an HTTP header name: letters, digits and '-'"


@dataclass(frozen=True)
class UiConfig:
    """The web UI under /ui/ on the HTTP port: its own logins (``pxsgate users``), not the
    API's bearer token."""

    enabled: bool | None = None  # default: on when http.port is set
    # A login ends this long after it began, or after this long without a request.
    session_minutes: float = field(default=480.0, metadata=_check(_check_positive))
    idle_minutes: float = field(default=30.0, metadata=_check(_check_positive))
    # Single sign-on through a reverse proxy: ``user-header`` names the user, trusted only
    # from these addresses or networks, and only for a user that `pxsgate users` added.
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=_check(_check_networks))
    user_header: str | None = field(default=None, metadata=_check(_check_header))
    # The drift alarm (ui/trends, pxsgate_score_drift_*): the two-sample Kolmogorov-Smirnov
    # D of the headline scores of the latest ``drift-window-days`` against the
    # ``drift-reference-days`` before them; an alarm when D >= ``drift-threshold`` with at
    # least ``drift-min-studies`` scored studies in each.
    drift_window_days: int = field(default=7, metadata=_check(_check_positive))
    drift_reference_days: int = field(default=90, metadata=_check(_check_positive))
    drift_threshold: float = field(default=0.2, metadata=_check(_check_fraction))
    drift_min_studies: int = field(default=30, metadata=_check(_check_positive))


RESULT_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.SKIPPED)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _check_name(value: Any) -> str | None:
    if _NAME_RE.match(str(value)):
        return None
    return "must be 1-64 characters: lowercase letters, digits, '-' and '_'"


def _check_flags(value: Any) -> str | None:
    unknown = sorted(set(value) - set(REVIEW_FLAGS))
    if unknown:
        return f"unknown flag(s) {', '.join(unknown)}; known: {', '.join(REVIEW_FLAGS)}"
    return None


@dataclass(frozen=True)
class WhenConfig:
    """An exporter's ``when:``: only results that meet it go there (beside ``statuses``).
    With ``match: any`` (the default) one condition met is enough: a critical-result
    webhook on a high score or a large change; with ``all`` each one given must be met.
    A result that meets none gets no delivery row at all."""

    score_at_least: float | None = None  # the headline PXS score
    change_at_least: float | None = None  # the PXS change to the patient's prior
    flags_any: tuple[str, ...] = field(default=(), metadata=_check(_check_flags))
    match: Literal["any", "all"] = "any"

    @property
    def given(self) -> bool:
        return (self.score_at_least is not None or self.change_at_least is not None
                or bool(self.flags_any))

    def met(self, score: float | None, change: float | None, flags: Sequence[str]) -> bool:
        """Whether a result with this headline score, change and flags meets it."""
        checks: list[bool] = []
        if self.score_at_least is not None:
            checks.append(score is not None and score >= self.score_at_least)
        if self.change_at_least is not None:
            checks.append(change is not None and change >= self.change_at_least)
        if self.flags_any:
            checks.append(bool(set(self.flags_any) & set(flags)))
        if not checks:
            return True
        return any(checks) if self.match == "any" else all(checks)


@dataclass(frozen=True)
class ExporterConfig:
    """One destination of the outbox. Every stored result whose status is in ``statuses``
    gets one delivery row per exporter, in the same transaction as the result."""

    name: str = field(metadata=_check(_check_name))
    type: Literal["http", "dicom", "dicomweb", "fhir", "hl7"]
    # Which results go there. Default: every status for http (the paper's results
    # communicator), SUCCEEDED for dicom (an SR reports a score).
    statuses: tuple[Literal["SUCCEEDED", "FAILED", "SKIPPED"], ...] | None = None
    when: WhenConfig = WhenConfig()  # and only those that meet this (score, change, flags)
    # --- http: POST the result document as JSON
    url: str | None = None
    bearer_token_file: Path | None = None
    client_certificate: Path | None = None  # PEM, for mutual TLS
    client_key: Path | None = None
    ca_certificates: Path | None = None  # PEM bundle to verify the server (default: system)
    # --- dicom: a Comprehensive SR (TID 1500) by C-STORE
    host: str | None = None
    port: int | None = field(default=None, metadata=_check(_check_port))
    ae_title: str | None = field(default=None, metadata=_check(_check_ae_title))  # called
    calling_ae_title: str = field(default="PXSGATE", metadata=_check(_check_ae_title))
    # What is sent per result: the SR, and a Secondary Capture (the model input with the
    # score burned in, for viewers that do not render SR). dicom exporters only.
    objects: tuple[Literal["sr", "secondary-capture"], ...] = ("sr",)
    # --- fhir: a FHIR R4 transaction Bundle POSTed to url (the FHIR base), with the http
    # keys' token and TLS. The Patient is referenced by identifier: its system is required.
    patient_id_system: str | None = None  # e.g. urn:oid:<the PatientID issuer's OID>
    code_system: str | None = None  # of the three codes; default urn:pxsgate:codes
    score_code: str | None = None  # default pxs-score
    change_code: str | None = None  # default pxs-change
    report_code: str | None = None  # default pxs-report
    # --- fhir: end
    # --- both
    timeout_seconds: float = field(default=30.0, metadata=_check(_check_positive))
    rate_per_second: float = field(default=10.0, metadata=_check(_check_positive))
    # Tries before a delivery is dead-lettered (`pxsgate outbox retry` revives it).
    max_attempts: int = field(default=10, metadata=_check(_check_positive))
    # Wait before try n+1: min(max, initial * 2^(n-1)), of which a random half is jitter.
    backoff_initial_seconds: float = field(default=5.0, metadata=_check(_check_positive))
    backoff_max_seconds: float = field(default=900.0, metadata=_check(_check_positive))
    # --- hl7: an HL7 v2.5.1 ORU^R01 by MLLP to host:port (the dicom keys), SUCCEEDED
    # results only; TLS 1.2+ when tls is true, with ca-certificates, client-certificate and
    # client-key as for http. Each name or code is one value (no | ^ ~ \ &).
    tls: bool = False
    sending_application: str = field(default="PXSGATE", metadata=_check(_check_hl7_text))
    sending_facility: str = field(default="", metadata=_check(_check_hl7_text))  # MSH-4
    receiving_application: str = field(default="", metadata=_check(_check_hl7_text))
    receiving_facility: str = field(default="", metadata=_check(_check_hl7_text))  # MSH-6
    # PID-3's assigning authority (CX-4): the namespace the PatientIDs belong to.
    patient_id_authority: str = field(default="", metadata=_check(_check_hl7_text))
    # OBR-4, the universal service identifier: identifier, text, coding system.
    service_id: str = field(default="PXS", metadata=_check(_check_hl7_text))
    service_text: str = field(default="PXS lung disease severity",
                              metadata=_check(_check_hl7_text))
    service_system: str = field(default="L", metadata=_check(_check_hl7_text))
    # OBX-3 of the score and of the change since the prior; the coding system (HL7 table
    # 0396; L = local) is both's.
    observation_id: str = field(default="PXS", metadata=_check(_check_hl7_text))
    observation_text: str = field(default="PXS score", metadata=_check(_check_hl7_text))
    observation_system: str = field(default="L", metadata=_check(_check_hl7_text))
    change_observation_id: str = field(default="PXS-CHANGE",
                                       metadata=_check(_check_hl7_text))
    change_observation_text: str = field(default="PXS change since prior",
                                         metadata=_check(_check_hl7_text))
    processing_id: Literal["P", "T", "D"] = "P"  # MSH-11: production, training, debugging
    # PID-5/7/8 (name, birth date, sex) from the scored image's header while it is in the
    # spool; off: the ORU names the patient by PID-3 alone.
    include_phi: bool = False
    # --- hl7: end

    @property
    def wanted_statuses(self) -> tuple[str, ...]:
        if self.statuses is not None:
            return self.statuses
        return RESULT_STATUSES if self.type == "http" else (Status.SUCCEEDED,)

    def wants(self, status: str, score: float | None, change: float | None,
              flags: Sequence[str]) -> bool:
        """Whether a result of this status, headline score, change and flags goes here."""
        return status in self.wanted_statuses and self.when.met(score, change, flags)


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Patient names and IDs stay out of the logs unless this is switched on.
    include_phi: bool = False


@dataclass(frozen=True)
class Config:
    dicom: DicomConfig = DicomConfig()
    storage: StorageConfig = StorageConfig()
    pictures: PicturesConfig = PicturesConfig()
    assembly: AssemblyConfig = AssemblyConfig()
    jobs: JobsConfig = JobsConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    selection: SelectionConfig = SelectionConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    results: ResultsConfig = ResultsConfig()
    change: ChangeConfig = ChangeConfig()
    priors: PriorsConfig = PriorsConfig()
    exporters: tuple[ExporterConfig, ...] = ()
    http: HttpConfig = HttpConfig()
    ui: UiConfig = UiConfig()
    logging: LoggingConfig = LoggingConfig()

    def timings(self, ae_title: str) -> tuple[float, float]:
        """(settle, quiet timeout) in seconds for studies sent to ``ae_title``."""
        settle, quiet = self.assembly.settle_seconds, self.assembly.quiet_timeout_seconds
        for entry in self.dicom.scp.ae_titles:
            if entry.ae_title == ae_title:
                if entry.settle_seconds is not None:
                    settle = entry.settle_seconds
                if entry.quiet_timeout_seconds is not None:
                    quiet = entry.quiet_timeout_seconds
        return settle, quiet

    @property
    def spool_dir(self) -> Path:
        return self.storage.data_dir / "spool"

    @property
    def priors_dir(self) -> Path:
        """Where fetched priors' files wait to be embedded (never the spool's studies)."""
        return self.storage.data_dir / "priors"

    @property
    def ui_enabled(self) -> bool:
        """Whether /ui/ is served: ``ui.enabled``, by default whether the HTTP port is on."""
        return bool(self.http.port) if self.ui.enabled is None else self.ui.enabled

    @property
    def pictures_dir(self) -> Path:
        """Thumbnails and model inputs (pxsgate.pictures), kept after the spool's files."""
        return self.storage.data_dir / "pictures"

    @property
    def db_path(self) -> Path:
        return self.storage.data_dir / "pxsgate.sqlite3"

    @property
    def database_url(self) -> str | None:
        """The PostgreSQL store's URL, or None for SQLite's file (db_path)."""
        return None if self.storage.database == "sqlite" else self.storage.database

    @property
    def node_name(self) -> str:
        """This gateway's node name: storage.node-name, by default the host name."""
        import socket

        return self.storage.node_name or socket.gethostname().split(".")[0] or "pxsgate"


def _key(f: dataclasses.Field[Any]) -> str:
    return f.name.replace("_", "-")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false", "Path": "a path"}.get(tp.__name__, tp.__name__)
    return str(tp)


def _convert(value: Any, tp: Any, path: str, dicom_checks: bool) -> Any:
    """Convert one YAML value to the field type ``tp``, or raise ConfigError naming ``path``
    (``dicom_checks``: as for :func:`_build`)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path, dicom_checks)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list; got {type(value).__name__}")
        return tuple(_convert(v, item_tp, f"{path}[{i}]", dicom_checks)
                     for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path,  # type: ignore[arg-type]  # tp is a dataclass type
                      dicom_checks)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"must be a number; got {value!r}")
        return float(value)
    if tp is str:
        # YAML reads 11112 or 0.1 as numbers; a version string "0.1" is still a string.
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(path, f"must be a string; got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"must be a path; got {value!r}")
        return Path(value)
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type[Any], data: Any, path: str, dicom_checks: bool = True) -> Any:
    """``cls`` from its YAML mapping. ``dicom_checks`` False: the selection rules are left
    to compile when first used, and the checks that need pydicom run only their part that
    does not (see :func:`load_config`)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}{key}", f"unknown key (known here: {known})")
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key not in data:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise ConfigError(f"{prefix}{key}", "is required")
            continue
        parse = f.metadata.get("parse")
        if parse is not None:
            value = parse(data[key], f"{prefix}{key}", dicom_checks)
        else:
            value = _convert(data[key], hints[f.name], f"{prefix}{key}", dicom_checks)
        check = f.metadata.get("check")
        if not dicom_checks:
            check = f.metadata.get("check_without_pydicom", check)
        if check is not None and value is not None and (problem := check(value)) is not None:
            raise ConfigError(f"{prefix}{key}", problem)
        kwargs[f.name] = value
    return cls(**kwargs)


def _cross_check_tls(tls: TlsConfig, path: str = "dicom.scp.tls") -> None:
    if tls.certificate is None:
        if tls.private_key or tls.ca_certificates or tls.require_client_certificate:
            raise ConfigError(f"{path}.certificate", "is required when TLS is configured")
        return
    if tls.private_key is None:
        raise ConfigError(f"{path}.private-key", "is required with a certificate")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise ConfigError(f"{path}.ca-certificates",
                          "is required to verify client certificates")


def _cross_check_exporter(e: ExporterConfig, path: str) -> None:
    _check_objects(e, path)
    _cross_check_hl7(e, path)
    if e.type == "hl7":
        return
    # --- fhir
    if e.type == "fhir":
        _cross_check_fhir(e, path)
        return
    _no_fhir_keys(e, path)
    # --- fhir: end
    if e.type in ("http", "dicomweb"):
        article = "an" if e.type == "http" else "a"
        _cross_check_url(e, path, f"{article} {e.type} exporter", "dicom exporters")
        if e.type == "dicomweb":
            _only_scores(e, path)
        return
    for key in ("host", "port", "ae_title"):
        if getattr(e, key) is None:
            raise ConfigError(f"{path}.{key.replace('_', '-')}",
                              "is required for a dicom exporter")
    if e.url is not None:
        raise ConfigError(f"{path}.url", "applies to http exporters only")
    _only_scores(e, path)


# --- fhir
# pxsgate's own codes (no LOINC or SNOMED CT concept names the PXS score), in this system.
FHIR_DEFAULT_CODE_SYSTEM = "urn:pxsgate:codes"
FHIR_DEFAULT_CODES = {"score": "pxs-score", "change": "pxs-change", "report": "pxs-report"}
_FHIR_KEYS = ("patient_id_system", "code_system", "score_code", "change_code", "report_code")
_FHIR_CODE_RE = re.compile(r"^\S+( \S+)*$")  # FHIR's code datatype


def _cross_check_fhir(e: ExporterConfig, path: str) -> None:
    _cross_check_url(e, path, "a fhir exporter", "dicom exporters")
    _only_scores(e, path)
    if e.patient_id_system is None:
        raise ConfigError(f"{path}.patient-id-system", "is required for a fhir exporter: "
                          "the system of the PatientIDs (a URI, e.g. urn:oid:...)")
    for key in ("patient_id_system", "code_system"):
        value = getattr(e, key)
        if value is not None and (not urllib.parse.urlsplit(value).scheme
                                  or any(c.isspace() for c in value)):
            raise ConfigError(f"{path}.{key.replace('_', '-')}",
                              f"must be an absolute URI (urn:... or http(s)://...); got {value!r}")
    for key in ("score_code", "change_code", "report_code"):
        value = getattr(e, key)
        if value is not None and not _FHIR_CODE_RE.match(value):
            raise ConfigError(f"{path}.{key.replace('_', '-')}",
                              "must be a FHIR code: no leading, trailing or double spaces")
    codes = [e.score_code or FHIR_DEFAULT_CODES["score"],
             e.change_code or FHIR_DEFAULT_CODES["change"],
             e.report_code or FHIR_DEFAULT_CODES["report"]]
    if len(set(codes)) != len(codes):
        raise ConfigError(f"{path}.score-code", "score-code, change-code and report-code "
                          f"must differ (defaults: {', '.join(FHIR_DEFAULT_CODES.values())})")


def _no_fhir_keys(e: ExporterConfig, path: str) -> None:
    for key in _FHIR_KEYS:
        if getattr(e, key) is not None:
            raise ConfigError(f"{path}.{key.replace('_', '-')}", "applies to fhir exporters only")
# --- fhir: end


_HL7_KEYS = ("tls", "sending_application", "sending_facility", "receiving_application",
             "receiving_facility", "patient_id_authority", "service_id", "service_text",
             "service_system", "observation_id", "observation_text", "observation_system",
             "change_observation_id", "change_observation_text", "processing_id",
             "include_phi")


def _cross_check_hl7(e: ExporterConfig, path: str) -> None:
    """An hl7 exporter: host and port, TLS files only with tls, the codes it must send;
    any other exporter: none of the hl7 keys."""
    if e.type != "hl7":
        defaults = {f.name: f.default for f in dataclasses.fields(ExporterConfig)}
        for key in _HL7_KEYS:
            if getattr(e, key) != defaults[key]:
                raise ConfigError(f"{path}.{key.replace('_', '-')}",
                                  "applies to hl7 exporters only")
        return
    for key in ("host", "port"):
        if getattr(e, key) is None:
            raise ConfigError(f"{path}.{key}", "is required for an hl7 exporter")
    for key in ("url", "bearer_token_file", "ae_title"):
        if getattr(e, key) is not None:
            raise ConfigError(f"{path}.{key.replace('_', '-')}",
                              "does not apply to hl7 exporters")
    for key in ("sending_application", "service_id", "observation_id",
                "observation_system", "change_observation_id"):
        if not getattr(e, key):
            raise ConfigError(f"{path}.{key.replace('_', '-')}",
                              "cannot be empty for an hl7 exporter")
    if (e.client_certificate is None) != (e.client_key is None):
        raise ConfigError(f"{path}.client-key",
                          "client-certificate and client-key go together")
    if not e.tls:
        for key in ("ca_certificates", "client_certificate"):
            if getattr(e, key) is not None:
                raise ConfigError(f"{path}.{key.replace('_', '-')}",
                                  "applies with tls: true only")
    _only_scores(e, path)


def _cross_check_url(e: ExporterConfig | PriorSourceConfig, path: str, what: str,
                     dimse: str) -> None:
    """An http or dicomweb exporter, or a dicomweb prior source (``what`` names it, and
    ``dimse`` what the DIMSE settings apply to): its URL, and credentials that never cross
    the network in clear text."""
    if e.url is None:
        raise ConfigError(f"{path}.url", f"is required for {what}")
    parsed = urllib.parse.urlsplit(e.url)
    if parsed.username is not None or parsed.password is not None:
        # Errors and the outbox's last_error quote the URL: a password in it would spread.
        raise ConfigError(f"{path}.url", "must not carry a user or password: use "
                          "bearer-token-file or a client certificate")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{path}.url", f"must be an http(s) URL; got {e.url!r}")
    loopback = parsed.hostname in ("localhost", "127.0.0.1", "::1")
    if parsed.scheme == "http" and not loopback and (
            e.bearer_token_file is not None or e.client_certificate is not None):
        raise ConfigError(f"{path}.url", "credentials would cross the network in clear "
                          "text: use https")
    if (e.client_certificate is None) != (e.client_key is None):
        raise ConfigError(f"{path}.client-key",
                          "client-certificate and client-key go together")
    for key in ("host", "port", "ae_title"):
        if getattr(e, key) is not None:
            raise ConfigError(f"{path}.{key.replace('_', '-')}", f"applies to {dimse} only")


def _check_objects(e: ExporterConfig, path: str) -> None:
    if not e.objects:
        raise ConfigError(f"{path}.objects", "names nothing to send")
    if len(set(e.objects)) != len(e.objects):
        raise ConfigError(f"{path}.objects", "names an object twice")
    if e.type != "dicom" and e.objects != ("sr",):
        raise ConfigError(f"{path}.objects", "applies to dicom exporters only")


def _only_scores(e: ExporterConfig, path: str) -> None:
    if e.statuses is not None and set(e.statuses) != {Status.SUCCEEDED}:
        raise ConfigError(f"{path}.statuses",
                          f"a {e.type} exporter sends scores: only SUCCEEDED results")


def _cross_check_ui(config: Config) -> None:
    ui = config.ui
    if ui.enabled and not config.http.port:
        raise ConfigError("ui.enabled", "the web UI needs the HTTP port: set http.port")
    if ui.trusted_proxies and ui.user_header is None:
        raise ConfigError("ui.user-header", "is required with ui.trusted-proxies")
    if ui.user_header is not None and not ui.trusted_proxies:
        raise ConfigError("ui.trusted-proxies",
                          "is required with ui.user-header (the proxies it is trusted from)")


def _cross_check(config: Config) -> None:
    _cross_check_tls(config.dicom.scp.tls)
    _cross_check_tls(config.http.tls, "http.tls")
    _cross_check_ui(config)
    names: set[str] = set()
    for i, exporter in enumerate(config.exporters):
        if exporter.name in names:
            raise ConfigError(f"exporters[{i}].name", f"{exporter.name!r} is used twice")
        names.add(exporter.name)
        _cross_check_exporter(exporter, f"exporters[{i}]")
    bp = config.backpressure
    if bp.refuse_above_studies < bp.delay_above_studies:
        raise ConfigError("backpressure.refuse-above-studies",
                          "must not be below backpressure.delay-above-studies")
    titles = {t.ae_title for t in config.dicom.scp.ae_titles}
    if not titles:
        raise ConfigError("dicom.scp.ae-titles", "at least one AE title is required")
    _cross_check_priors(config.priors, titles)
    for i, mapping in enumerate(config.dicom.pipeline_mappings):
        if mapping.clara_ae_title not in titles:
            raise ConfigError(
                f"dicom.pipeline-mappings[{i}].clara-ae-title",
                f"{mapping.clara_ae_title!r} is not one of dicom.scp.ae-titles",
            )


def _cross_check_priors(priors: PriorsConfig, titles: set[str]) -> None:
    path = "priors.source"
    source = priors.source
    if source is None:
        if priors.enabled:
            raise ConfigError(path, "is required when priors are enabled")
        return
    if source.type == "dimse":
        for key, value in (("host", source.host), ("port", source.port),
                           ("ae-title", source.ae_title)):
            if value is None:
                raise ConfigError(f"{path}.{key}", "is required for a dimse source")
        if source.url is not None:
            raise ConfigError(f"{path}.url", "applies to dicomweb sources only")
        if source.move_destination is not None and source.move_destination not in titles:
            raise ConfigError(f"{path}.move-destination",
                              f"{source.move_destination!r} is not one of dicom.scp.ae-titles")
        return
    _cross_check_url(source, path, "a dicomweb source", "dimse sources")


def config_from_mapping(data: Any, *, skip_dicom_checks: bool = False) -> Config:
    """Validate a parsed YAML document (a mapping) and return the frozen config
    (``skip_dicom_checks``: as for :func:`load_config`)."""
    config: Config = _build(Config, data, "", not skip_dicom_checks)
    _cross_check(config)
    return config


def resolve_config_path(explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """The safe constructor, refusing a key given twice in one mapping: YAML would silently
    keep the last, so a pasted second ``port:`` would win unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader: the reference, and the one whose messages say
    where a mistake is (the line, with a caret under it)."""


_FAST_LOADER: type[yaml.CSafeLoader] | None = None
if yaml.__with_libyaml__:  # PyYAML's wheels have it; a build without libyaml does not

    class _UniqueKeyCLoader(_UniqueKeys, yaml.CSafeLoader):
        """The same over libyaml's parser: ~15x faster on config/pxsgate.yaml (1 ms, not
        15 ms)."""

    _FAST_LOADER = _UniqueKeyCLoader


def _parse_yaml(text: str) -> Any:
    """The YAML document in ``text``, read by libyaml where PyYAML has it; a document it
    refuses is read again by the pure-Python loader, so that the YAMLError says what it
    always said (and where)."""
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)  # a safe loader
        except yaml.YAMLError:
            pass
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path, *, skip_dicom_checks: bool = False) -> Config:
    """Read and validate a YAML config file; raise ConfigError on any problem.

    ``skip_dicom_checks``: for the commands that only read the store, which must not wait
    ~0.2 s for pydicom to import. Two checks are left out: the selection rules are
    compiled when first used, not now (a mistake in them raises ConfigError then), and
    the accepted transfer syntaxes are checked to be UIDs, not to be decodable here.
    Everything else is validated as always."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror or exc}") from exc
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {exc}") from exc
    return config_from_mapping(data, skip_dicom_checks=skip_dicom_checks)
