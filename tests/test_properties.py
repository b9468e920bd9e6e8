"""Property-based tests (hypothesis): random data sets through the selection rules and the
C-STORE handler. No exception escapes; every input gets an answer.

Selection, ``rules.select`` with the default rules (``SelectionConfig()``):

* over headers built in memory with random, missing and odd values of the tags the rules
  read (empty, multi-valued, non-ASCII, very long, numbers, bytes and sequences where text
  belongs), mixed with unreadable files;
* over headers read back by ``study.read_headers`` from random Part-10 files, as the
  service reads them, including elements whose VR on the wire is not the dictionary's.

  select never raises and returns a StudyDecision naming a rule and a reason; every instance
  gets exactly one ImageDecision, in input order, with a rule and a reason; an unreadable
  header is never selected; the selected images are a subset of the given instances, all of
  the study's one patient; the study is a candidate exactly when an image is selected; the
  flags agree with the decisions; the same input gives the same decision.

C-STORE, an in-process Gateway over real associations: random data sets in every
uncompressed and some compressed transfer syntaxes, with valid, invalid, missing and
mismatching UIDs (AffectedSOPInstanceUID against the data set's), random pixel modules and
pixel data, elements with the wrong VR, private blocks, truncated and garbled bytes:

* every C-STORE gets a response with a Status, one of 0x0000, 0xA700, 0xA900, 0xC210 (or a
  B-class warning), and the server never aborts the association; where the identifiers are
  plain and the bytes intact, the status is exactly the one the handler promises;
* every instance answered 0x0000 is indexed in SQLite and its spool file holds the bytes
  sent;
* afterwards a normal image is stored and scored, the health check is ok, and every study
  that holds an instance got a result document.

Two bugs these properties found (a header element pydicom cannot convert stopped the
selection; a malformed pixel-module element escaped preprocessing as a crash instead of a
FAILED result) have regression tests at the end, and the random inputs reach both cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from pxsgate.config import SelectionConfig
from pxsgate.errors import PreprocessError
from pxsgate.preprocess import preprocess_file
from pxsgate.records import ImageDecision, StoredInstance, StudyDecision
from pxsgate.rules import FLAG_MANY, FLAG_MULTIPLE, FLAG_WRONG_PATIENT, Header, select
from pxsgate.spool import Spool, is_valid_uid
from pxsgate.store import ResultFilter
from pxsgate.study import read_headers

from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
STORAGE = (CR, DX, DX_PROCESSING, SC, CT)
NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
          ExplicitVRBigEndian)
ENCAPSULATED = (JPEGBaseline8Bit, RLELossless, JPEG2000Lossless)
SYNTAXES = NATIVE + ENCAPSULATED
ROOT = "1.2.826.0.1.3680043.8.498.4242"  # pydicom's root, a branch of our own

CFG = SelectionConfig()
SELECT_RULES = {r.name for r in CFG.image_rules if r.action == "select"}
FLAGS = {FLAG_MULTIPLE, FLAG_MANY, FLAG_WRONG_PATIENT}

SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210
DOCUMENTED = {SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND}
# Rows, Columns, BitsAllocated: with 65535 x 65535 at 16 bits the decoded size is over 1 GB
# whatever frames and samples say (each counted at least once).
PIXEL_SIZE_TAGS = {0x00280010, 0x00280011, 0x00280100}

# Reproducible in CI: the same examples on every run, nothing read from or written to a
# local example database.
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NETWORK = settings(PROPERTY, max_examples=100)

# --- values -------------------------------------------------------------------------------

# Words the default rules look for, and their near misses.
WORDS = ("CR", "DX", "CT", "MR", "OT", "CHEST", "THORAX", "CXR", "LUNG", "LUNGS", "KNEE",
         "AP", "PA", "LAT", "LATERAL", "LL", "OBL", "CAPTURE", "ap_supine", "AP PORTABLE",
         "CHEST AP PORTABLE", "XR CHEST", "SECONDARY", "DERIVED", "PRIMARY", "ORIGINAL",
         "FOR PROCESSING", "FOR PRESENTATION", "CATH", "CATH ENHANCED", "YES", "NO",
         "MONOCHROME1", "MONOCHROME2", "RGB", "P1", "P2", CR, DX, DX_PROCESSING, SC, CT)
ODD_TEXT = ("", " ", "  AP  ", "\x00", "AP\x00", "\\", "AP\\PA", "CHEST\\", "\\\\AP",
            "ÁP", "\uff21\uff30", "中文 CHEST", "Ĉĥéšţ", "\t\n", "\u200bAP", "a" * 65, "1.0", "-0",
            "nan", "inf", "19700101", "20201301", "235960.9999999", "AP" * 40)

texts = st.one_of(
    st.sampled_from(WORDS),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join),
    st.sampled_from(ODD_TEXT),
    st.text(max_size=24),
    st.integers(65, 3000).map(lambda n: ("CHEST AP " * n)[:n]),  # very long
)

# The tags the default rules, Header.text (PatientID, acquisition time) and the pipeline's
# identity and pixel checks read.
RULE_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "SeriesDescription",
             "StudyDescription", "ImageType", "SOPClassUID", "PatientID",
             "PhotometricInterpretation", "BurnedInAnnotation", "DerivationDescription",
             "PresentationIntentType", "AcquisitionDateTime", "AcquisitionDate",
             "AcquisitionTime", "ContentDate", "ContentTime", "SeriesDate", "SeriesTime",
             "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "InstitutionName")
NUMBER_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "SamplesPerPixel")  # US
NUMBER_TEXT_TAGS = ("NumberOfFrames", "InstanceNumber", "PixelSpacing", "WindowCenter",
                    "RescaleSlope", "RescaleIntercept", "ExposureIndex")  # IS / DS
IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


# --- 1. selection rules over headers built in memory ---------------------------------------

python_values = st.one_of(
    texts,
    st.lists(texts, max_size=4),  # multi-valued
    st.integers(-(2**40), 2**40),
    st.floats(),  # nan and inf included
    st.binary(max_size=16),  # as a private element read without its dictionary
    st.none(),
    st.booleans(),
    st.integers(0, 3).map(lambda n: DicomSequence([Dataset() for _ in range(n)])),
)
ODD_VRS = ("CS", "LO", "SH", "ST", "UT", "UI", "US", "SS", "UL", "FD", "FL", "IS", "DS", "DA",
           "TM", "DT", "PN", "UN", "OB", "OW", "SQ", "AT")


@st.composite
def memory_datasets(draw: st.DrawFn) -> Dataset:
    """A header as another program might have built it: any of the rule tags, with any
    value under its own or another VR (pairs pydicom refuses to hold are left out)."""
    ds = Dataset()
    for keyword in draw(st.lists(st.sampled_from(RULE_TAGS + NUMBER_TAGS + NUMBER_TEXT_TAGS),
                                 unique=True, max_size=12)):
        tag = tag_of(keyword)
        vr = draw(st.one_of(st.just(dictionary_VR(tag)), st.sampled_from(ODD_VRS)))
        value = draw(python_values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds.add(DataElement(tag, vr, value))
            except Exception:  # pydicom refuses it: no reader of ours can meet it
                continue
    return ds


@st.composite
def memory_headers(draw: st.DrawFn) -> list[Header]:
    headers = []
    for i in range(draw(st.integers(0, 6))):
        inst = StoredInstance(f"{ROOT}.1.{i}", f"{ROOT}.2.{draw(st.integers(0, 2))}",
                              draw(st.sampled_from(STORAGE)), Path(f"/spool/{i}.dcm"))
        if draw(st.integers(0, 9)) == 0:
            headers.append(Header(inst, None, draw(st.sampled_from(
                ["", "File is missing DICOM File Meta Information header", "\x00" * 3]))))
            continue
        ds = draw(memory_datasets())
        if draw(st.booleans()):  # a plausible AP chest film, mutated
            for keyword, value in (("Modality", "CR"), ("BodyPartExamined", "CHEST"),
                                   ("SeriesDescription", "CHEST AP"), ("ViewPosition", "AP"),
                                   ("PatientID", draw(st.sampled_from(["P1", "P2", ""])))):
                if keyword not in ds:
                    setattr(ds, keyword, value)
        headers.append(Header(inst, ds))
    return headers


def check_decision(headers: Sequence[Header], decision: StudyDecision) -> None:
    assert isinstance(decision, StudyDecision)
    assert decision.rule
    assert decision.reason
    assert len(decision.images) == len(headers), "one decision per instance"
    for h, image in zip(headers, decision.images, strict=True):
        assert isinstance(image, ImageDecision)
        assert (image.sop_instance_uid, image.series_instance_uid) == (
            h.instance.sop_instance_uid, h.instance.series_instance_uid)
        assert image.rule
        assert image.reason
        assert len(image.acquired) <= 21
        if h.dataset is None:
            assert (image.selected, image.rule) == (False, "unreadable")
        if image.selected:
            assert image.rule in SELECT_RULES
    chosen = [(h, d) for h, d in zip(headers, decision.images, strict=True) if d.selected]
    given_uids = [h.instance.sop_instance_uid for h in headers]
    assert {d.sop_instance_uid for d in decision.inputs} <= set(given_uids)
    assert sorted(map(id, decision.inputs)) == sorted(id(d) for _, d in chosen)
    assert decision.candidate == bool(chosen)
    if not decision.candidate:
        assert decision.inputs == ()
    assert len({h.text("PatientID") for h, _ in chosen}) <= 1, "one patient's images"
    assert set(decision.flags) <= FLAGS
    assert len(set(decision.flags)) == len(decision.flags)
    assert (FLAG_MULTIPLE in decision.flags) == (len(chosen) > 1)
    assert (FLAG_MANY in decision.flags) == (len(chosen) > CFG.many_ap_images)
    assert (FLAG_WRONG_PATIENT in decision.flags) == any(
        d.rule == FLAG_WRONG_PATIENT for d in decision.images)


@pytest.mark.filterwarnings("ignore:::pydicom")
@PROPERTY
@given(headers=memory_headers())
def test_select_decides_every_instance_of_headers_built_in_memory(
        headers: list[Header]) -> None:
    decision = select(headers, CFG)
    check_decision(headers, decision)
    assert select(headers, CFG) == decision, "the same headers, the same decision"


# --- wire-level data sets (Part-10 files, C-STORE payloads) -------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
RAW_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "AT", "IS", "DS", "LO", "CS", "DA", "TM",
           "UI", "UN", "OB", "OW", "SQ")

RAW_TAGS = (
    *(tag_of(k) for k in RULE_TAGS + NUMBER_TAGS + NUMBER_TEXT_TAGS + IDENTIFYING),
    0x00080000,  # a group length (retired, to be ignored)
    0x00090010,  # a private creator ...
    0x00091001,  # ... and an element of its block
    0x00191010,  # a private element without a creator
    0x00290010,
    0x00291100,
    0x7FE00008,  # Float Pixel Data
)


def raw_element(tag: int, vr: str, value: bytes, syntax: UID) -> bytes:
    """One element as bytes, whatever its VR and value length (pydicom would fix them)."""
    order = "<" if syntax.is_little_endian else ">"
    head = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF)
    if syntax.is_implicit_VR:
        return head + struct.pack(f"{order}I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(f"{order}I", len(value)) + value
    return head + vr.encode() + struct.pack(f"{order}H", len(value)) + value


def encode_dataset(ds: Dataset, raws: dict[int, bytes], syntax: UID) -> bytes:
    """``ds`` and the raw elements, in tag order, in ``syntax``: what pydicom cannot write
    (text outside the character set of a UI, say) goes as UTF-8 bytes under its own VR."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax.is_implicit_VR
    fp.is_little_endian = syntax.is_little_endian
    charset = ds.get("SpecificCharacterSet", "ISO_IR 6")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in sorted({int(elem.tag) for elem in ds} | set(raws)):
            if tag in raws:
                fp.write(raws[tag])
                continue
            elem = ds[tag]
            buffer = DicomBytesIO()
            buffer.is_implicit_VR = syntax.is_implicit_VR
            buffer.is_little_endian = syntax.is_little_endian
            try:
                write_data_element(buffer, elem, charset)
            except Exception:  # pydicom will not encode it; the wire takes any bytes
                text = "\\".join(map(str, elem.value)) if elem.VM > 1 else str(elem.value)
                fp.write(raw_element(tag, elem.VR, text.encode("utf-8", "surrogatepass"),
                                     syntax))
            else:
                fp.write(buffer.getvalue())
    data: bytes = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


def part10(sop_class: str, sop_instance: str, syntax: UID, payload: bytes) -> bytes:
    """A Part-10 file: its file meta carries the request's UIDs, then ``payload`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + payload


@dataclass(frozen=True)
class Wire:
    """One C-STORE: the request's UIDs, the data set's bytes, and, where its identifiers are
    plain and its bytes intact, the status the handler promises for it."""

    sop_class: str  # AffectedSOPClassUID, and the presentation context's abstract syntax
    sop_instance: str  # AffectedSOPInstanceUID
    syntax: UID
    study: str | None  # StudyInstanceUID as put in the data set (None: absent)
    expected: int | None
    payload: bytes = field(repr=False)

    def file(self) -> bytes:
        return part10(self.sop_class, self.sop_instance, self.syntax, self.payload)


STUDY_POOL = tuple(f"{ROOT}.3.{i}" for i in range(6))
SERIES_POOL = tuple(f"{ROOT}.4.{i}" for i in range(4))
ODD_UIDS = ("", "0", "00", "1.02.3", "1..2", ".1.2", "1.2.", "1.2.3 ", " 1.2.3", "1.2.3\x00",
            "abc", "1.2.abc", "1.2.3\\1.2.4", "1" * 65, "1." + "9" * 63, "1.2.3" * 20,
            "\u0661.\u0662.\u0663", "1.2.-3", "1.2.+3", ".".join(map(str, range(1, 30))))
odd_uids = st.one_of(
    st.sampled_from(ODD_UIDS),
    st.text(alphabet="0123456789.", min_size=1, max_size=70),
    st.text(alphabet="0123456789.abXY-_ ", max_size=80),
)
fresh_uids = st.uuids().map(lambda u: f"2.25.{u.int}")


def plain(uid: str | None) -> bool:
    """Read back exactly as written: no padding, separators or characters to re-encode."""
    return uid is None or (uid.isascii() and uid.isprintable() and " " not in uid
                           and "\\" not in uid)


@st.composite
def uids(draw: st.DrawFn, pool: Sequence[str]) -> str | None:
    kind = draw(st.integers(0, 19))
    if kind < 6:
        return draw(st.sampled_from(pool))
    if kind < 17:
        return draw(fresh_uids)
    if kind == 17:
        return None
    return draw(odd_uids)


@st.composite
def pixel_module(draw: st.DrawFn, ds: Dataset, syntax: UID) -> None:
    """Rows, Columns, bits, samples and Pixel Data (<= 64 x 64): mostly a consistent
    greyscale image, else any values; native or encapsulated; the right size, truncated,
    too long, empty or absent."""
    rows, cols = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    if draw(st.integers(0, 2)) > 0:
        bits = draw(st.sampled_from([16, 8]))
        stored = 12 if bits == 16 else 8
        module: dict[str, Any] = {
            "Rows": rows, "Columns": cols, "BitsAllocated": bits, "BitsStored": stored,
            "HighBit": stored - 1, "PixelRepresentation": 0, "SamplesPerPixel": 1,
            "PhotometricInterpretation": draw(st.sampled_from(["MONOCHROME2",
                                                               "MONOCHROME1"]))}
        kind = "exact"
    else:
        rows, cols = draw(st.integers(0, 64)), draw(st.integers(0, 64))
        bits = draw(st.sampled_from([8, 16, 12, 1, 32, 0]))
        stored = draw(st.integers(0, 40))
        module = {
            "Rows": rows, "Columns": cols, "BitsAllocated": bits, "BitsStored": stored,
            "HighBit": draw(st.one_of(st.just(max(stored - 1, 0)), st.integers(0, 40))),
            "PixelRepresentation": draw(st.sampled_from([0, 1, 2])),
            "SamplesPerPixel": draw(st.sampled_from([1, 3, 0, 4])),
            "PhotometricInterpretation": draw(st.sampled_from(
                ["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "", "YBR_FULL_422",
                 "monochrome2"])),
            "NumberOfFrames": draw(st.sampled_from(["1", "2", "0", ""])),
        }
        module = {k: v for k, v in module.items() if draw(st.integers(0, 9)) > 0}
        kind = draw(st.sampled_from(["exact", "short", "long", "empty", "absent",
                                     "encapsulated"]))
    for keyword, value in module.items():
        add(ds, keyword, value)
    if kind == "absent":
        return
    size = rows * cols * max(int(module.get("SamplesPerPixel", 1)), 1) * max(bits // 8, 1)
    size = {"exact": size, "short": size // 2, "long": size + draw(st.integers(1, 99)),
            "empty": 0}.get(kind, size)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    if kind == "encapsulated" or syntax in ENCAPSULATED:
        frames = draw(st.lists(st.binary(min_size=2, max_size=64), min_size=1, max_size=3))
        ds.add(DataElement(0x7FE00010, "OB", encapsulate(frames), is_undefined_length=True))
    else:
        if len(data) % 2:
            data += b"\0"
        ds.add(DataElement(0x7FE00010, "OW" if bits > 8 else "OB", data))


@st.composite
def raw_elements(draw: st.DrawFn, syntax: UID) -> dict[int, bytes]:
    """Elements with the wrong VR or a value no VR allows: numbers where text belongs,
    odd lengths, garbage; private blocks and group lengths."""
    raws: dict[int, bytes] = {}
    for tag in draw(st.lists(st.sampled_from(RAW_TAGS), unique=True, max_size=4)):
        vr = draw(st.sampled_from(RAW_VRS))
        value = draw(st.one_of(
            st.binary(max_size=12),
            st.sampled_from([b"abc", b"1.5", b"-", b"1\\2", b"CR", b"CHEST", b"AP ",
                             b"\xff\xfe", b"FUZZ CREATOR", b"1" * 13]),
        ))
        if vr == "SQ" and value:
            vr = "UN"  # a sequence's bytes must parse as items; a UN's need not
        raws[tag] = raw_element(tag, vr, value, syntax)
    return raws


def add(ds: Dataset, keyword: str, value: Any) -> None:
    """Set an element under its dictionary VR, if pydicom takes the value at all."""
    tag = tag_of(keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):
            ds.add(DataElement(tag, dictionary_VR(tag), value))


@st.composite
def wires(draw: st.DrawFn) -> Wire:
    """A random C-STORE (see the module docstring), with its expected status if plain."""
    syntax = draw(st.sampled_from(SYNTAXES))
    sop_class = draw(st.sampled_from((CR, CR, DX, *STORAGE)))
    ds = Dataset()
    if draw(st.integers(0, 3)) == 0:
        ds.SpecificCharacterSet = draw(st.sampled_from(
            ["ISO_IR 192", "ISO_IR 100", "ISO 2022 IR 87", "GB18030", "NOT A CHARSET", ""]))
    # The identifiers, and the request's.
    kind = draw(st.integers(0, 19))
    ds_class = (sop_class if kind < 17 else None if kind == 17 else
                draw(st.one_of(st.sampled_from(STORAGE), odd_uids)))
    study = draw(uids(STUDY_POOL))
    series = draw(uids(SERIES_POOL))
    kind = draw(st.integers(0, 19))
    ds_sop = draw(fresh_uids) if kind < 17 else None if kind == 17 else draw(odd_uids)
    sendable = (ds_sop is not None and 0 < len(ds_sop) <= 64 and plain(ds_sop)
                and ds_sop.strip("\0") == ds_sop)
    affected = ds_sop if sendable and draw(st.integers(0, 19)) < 17 else draw(fresh_uids)
    assert affected is not None
    for keyword, uid in (("SOPClassUID", ds_class), ("StudyInstanceUID", study),
                         ("SeriesInstanceUID", series), ("SOPInstanceUID", ds_sop)):
        if uid is not None:
            ds.add(DataElement(tag_of(keyword), "UI", uid))
    # What the rules read: a plausible AP chest film now and then, so that images reach
    # the decoder; random values on top.
    chest = draw(st.integers(0, 3)) > 0
    if chest:
        ds.Modality = draw(st.sampled_from(["CR", "DX"]))
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "CHEST AP"
        ds.ViewPosition = "AP"
        ds.PatientID = draw(st.sampled_from(["P1", "P1", "P2"]))
    for keyword in draw(st.lists(st.sampled_from(RULE_TAGS), unique=True,
                                 max_size=2 if chest else 6)):
        if keyword != "SOPClassUID":
            add(ds, keyword, draw(st.one_of(texts, st.lists(texts, min_size=2, max_size=3))))
    for keyword in draw(st.lists(st.sampled_from(NUMBER_TEXT_TAGS), unique=True,
                                 max_size=3)):
        add(ds, keyword, str(draw(st.one_of(st.integers(-5, 5), st.floats(-1e6, 1e6)))))
    if draw(st.integers(0, 4)) == 0:
        item = Dataset()
        item.ReferencedSOPClassUID = CR
        item.ReferencedSOPInstanceUID = draw(st.one_of(fresh_uids, odd_uids))
        ds.ReferencedImageSequence = DicomSequence([item])
    draw(pixel_module(ds, syntax))
    # Sizes that lie: a header declaring far more pixel data than max-dataset-mb (1 GB
    # here) once decoded, whatever Pixel Data follows (issue 18.1).
    huge = draw(st.integers(0, 11)) == 0
    if huge:
        ds.Rows = ds.Columns = 65535
        ds.BitsAllocated = 16
    raws = draw(raw_elements(syntax))
    payload = encode_dataset(ds, raws, syntax)
    # Corruption of the bytes as sent.
    corruption = draw(st.sampled_from(["none"] * 6 + ["truncate", "append", "overwrite"]))
    if corruption != "none" and payload:
        at = draw(st.integers(0, len(payload) - 1))
        if corruption == "truncate":
            payload = payload[:at]
        elif corruption == "append":
            payload += draw(st.binary(min_size=1, max_size=32))
        else:
            junk = draw(st.binary(min_size=1, max_size=8))
            payload = payload[:at] + junk + payload[at + len(junk):]
    intact = corruption == "none" and not {tag_of(k) for k in IDENTIFYING} & raws.keys()
    expected = None
    if intact and all(plain(u) for u in (ds_class, study, series, ds_sop)):
        if ds_class is None or ds_sop is None:
            expected = CANNOT_UNDERSTAND
        elif ds_sop != affected or ds_class != sop_class:
            expected = MISMATCH
        elif not all(is_valid_uid(u or "") for u in (study, series, ds_sop)):
            expected = CANNOT_UNDERSTAND
        else:
            expected = SUCCESS
    if huge and intact:
        # Decided from the header, before the identifiers; unknown when a random raw
        # element replaced Rows or Columns.
        expected = None if PIXEL_SIZE_TAGS & raws.keys() else OUT_OF_RESOURCES
    note(f"huge {huge}; syntax {syntax.name}; request {sop_class} / {affected!r}; data set class "
         f"{ds_class!r} study {study!r} series {series!r} sop {ds_sop!r}; raw elements "
         f"{sorted(f'{t:08X}' for t in raws)}; corruption {corruption}")
    return Wire(sop_class, affected, syntax, study, expected, payload)


# --- 1b. selection rules over headers read back from random files -------------------------


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property-files")


@pytest.mark.filterwarnings("ignore:::pydicom")
@PROPERTY
@given(study=st.lists(wires(), max_size=5), unreadable=st.integers(0, 1))
def test_select_decides_every_instance_of_headers_read_from_random_files(
        files_dir: Path, study: list[Wire], unreadable: int) -> None:
    instances = []
    for i, wire in enumerate(study):
        path = files_dir / f"{i}.dcm"
        path.write_bytes(wire.file())
        instances.append(StoredInstance(wire.sop_instance, f"{ROOT}.2.{i}", wire.sop_class,
                                        path))
    if unreadable:
        instances.append(StoredInstance(f"{ROOT}.9", f"{ROOT}.9", CR, files_dir / "gone.dcm"))
    headers = read_headers(instances)
    assert len(headers) == len(instances)
    decision = select(headers, CFG)
    check_decision(headers, decision)


# --- 2. the C-STORE handler over real associations -----------------------------------------


@dataclass(frozen=True)
class Sent:
    wire: Wire
    status: int | None  # None: no response
    comment: str


class Client:
    """One association, proposing every (storage class, syntax) pair as its own context,
    kept across examples and opened again if it ended."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="PROPERTIES")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        for sop_class in STORAGE:
            for syntax in SYNTAXES:
                self.ae.add_requested_context(sop_class, syntax)
        self.assoc: Any = None

    def store(self, path: Path) -> Dataset:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="PxsScore")
            assert self.assoc.is_established, "association refused"
        rsp: Dataset = self.assoc.send_c_store(path)
        return rsp

    @property
    def established(self) -> bool:
        return bool(self.assoc is not None and self.assoc.is_established)

    def close(self) -> None:
        if self.established:
            self.assoc.release()


def store_random_datasets(port: int, outgoing: Path) -> list[Sent]:
    """Runs on a thread (the gateway's loop indexes what arrives meanwhile)."""
    client = Client(port)
    sent: list[Sent] = []

    @NETWORK
    @given(wire=wires())
    def c_store(wire: Wire) -> None:
        path = outgoing / f"{len(sent)}.dcm"
        path.write_bytes(wire.file())
        rsp = client.store(path)
        path.unlink()
        status = int(rsp.Status) if "Status" in rsp else None
        sent.append(Sent(wire, status, str(rsp.get("ErrorComment", ""))))
        assert status is not None, "no response (or one without a Status)"
        note(f"status 0x{status:04X} {rsp.get('ErrorComment', '')!r}")
        assert status in DOCUMENTED or 0xB000 <= status <= 0xBFFF
        assert client.established, "the server aborted the association"
        if wire.expected is not None:
            assert status == wire.expected

    try:
        c_store()
    finally:
        client.close()
    return sent


def check_spool(sent: Sequence[Sent], rows: dict[str, tuple[str, str, str]],
                spool: Spool) -> set[str]:
    """Every instance answered Success is indexed and its spool file holds the bytes sent
    (after the Part-10 header the service writes); returns the studies they are in."""
    last: dict[str, Sent] = {}
    for s in sent:
        if s.status == SUCCESS:
            last[s.wire.sop_instance] = s
    studies = set()
    for sop_uid, s in last.items():
        assert sop_uid in rows, f"{sop_uid} answered Success but is not in the store"
        study_uid, path, sha256 = rows[sop_uid]
        if s.wire.expected == SUCCESS:
            assert study_uid == s.wire.study
        assert Path(path) == spool.path_for(study_uid, sop_uid)
        data = Path(path).read_bytes()
        assert data.endswith(s.wire.payload)
        assert hashlib.sha256(data).hexdigest() == sha256
        studies.add(study_uid)
    return studies


@pytest.mark.filterwarnings("ignore:::pydicom")
async def test_every_c_store_of_a_random_dataset_gets_a_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # send_c_store(path) streams the file's data set bytes as they are, and takes the
    # request's UIDs from its file meta: mismatches and garbage reach the handler.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    async with gateway(tmp_path) as (gw, _):
        sent = await asyncio.to_thread(store_random_datasets, gw.port, outgoing)
        statuses = {s.status for s in sent}
        assert {SUCCESS, CANNOT_UNDERSTAND, MISMATCH} <= statuses, "the examples reach every path"

        # Still healthy: a normal image is stored, scored, and the health check is ok.
        normal = ap_study(77, "PROPS")
        await send(gw, normal)
        doc = await result_of(gw, str(normal[0].StudyInstanceUID))
        assert doc["status"] == "SUCCEEDED", doc["errorMessage"]
        health = await gw.health()
        assert health["ok"], health

        async with gw.store.db.execute(
                "SELECT sop_instance_uid, study_instance_uid, path, sha256 FROM instances"
        ) as cur:
            rows = {r[0]: (r[1], r[2], r[3]) for r in await cur.fetchall()}
        holding = check_spool(sent, rows, gw.spool)

        # Every study that holds an instance is decided: a result document (SUCCEEDED,
        # SKIPPED or FAILED), never a study left unfinished.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            missing = [uid for uid in sorted(holding)
                       if not await gw.store.results(ResultFilter(study_uid=uid))]
            if not missing or loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
        states = {uid: row.state if (row := await gw.store.study(uid)) else None
                  for uid in missing}
        assert not missing, f"{len(missing)} of {len(holding)} studies have no result: {states}"


# --- regressions: the two bugs the properties found ---------------------------------------


def chest_file(path: Path, keyword: str, vr: str, value: bytes) -> StoredInstance:
    """A 16 x 16 AP chest CR that the default rules select, with one element replaced by
    ``value`` under ``vr`` (Explicit VR Little Endian lets a sender name any VR)."""
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = f"{ROOT}.6.1"
    ds.StudyInstanceUID = f"{ROOT}.6.2"
    ds.SeriesInstanceUID = f"{ROOT}.6.3"
    ds.PatientID = "P1"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "CHEST AP"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add(DataElement(0x7FE00010, "OW", np.arange(256, dtype=np.uint16).tobytes()))
    tag = tag_of(keyword)
    ds.pop(tag, None)
    syntax = ExplicitVRLittleEndian
    payload = encode_dataset(ds, {tag: raw_element(tag, vr, value, syntax)}, syntax)
    path.write_bytes(part10(CR, str(ds.SOPInstanceUID), syntax, payload))
    return StoredInstance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), CR, path)


@pytest.mark.filterwarnings("ignore:::pydicom")
@pytest.mark.parametrize("keyword", ["PatientID", "AcquisitionDateTime"])
def test_select_survives_a_header_element_pydicom_cannot_convert(
        tmp_path: Path, keyword: str) -> None:
    headers = read_headers([chest_file(tmp_path / "odd.dcm", keyword, "US", b"\x01\x02\x03")])
    check_decision(headers, select(headers, CFG))


@pytest.mark.filterwarnings("ignore:::pydicom")
@pytest.mark.parametrize(("keyword", "vr", "value"), [
    ("NumberOfFrames", "IS", b"abc "),
    ("SamplesPerPixel", "US", b"\x01"),
    ("PhotometricInterpretation", "US", b"\x01"),
    ("HighBit", "US", b"\x01"),
], ids=["NumberOfFrames-abc", "SamplesPerPixel-1-byte", "Photometric-1-byte", "HighBit-1-byte"])
def test_preprocess_refuses_an_unreadable_pixel_module_with_preprocess_error(
        tmp_path: Path, keyword: str, vr: str, value: bytes) -> None:
    inst = chest_file(tmp_path / "odd.dcm", keyword, vr, value)
    with pytest.raises(PreprocessError):
        preprocess_file(inst.path)
