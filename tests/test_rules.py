"""The default selection rules over header tags, each decision with its rule and reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import Dataset

from pxsgate.config import SelectionConfig
from pxsgate.messages import StoredInstance
from pxsgate.rules import Header, select, tokens

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
CFG = SelectionConfig()


def header(n: int, sop_class: str = CR, **tags: Any) -> Header:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    for k, v in tags.items():
        setattr(ds, k, v)
    inst = StoredInstance(f"1.2.{n}", f"1.3.{n}", sop_class, Path(f"/spool/{n}.dcm"))
    return Header(inst, ds)


def test_tokens_respect_word_boundaries() -> None:
    assert "AP" in tokens("CHEST AP PORT")
    assert "AP" in tokens("ap_supine")
    assert "AP" not in tokens("CAPTURE")


def test_ap_portable_is_selected_and_derived_primary_is_fine() -> None:
    d = select([header(1, SeriesDescription="CHEST AP PORTABLE", ViewPosition="")], CFG)
    assert d.candidate
    assert [i.selected for i in d.images] == [True]
    assert "SeriesDescription names AP" in d.images[0].reason


def test_view_position_used_when_description_names_no_view() -> None:
    d = select([header(1, SeriesDescription="PORTABLE", ViewPosition="AP")], CFG)
    assert d.inputs
    assert "ViewPosition AP" in d.inputs[0].reason


def test_description_view_wins_over_view_position() -> None:
    d = select([header(1, SeriesDescription="CHEST PA", ViewPosition="AP")], CFG)
    assert not d.candidate
    assert d.rule == "view"
    assert "view PA" in d.images[0].reason


def test_cath_copy_screenshot_and_for_processing_are_excluded() -> None:
    images = [
        header(1, SeriesDescription="CHEST AP"),
        header(2, SeriesDescription="CHEST AP", DerivationDescription="CATH enhanced"),
        header(3, SC, Modality="OT", SeriesDescription="CHEST AP",
               ImageType=["DERIVED", "SECONDARY"]),
        header(4, SeriesDescription="CHEST AP", ImageType=["DERIVED", "SECONDARY"]),
        header(5, DX_PROCESSING, Modality="DX", SeriesDescription="CHEST AP"),
    ]
    d = select(images, CFG)
    assert d.candidate
    assert [i.sop_instance_uid for i in d.inputs] == ["1.2.1"]
    rules = {i.sop_instance_uid: i.rule for i in d.images if not i.selected}
    assert rules == {"1.2.2": "not-derived-copy", "1.2.3": "not-screenshot",
                     "1.2.4": "not-screenshot", "1.2.5": "for-presentation"}


def test_study_level_reasons() -> None:
    knee = select([header(1, BodyPartExamined="KNEE", ViewPosition="AP")], CFG)
    assert (knee.candidate, knee.rule) == (False, "body-part")
    assert "KNEE" in knee.reason
    ct = select([header(1, CT, Modality="CT")], CFG)
    assert (ct.candidate, ct.rule) == (False, "modality")
    assert "CT" in ct.reason
    pa_lat = select([header(1, SeriesDescription="CHEST PA", ViewPosition="PA"),
                     header(2, SeriesDescription="CHEST LAT", ViewPosition="LL")], CFG)
    assert (pa_lat.candidate, pa_lat.rule) == (False, "view")


def test_chest_words_when_body_part_is_empty() -> None:
    d = select([header(1, BodyPartExamined="", StudyDescription="XR CHEST 1 VIEW PORTABLE",
                       ViewPosition="AP")], CFG)
    assert d.candidate
    none = select([header(1, BodyPartExamined="", StudyDescription="XR 1 VIEW",
                          ViewPosition="AP")], CFG)
    assert not none.candidate


def test_unreadable_header_is_not_selected() -> None:
    good = header(1, SeriesDescription="CHEST AP")
    bad = Header(StoredInstance("1.2.9", "1.3.9", CR, Path("/x")), None, "truncated")
    d = select([good, bad], CFG)
    assert [i.sop_instance_uid for i in d.inputs] == ["1.2.1"]
    assert d.images[1].rule == "readable"
