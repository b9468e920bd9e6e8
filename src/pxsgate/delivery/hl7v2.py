"""The HL7 v2 exporter: an ORU^R01 (HL7 v2.5.1) per result, sent over MLLP to an interface
engine, RIS or EHR, optionally over TLS.

The message (built with hl7apy, which knows the v2.5.1 ORU_R01 structure and escapes each
value; see :func:`build_oru`)::

    MSH  sending/receiving application and facility (config), the time of sending,
         ORU^R01^ORU_R01, control id (MSH-10: from the delivery id, the same on every try),
         processing id (config), 2.5.1, UNICODE UTF-8 when a value is not ASCII
    PID  PID-3: PatientID^^^patient-id-authority; with include-phi the name, birth date
         and sex from the scored image's header (the result document carries none of them)
    OBR  OBR-2/OBR-3 the accession number (placer and filler order number), OBR-4 the
         service (config), OBR-7 the study's date and time, OBR-22 when it was scored,
         OBR-25 F (P with demonstration weights)
    OBX  NM: the headline PXS score (OBX-3 from config, default PXS^PXS score^L),
         OBX-11 F (P with demonstration weights), OBX-18 the model, OBX-19 when scored
    NTE  "scored with demonstration weights, not for clinical use", review flags
    OBX  NM: the change since the prior (its distance), when the result has one
    NTE  the prior's date, the interval in days, the prior's score and the difference

Each delivery opens one connection, sends the message framed as MLLP (0x0B ... 0x1C 0x0D,
python-hl7's asyncio streams), waits for the ACK and closes. MSA-1 AA or CA is delivered,
AE or CE is tried again (ExportError), AR or CR is dead at once (PermanentExportError); so
is a superseded result (the study was scored again: the newer result's ORU is sent) or
one that cannot be reported. No connection, no ACK within timeout-seconds, an unreadable
ACK or one that acknowledges another control id: tried again. Errors name the ACK code and
the receiver's ERR-3 code, never its free text (it may quote the patient).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.v2_5_1 import get_base_datatypes
from pydicom import dcmread

from pxsgate.config import ExporterConfig
from pxsgate.document import CHANGE_CODE, ResultDocument
from pxsgate.errors import ConfigError, ExportError, PermanentExportError
from pxsgate.records import Status
from pxsgate.results import format_score
from pxsgate.store import Store

VERSION = "2.5.1"
DELIVERED = frozenset({"AA", "CA"})  # original and enhanced acknowledgment mode
REJECTED = frozenset({"AR", "CR"})
RETRY = frozenset({"AE", "CE"})
CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in v2.5.1
DEMO_NOTE = "Scored with demonstration weights, not for clinical use ({model})."
ACK_LIMIT = 1 << 20  # bytes; an ACK is a few hundred

_TYPES = get_base_datatypes()
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")  # HL7 NM
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")


@dataclass(frozen=True)
class Demographics:
    """PID-5, PID-7 and PID-8 as the scored image's header gives them (include-phi)."""

    name: str = ""  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, O


def control_id(delivery_id: str) -> str:
    """MSH-10: the delivery id's first 20 hex digits, so that every try of a delivery
    carries the same id (the receiver may de-duplicate on it) and an operator can find it in
    `pxsgate outbox list`."""
    return delivery_id.replace("-", "")[:CONTROL_ID_LENGTH]


def _text(value: str, datatype: str = "ST") -> Any:
    """A value as an HL7 ``datatype`` (a textual one: ST, IS, ID, FT), every delimiter
    (| ^ ~ \\ &) escaped by hl7apy on output.

    hl7apy escapes a backslash only where it does not already begin or end an escape
    sequence, so a value with a literal "\\F\\" in it would go out unescaped and come back
    as "|". Escaping the escape character first (to \\E\\, which hl7apy leaves as it is)
    makes every value round-trip. Control characters (a CR would end the segment) become
    spaces."""
    return _TYPES[datatype](_CONTROL.sub(" ", value).replace("\\", "\\E\\"))


def _hl7_time(iso: str | None, *, with_zone: bool = True) -> str:
    """An ISO 8601 time as HL7 DTM: YYYYMMDD[HHMMSS][+ZZZZ]; "" when it is none. A time
    without an offset (the study's, as DICOM gives it) stays local."""
    if not iso:
        return ""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return ""
    if len(iso) <= 10:
        return moment.strftime("%Y%m%d")
    if moment.tzinfo is None or not with_zone:
        return moment.strftime("%Y%m%d%H%M%S")
    return moment.strftime("%Y%m%d%H%M%S%z")


def _number(value: str, what: str) -> str:
    text = value.strip()
    if not _NUMBER.match(text):
        raise PermanentExportError(f"the {what} {value[:20]!r} is not a number")
    return text


def _set_text(element: Any, value: str) -> None:
    """Set a field or component of a textual type (ST, IS, ID) to ``value``, escaped."""
    if value:
        element.value = _text(value, str(element.datatype))


def build_oru(document: ResultDocument, config: ExporterConfig, message_control_id: str,
              *, demo: bool, sent_at: datetime | None = None,
              demographics: Demographics | None = None) -> str:
    """The result as an ORU^R01 in ER7 (segments ended by CR, no MLLP frame);
    PermanentExportError when it reports no score."""
    if document.status != Status.SUCCEEDED:
        raise PermanentExportError(
            f"an ORU reports a score: the result is {document.status}, not SUCCEEDED")
    headline = document.pxsgate.headline
    scores = document.scores
    if headline is not None:
        score = headline.value
    elif scores:
        score = scores[0].value
    else:
        raise PermanentExportError("the result has no PXS score")
    score = _number(score, "PXS score")
    status = "P" if demo else "F"
    scored_at = _hl7_time(document.updated_at or document.created_at)
    study_time = _hl7_time(document.pxsgate.study_datetime, with_zone=False)

    m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = m.msh
    _set_text(msh.msh_3.hd_1, config.sending_application)
    _set_text(msh.msh_4.hd_1, config.sending_facility)
    _set_text(msh.msh_5.hd_1, config.receiving_application)
    _set_text(msh.msh_6.hd_1, config.receiving_facility)
    msh.msh_7.ts_1 = (sent_at or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    msh.msh_9 = "ORU^R01^ORU_R01"
    _set_text(msh.msh_10, message_control_id)
    msh.msh_11.pt_1 = config.processing_id
    msh.msh_12.vid_1 = VERSION

    result = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    _set_text(pid.pid_3.cx_1, document.patient_id)
    _set_text(pid.pid_3.cx_4.hd_1, config.patient_id_authority)
    if demographics is not None:
        _person_name(pid, demographics.name)
        if re.fullmatch(r"\d{8}", demographics.birth_date):
            pid.pid_7.ts_1 = demographics.birth_date
        if demographics.sex in ("M", "F", "O"):
            pid.pid_8 = demographics.sex

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    _set_text(obr.obr_2.ei_1, document.accession_number)
    _set_text(obr.obr_3.ei_1, document.accession_number)
    _set_text(obr.obr_4.ce_1, config.service_id)
    _set_text(obr.obr_4.ce_2, config.service_text)
    _set_text(obr.obr_4.ce_3, config.service_system)
    if study_time:
        obr.obr_7.ts_1 = study_time
    if scored_at:
        obr.obr_22.ts_1 = scored_at
    obr.obr_25 = status

    notes = []
    if demo:
        notes.append(DEMO_NOTE.format(model=document.model.id))
    if document.pxsgate.flags:
        notes.append("Review flags: " + ", ".join(document.pxsgate.flags))
    _observation(order, 1, (config.observation_id, config.observation_text,
                            config.observation_system), score, status, document, notes)

    change = next((r.change for r in document.results
                   if r.code == CHANGE_CODE and r.change is not None), None)
    if change is not None:
        c = change
        prior = c.prior_study_date.replace("T", " ")
        note = (f"Distance to the image of the prior study of {prior} "
                f"({c.interval_days:g} days earlier; prior PXS score "
                f"{format_score(c.prior_score)}, score difference "
                f"{'+' if c.score_difference >= 0 else ''}{format_score(c.score_difference)}).")
        _observation(order, 2, (config.change_observation_id,
                                config.change_observation_text, config.observation_system),
                     _number(format_score(c.distance), "change distance"), status, document,
                     [note])

    er7 = str(m.to_er7())
    if not er7.isascii():
        msh.msh_18 = "UNICODE UTF-8"
        er7 = str(m.to_er7())
    return er7


def _person_name(pid: Any, name: str) -> None:
    """DICOM PN family^given^middle^prefix^suffix (its alphabetic group) as XPN
    family^given^middle^suffix^prefix."""
    parts = (name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    xpn = pid.pid_5
    _set_text(xpn.xpn_1.fn_1, family)
    _set_text(xpn.xpn_2, given)
    _set_text(xpn.xpn_3, middle)
    _set_text(xpn.xpn_4, suffix)
    _set_text(xpn.xpn_5, prefix)


def _observation(order: Any, set_id: int, code: tuple[str, str, str], value: str,
                 status: str, document: ResultDocument, notes: list[str]) -> None:
    group = order.add_group("ORU_R01_OBSERVATION")
    obx = group.add_segment("OBX")
    obx.obx_1 = str(set_id)
    obx.obx_2 = "NM"
    _set_text(obx.obx_3.ce_1, code[0])
    _set_text(obx.obx_3.ce_2, code[1])
    _set_text(obx.obx_3.ce_3, code[2])
    obx.obx_5 = value  # an HL7 NM (checked): digits, a sign, a point
    obx.obx_11 = status
    _set_text(obx.obx_18.ei_1, document.model.id)
    scored_at = _hl7_time(document.updated_at or document.created_at)
    if scored_at:
        obx.obx_19.ts_1 = scored_at
    for i, text in enumerate(notes, start=1):
        nte = group.add_segment("NTE")
        nte.nte_1 = str(i)
        nte.nte_2 = "L"  # HL7 table 0105: the filler (ancillary) is the source
        _set_text(nte.nte_3, text)


def read_ack(ack: Any, expected_control_id: str, peer: str) -> None:
    """Judge an ACK parsed by python-hl7: return when it acknowledges the message, else
    raise ExportError (try again) or PermanentExportError (AR/CR: never)."""
    try:
        msa = ack.segment("MSA")
        code = str(ack.unescape(str(msa[1]))).strip().upper()
        acknowledged = str(ack.unescape(str(msa[2]))).strip() if len(msa) > 2 else ""
    except (KeyError, IndexError) as exc:
        raise ExportError(f"MLLP {peer}: the answer has no MSA segment") from exc
    if acknowledged != expected_control_id:
        raise ExportError(f"MLLP {peer}: the ACK acknowledges message control id "
                          f"{acknowledged[:CONTROL_ID_LENGTH]!r}, not "
                          f"{expected_control_id!r} (MSA-2); the message is sent again")
    if code in DELIVERED:
        return
    detail = _error_code(ack)
    if code in REJECTED:
        raise PermanentExportError(f"MLLP {peer}: answered {code} (rejected){detail}")
    if code in RETRY:
        raise ExportError(f"MLLP {peer}: answered {code} (application error){detail}")
    raise ExportError(f"MLLP {peer}: answered an unknown acknowledgment code "
                      f"{code[:4]!r} (MSA-1)")


def _error_code(ack: Any) -> str:
    """The ERR segment's HL7 error code (ERR-3.1, table 0357), or MSA-6's; only a code:
    the receiver's text may quote the message."""
    for segment, index in (("ERR", 3), ("MSA", 6)):
        try:
            code = str(ack.unescape(str(ack.segment(segment)[index][0][0]))).strip()
        except (KeyError, IndexError):
            continue
        if _CODE.match(code):
            return f", error code {code}"
    return ""


def _read_demographics(path: Path) -> Demographics:
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["PatientName", "PatientBirthDate", "PatientSex",
                                "SpecificCharacterSet"])
    return Demographics(name=str(ds.get("PatientName", "") or ""),
                        birth_date=str(ds.get("PatientBirthDate", "") or "").strip(),
                        sex=str(ds.get("PatientSex", "") or "").strip().upper())


class Hl7Exporter:
    """The ORU over MLLP, one connection per delivery."""

    def __init__(self, config: ExporterConfig, store: Store, key: str) -> None:
        if config.host is None or config.port is None:
            raise ConfigError(key, "an hl7 exporter needs host and port")
        self.name = config.name
        self._config = config
        self._store = store
        self._key = key
        self._host, self._port = config.host, config.port
        self._peer = f"{config.host}:{config.port}"
        self._ssl: ssl.SSLContext | None = None

    async def start(self) -> None:
        if self._config.tls:
            from pxsgate.delivery.http import client_ssl_context

            self._ssl = client_ssl_context(self._config, self._key)

    async def close(self) -> None:
        return None

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        if not await self._store.is_current(document.id):
            # An older score sent after the newer one would replace it at the receiver.
            raise PermanentExportError(
                "superseded: the study was scored again; its newer result's ORU is sent")
        from pxsgate.delivery.sr import is_demo  # highdicom loads only when needed

        demo = is_demo(document.model_json or document.model.to_json())
        demographics = await self._demographics(document) if self._config.include_phi else None
        message_id = control_id(delivery_id)
        try:
            message = build_oru(document, self._config, message_id, demo=demo,
                                demographics=demographics)
        except ExportError:
            raise
        except Exception as exc:  # hl7apy's messages may quote values: not kept
            raise PermanentExportError(
                f"cannot build the ORU: {type(exc).__name__}") from exc
        await self._send(message, message_id)

    async def _demographics(self, document: ResultDocument) -> Demographics | None:
        """The name, birth date and sex from the headline image's header, while it is in
        the spool; None once it is not (the ORU goes without them)."""
        headline = document.pxsgate.headline
        uids = [headline.sop_instance_uid] if headline else []
        uids += [u for entry in document.scores for u in entry.source_uids]
        if not uids:
            return None
        paths = await self._store.instance_paths(uids[:1])
        path = paths.get(uids[0])
        if path is None or not path.exists():
            return None
        try:
            return await asyncio.to_thread(_read_demographics, path)
        except Exception:  # a header pydicom cannot read: no demographics
            return None

    async def _send(self, message: str, message_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.timeout_seconds
        tls: dict[str, Any] = ({"ssl": self._ssl, "server_hostname": self._host}
                               if self._ssl is not None else {})
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await open_hl7_connection(
                    self._host, self._port, encoding="utf-8", encoding_errors="replace",
                    limit=ACK_LIMIT, **tls)
        except TimeoutError as exc:
            raise ExportError(f"MLLP {self._peer}: no connection within "
                              f"{self._config.timeout_seconds:g} s") from exc
        except OSError as exc:  # refused, unreachable, TLS handshake or verification
            raise ExportError(f"MLLP {self._peer}: {type(exc).__name__}: {exc}") from exc
        try:
            async with asyncio.timeout_at(deadline):
                writer.writemessage(message)
                await writer.drain()
                ack = await reader.readmessage()
        except TimeoutError as exc:
            raise ExportError(f"MLLP {self._peer}: no ACK within "
                              f"{self._config.timeout_seconds:g} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise ExportError(f"MLLP {self._peer}: the connection closed before an ACK "
                              "came") from exc
        except OSError as exc:
            raise ExportError(f"MLLP {self._peer}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # a bad frame or an answer python-hl7 cannot parse
            raise ExportError(f"MLLP {self._peer}: an unreadable answer "
                              f"({type(exc).__name__})") from exc
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        read_ack(ack, message_id, self._peer)

