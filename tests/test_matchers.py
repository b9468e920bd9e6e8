"""The rule language: every test, the combinators, tag addressing (private tags by creator),
and configuration errors that name the key path."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ImplicitVRLittleEndian

from pxsgate.config import config_from_mapping
from pxsgate.errors import ConfigError
from pxsgate.matchers import first_match, parse_condition, parse_rules


def ds(**tags: Any) -> Dataset:
    d = Dataset()
    for k, v in tags.items():
        setattr(d, k, v)
    return d


def matches(condition: dict[str, Any], d: Dataset) -> bool:
    ok, why = parse_condition(condition, "c").evaluate(d)
    assert why, "every evaluation explains itself"
    return ok


def test_equals_and_one_of_ignore_case_and_compare_numbers() -> None:
    d = ds(Modality="CR", ViewPosition="AP ", InstanceNumber="7", ExposureTime="12",
           StudyDescription="xr chest")
    assert matches({"tag": "Modality", "equals": "cr"}, d)
    assert matches({"tag": "ViewPosition", "equals": "AP"}, d)
    assert matches({"tag": "StudyDescription", "equals": "XR Chest"}, d)
    assert not matches({"tag": "Modality", "equals": "DX"}, d)
    assert matches({"tag": "Modality", "one-of": ["DX", "CR"]}, d)
    assert not matches({"tag": "Modality", "one-of": ["DX", "CT"]}, d)
    assert matches({"tag": "InstanceNumber", "equals": 7}, d)
    assert matches({"tag": "ExposureTime", "equals": 12.0}, d)
    assert not matches({"tag": "Modality", "equals": "CR", "exists": False}, d)


def test_contains_token_respects_word_boundaries() -> None:
    for text in ("CHEST AP PORT", "ap_supine", "XR CHEST-AP"):
        assert matches({"tag": "SeriesDescription", "contains-token": "AP"},
                       ds(SeriesDescription=text)), text
    for text in ("CAPTURE", "APEX", "LAP"):
        assert not matches({"tag": "SeriesDescription", "contains-token": "AP"},
                           ds(SeriesDescription=text)), text
    # A list: any of its words; a phrase: its words in a row.
    assert matches({"tag": "SeriesDescription", "contains-token": ["PA", "LAT"]},
                   ds(SeriesDescription="chest lat"))
    assert matches({"tag": "StudyDescription", "contains-token": "1 view"},
                   ds(StudyDescription="XR CHEST 1 VIEW PORTABLE"))
    assert not matches({"tag": "StudyDescription", "contains-token": "1 view"},
                       ds(StudyDescription="XR CHEST VIEW 1"))


def test_regex_exists_missing_and_numbers() -> None:
    d = ds(SeriesDescription="CHEST AP PORTABLE", DerivationDescription="",
           KVP="110", ImageComments="abc")
    assert matches({"tag": "SeriesDescription", "regex": r"^CHEST\b"}, d)
    assert not matches({"tag": "SeriesDescription", "regex": r"^chest"}, d)
    assert matches({"tag": "SeriesDescription", "regex": r"(?i)^chest"}, d)
    assert matches({"tag": "SeriesDescription", "exists": True}, d)
    assert matches({"tag": "DerivationDescription", "missing": True}, d), "empty = missing"
    assert matches({"tag": "ViewPosition", "missing": True}, d), "absent = missing"
    assert matches({"tag": "ViewPosition", "exists": False}, d)
    assert matches({"tag": "KVP", "gt": 100, "le": 110}, d)
    assert not matches({"tag": "KVP", "lt": 100}, d)
    assert not matches({"tag": "KVP", "ge": 111}, d)
    assert not matches({"tag": "ImageComments", "gt": 0}, d), "not a number: no match"
    assert not matches({"tag": "ViewPosition", "equals": "AP"}, d), "absent: no match"


def test_multi_valued_tags_match_on_any_value() -> None:
    d = ds(ImageType=["DERIVED", "SECONDARY", "SCREEN"])
    assert matches({"tag": "ImageType", "equals": "SECONDARY"}, d)
    assert matches({"tag": "ImageType", "contains-token": "screen"}, d)
    assert not matches({"tag": "ImageType", "equals": "PRIMARY"}, d)


def test_all_any_not() -> None:
    d = ds(Modality="DX", BodyPartExamined="CHEST")
    dx_chest = {"all": [{"tag": "Modality", "equals": "DX"},
                        {"tag": "BodyPartExamined", "equals": "CHEST"}]}
    assert matches(dx_chest, d)
    assert not matches({"all": [{"tag": "Modality", "equals": "DX"},
                                {"tag": "BodyPartExamined", "equals": "KNEE"}]}, d)
    assert matches({"any": [{"tag": "Modality", "equals": "CR"},
                            {"tag": "Modality", "equals": "DX"}]}, d)
    assert not matches({"not": dx_chest}, d)
    assert matches({"not": {"tag": "Modality", "equals": "CT"}}, d)


def test_tags_by_number() -> None:
    d = ds(SeriesDescription="CHEST AP")
    for written in ("(0008,103E)", "(0008,103e)", "0008,103E"):
        assert matches({"tag": written, "contains-token": "AP"}, d), written


def _with_private(block_number: int, creator: str, value: str) -> Dataset:
    d = ds(Modality="CR")
    d.add_new((0x0019, 0x0010 + block_number - 0x10), "LO", creator)
    d.add_new((0x0019, (block_number << 8) | 0x10), "LO", value)
    return d


def test_private_tag_is_found_by_its_creator_whatever_the_block() -> None:
    rule = {"tag": "(0019,xx10)", "private-creator": "HOSPITAL EXAM", "equals": "XRCHEST1V"}
    for block in (0x10, 0x11, 0x2A):  # the modality picks the block; the rule does not care
        assert matches(rule, _with_private(block, "HOSPITAL EXAM", "XRCHEST1V")), hex(block)
    assert not matches(rule, _with_private(0x10, "OTHER VENDOR", "XRCHEST1V"))
    assert not matches(rule, ds(Modality="CR")), "no block: no match"
    # Written with a concrete block number, only the element offset counts.
    assert matches({**rule, "tag": "(0019,1110)"},
                   _with_private(0x10, "HOSPITAL EXAM", "XRCHEST1V"))


def test_private_tag_read_without_a_dictionary_from_an_implicit_vr_file() -> None:
    """Real files: a private element of an unknown creator arrives as VR UN bytes."""
    d = _with_private(0x10, "HOSPITAL EXAM", "XRCHEST1V")
    d.SOPInstanceUID = "1.2.3"
    d.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    buf = BytesIO()
    d.save_as(buf, implicit_vr=True, little_endian=True)
    read = dcmread(BytesIO(buf.getvalue()), force=True)
    read.file_meta = Dataset()
    read.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert matches({"tag": "(0019,xx10)", "private-creator": "HOSPITAL EXAM",
                    "one-of": ["XRCHEST1V", "XRCHESTPORT"]}, read)


def test_first_match_decides_and_explains_misses() -> None:
    rules = parse_rules([
        {"name": "cath", "exclude": {"tag": "DerivationDescription", "contains-token": "CATH"}},
        {"name": "ap", "select": {"tag": "ViewPosition", "equals": "AP"}, "reason": "AP film"},
    ], "r", ("select", "exclude"))
    rule, why = first_match(rules, ds(ViewPosition="AP", DerivationDescription="CATH"))
    assert rule is not None
    assert rule.name == "cath"
    assert "CATH" in why
    rule, why = first_match(rules, ds(ViewPosition="AP"))
    assert rule is not None
    assert (rule.name, rule.action) == ("ap", "select")
    assert why.startswith("AP film: ViewPosition")
    rule, why = first_match(rules, ds(ViewPosition="PA"))
    assert rule is None
    assert why == "ap: ViewPosition 'PA' is not AP"


@pytest.mark.parametrize(("rules", "path", "says"), [
    ([{"name": "x", "select": {"tag": "SeriesDescriptio", "equals": "AP"}}],
     "selection.image-rules[0].select.tag", "not a DICOM keyword"),
    ([{"name": "x", "select": {"tag": "Modality", "equal": "CR"}}],
     "selection.image-rules[0].select.equal", "unknown key"),
    ([{"name": "x", "select": {"tag": "Modality"}}],
     "selection.image-rules[0].select", "no test"),
    ([{"name": "x", "select": {"tag": "Modality", "regex": "(["}}],
     "selection.image-rules[0].select.regex", "regular expression"),
    ([{"name": "x", "select": {"any": [{"tag": "KVP", "gt": "high"}]}}],
     "selection.image-rules[0].select.any[0].gt", "must be a number"),
    ([{"name": "x", "accept": {"tag": "Modality", "equals": "CR"}}],
     "selection.image-rules[0].accept", "unknown key"),
    ([{"name": "x"}], "selection.image-rules[0]", "exactly one of select, exclude"),
    ([{"name": "x", "select": {"tag": "(0019,xx10)", "equals": "A"}}],
     "selection.image-rules[0].select.private-creator", "needs its private creator"),
    ([{"name": "x", "select": {"tag": "(0019,1010)", "equals": "A"}}],
     "selection.image-rules[0].select.private-creator", "private element"),
    ([{"name": "x", "select": {"all": [], "tag": "Modality"}}],
     "selection.image-rules[0].select", "stands alone"),
    ([{"name": "x", "select": {"tag": "Modality", "one-of": "CR"}}],
     "selection.image-rules[0].select.one-of", "takes a list"),
    ([{"name": "a", "select": {"tag": "Modality", "equals": "CR"}},
      {"name": "a", "exclude": {"tag": "Modality", "equals": "CT"}}],
     "selection.image-rules[1].name", "earlier rule"),
])
def test_rule_errors_name_the_key_path(rules: list[Any], path: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"selection": {"image-rules": rules}})
    assert err.value.path == path
    assert says in err.value.reason


def _explicit_le(*elements: tuple[int, int, str, bytes]) -> Dataset:
    raw = b"".join(struct.pack("<HH", g, e) + vr.encode() + struct.pack("<H", len(v)) + v
                   for g, e, vr, v in elements)
    return dcmread(BytesIO(raw), force=True)


def test_odd_headers_never_raise() -> None:
    """A US element of the wrong length makes pydicom raise BytesLengthException (not a
    ValueError) when it is read; a rule on it matches nothing, and a private block that
    holds such an element is still searched."""
    d = _explicit_le((0x0008, 0x0060, "CS", b"CR"), (0x0019, 0x0010, "LO", b"HOSPITAL EXAM "),
                     (0x0019, 0x1001, "US", b"\1\2\3"), (0x0019, 0x1010, "LO", b"XRCHEST1V "),
                     (0x0028, 0x0010, "US", b"\1\2\3"))
    with pytest.raises(Exception, match="length"):
        _ = d.Rows
    assert not matches({"tag": "Rows", "gt": 0}, d)
    assert matches({"tag": "Rows", "missing": True}, d)
    assert matches({"tag": "(0019,xx10)", "private-creator": "HOSPITAL EXAM",
                    "equals": "XRCHEST1V"}, d)


def test_sequences_exist_and_file_meta_is_addressable() -> None:
    d = ds(Modality="CR")
    item = Dataset()
    item.CodeValue = "RPID2503"
    d.ProcedureCodeSequence = [item]
    d.ReferencedImageSequence = []
    assert matches({"tag": "ProcedureCodeSequence", "exists": True}, d)
    assert matches({"tag": "ReferencedImageSequence", "missing": True}, d)
    d.file_meta = Dataset()
    d.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    assert matches({"tag": "TransferSyntaxUID", "equals": "1.2.840.10008.1.2.4.90"}, d)
