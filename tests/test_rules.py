"""The default selection rules over synthetic headers, one test per trap the paper names, and
over the real samples in tests/data/dicom-samples; the dry run behind `pxsgate rules test`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pxsgate.config import Config, SelectionConfig, config_from_mapping
from pxsgate.records import StoredInstance
from pxsgate.rules import Header, could_be_selected, dry_run, select

from .conftest import SAMPLES

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
    ds.PatientID = "P1"
    for k, v in tags.items():
        setattr(ds, k, v)
    inst = StoredInstance(f"1.2.{n}", f"1.3.{n}", sop_class, Path(f"/spool/{n}.dcm"))
    return Header(inst, ds)


def test_ap_portable_is_selected_and_derived_primary_or_burned_in_is_fine() -> None:
    d = select([header(1, SeriesDescription="CHEST AP PORTABLE", ViewPosition="",
                       BurnedInAnnotation="YES")], CFG)
    assert d.candidate
    assert [(i.selected, i.rule) for i in d.images] == [(True, "ap-in-description")]
    assert "SeriesDescription 'CHEST AP PORTABLE' names AP" in d.images[0].reason
    assert d.flags == ()


def test_ap_token_needs_a_word_boundary() -> None:
    d = select([header(1, SeriesDescription="ap_supine"), header(2, SeriesDescription="CAPTURE",
                                                                  ViewPosition="PA")], CFG)
    assert [i.sop_instance_uid for i in d.inputs] == ["1.2.1"]


def test_view_position_used_when_description_names_no_view() -> None:
    d = select([header(1, SeriesDescription="PORTABLE", ViewPosition="AP")], CFG)
    assert [i.rule for i in d.inputs] == ["ap-view-position"]
    assert d.inputs[0].reason == "ViewPosition is 'AP'"


def test_description_view_wins_over_view_position() -> None:
    d = select([header(1, SeriesDescription="CHEST PA", ViewPosition="AP")], CFG)
    assert (d.candidate, d.rule) == (False, "no-model-input")
    assert d.images[0].rule == "other-view-in-description"
    ap = select([header(1, SeriesDescription="CHEST AP", ViewPosition="PA")], CFG)
    assert ap.candidate, "and the other way round"


def test_cath_copy_screenshot_and_for_processing_are_excluded() -> None:
    images = [
        header(1, SeriesDescription="CHEST AP"),
        header(2, SeriesDescription="CHEST AP", DerivationDescription="CATH enhanced"),
        header(3, SC, Modality="OT", SeriesDescription="CHEST AP",
               ImageType=["DERIVED", "SECONDARY"]),
        header(4, SeriesDescription="CHEST AP", ImageType=["DERIVED", "SECONDARY"]),
        header(5, SC, SeriesDescription="CHEST AP"),  # SC class with a CR modality
        header(6, DX_PROCESSING, Modality="DX", SeriesDescription="CHEST AP"),
        header(7, DX_PRESENTATION, Modality="DX", SeriesDescription="CHEST AP",
               PresentationIntentType="FOR PROCESSING"),
    ]
    d = select(images, CFG)
    assert d.candidate
    assert [i.sop_instance_uid for i in d.inputs] == ["1.2.1"]
    rules = {i.sop_instance_uid: i.rule for i in d.images if not i.selected}
    assert rules == {"1.2.2": "cath-copy", "1.2.3": "no-study-rule", "1.2.4": "screenshot",
                     "1.2.5": "screenshot", "1.2.6": "for-processing",
                     "1.2.7": "for-processing"}
    assert d.flags == ()


def test_study_level_reasons() -> None:
    knee = select([header(1, BodyPartExamined="KNEE", ViewPosition="AP")], CFG)
    assert (knee.candidate, knee.rule) == (False, "no-study-rule")
    assert "KNEE" in knee.reason
    ct = select([header(1, CT, Modality="CT")], CFG)
    assert (ct.candidate, ct.rule) == (False, "no-study-rule")
    assert "Modality 'CT' is not one of CR, DX" in ct.reason
    pa_lat = select([header(1, SeriesDescription="CHEST PA", ViewPosition="PA"),
                     header(2, SeriesDescription="CHEST LAT", ViewPosition="LL")], CFG)
    assert (pa_lat.candidate, pa_lat.rule) == (False, "no-model-input")
    assert "other-view-in-description x2" in pa_lat.reason


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
    assert (d.images[1].rule, d.images[1].reason) == ("unreadable",
                                                      "header unreadable: truncated")


def test_wrong_patient_image_is_excluded_and_flagged() -> None:
    d = select([header(1, SeriesDescription="CHEST AP", AcquisitionTime="080000"),
                header(2, SeriesDescription="CHEST AP", PatientID="OTHER"),
                header(3, SeriesDescription="CHEST PA")], CFG)
    assert [i.sop_instance_uid for i in d.inputs] == ["1.2.1"]
    assert d.images[1].rule == "wrong-patient"
    assert "OTHER" not in d.images[1].reason, "no PHI in reasons"
    assert d.flags == ("wrong-patient",)


def test_several_ap_images_are_all_scored_latest_first_and_flagged() -> None:
    two = select([header(1, SeriesDescription="CHEST AP", AcquisitionDate="20200401",
                         AcquisitionTime="101500"),
                  header(2, SeriesDescription="CHEST AP", AcquisitionDate="20200401",
                         AcquisitionTime="093000")], CFG)
    assert [i.sop_instance_uid for i in two.inputs] == ["1.2.1", "1.2.2"]
    assert two.flags == ("multiple-ap-images",)
    four = select([header(n, SeriesDescription="CHEST AP",
                          AcquisitionDateTime=f"2020040110{n:02d}00") for n in range(4)], CFG)
    assert four.inputs[0].sop_instance_uid == "1.2.3", "latest acquired is the headline"
    assert four.flags == ("many-ap-images", "multiple-ap-images")
    assert select([header(n, SeriesDescription="CHEST AP") for n in range(3)],
                  CFG).flags == ("multiple-ap-images",), "three is not many"


def test_the_paper_exam_code_rule_from_the_config_comment() -> None:
    """The example in config/pxsgate.yaml, uncommented, selects by a private tag."""
    text = (Path(__file__).parents[1] / "config" / "pxsgate.yaml").read_text()
    example = [line for line in text.splitlines() if "# - name: exam-code" in line
               or "#   accept:" in line or "#            one-of" in line]
    assert len(example) == 3, "the commented example is in the config"
    cfg = config_from_mapping({"selection": {"study-rules": [{
        "name": "exam-code",
        "accept": {"tag": "(0019,xx10)", "private-creator": "HOSPITAL EXAM CODES",
                   "one-of": ["XRCHEST1V", "XRCHESTPORT"]}}]}}).selection
    h = header(1, BodyPartExamined="", SeriesDescription="PORTABLE", ViewPosition="AP")
    assert h.dataset is not None
    h.dataset.add_new((0x0019, 0x0012), "LO", "HOSPITAL EXAM CODES")
    h.dataset.add_new((0x0019, 0x1210), "LO", "XRCHESTPORT")
    assert select([h], cfg).candidate
    assert not select([h], CFG).candidate, "the default needs a body part or chest word"


def test_shared_samples_pa_chests_and_ap_extremity_are_not_selected() -> None:
    run = dry_run(SAMPLES, Config().selection)
    by_file = {h.instance.path.name: d for headers, decision in run.studies.values()
               for h, d in zip(headers, decision.images, strict=True)}
    assert set(by_file) == {"966_fixed.dcm", "RG1_J2KI.dcm", "RG1_JLSN.dcm", "RG2_JPLL.dcm",
                            "RG2_JPLY_fixed.dcm", "RG3_J2KR.dcm"}
    assert not any(d.selected for d in by_file.values())
    assert by_file["966_fixed.dcm"].rule == "other-view-in-description"  # DX "pa"
    assert "ViewPosition 'PA'" in by_file["RG1_J2KI.dcm"].reason  # CR chest PA
    assert "EXTREMITY" in by_file["RG3_J2KR.dcm"].reason  # AP, but not a chest
    assert by_file["RG3_J2KR.dcm"].rule == "no-study-rule"
    assert run.summary()["non_dicom_files"] == 2  # README.md and the licence


def test_rules_test_command_prints_decisions_and_json(tmp_path: Path) -> None:
    from pxsgate.tools import synth

    feed = tmp_path / "feed"
    synth.write_feed(synth.hospital_feed(seed=3, rows=64, cols=64, prefix="RT"), feed)
    (feed / "notes.txt").write_text("not dicom")
    shutil.copy(SAMPLES / "RG3_J2KR.dcm", feed / "RG3_J2KR.dcm")
    out = subprocess.run([sys.executable, "-m", "pxsgate", "rules", "test", str(feed)],
                         capture_output=True, text=True, check=True).stdout
    for text in ("CANDIDATE", "skipped", "not DICOM:", "yield"):
        assert text in out
    js = json.loads(subprocess.run(
        [sys.executable, "-m", "pxsgate", "rules", "test", str(feed), "--json"],
        capture_output=True, text=True, check=True).stdout)
    direct = dry_run(feed, Config().selection)
    assert js["summary"] == direct.summary()
    assert {s["studyInstanceUid"] for s in js["studies"]} == set(direct.studies)
    assert all(i["rule"] and i["reason"] for s in js["studies"] for i in s["images"])


def test_a_study_left_with_no_instance_is_skipped_not_crashed() -> None:
    d = select([], CFG)
    assert (d.candidate, d.rule) == (False, "no-instances")


def test_dry_run_counts_a_copied_file_once_and_survives_corrupt_files(tmp_path: Path) -> None:
    h = header(1, SeriesDescription="CHEST AP")
    assert h.dataset is not None
    ds = h.dataset
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = "1.2.1", "1.3.1", "1.4.1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    (tmp_path / "copy").mkdir()
    ds.save_as(tmp_path / "copy" / "a.dcm", enforce_file_format=True)
    good = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[: len(good) - 7])
    (tmp_path / "garbage.dcm").write_bytes(good[:132] + b"\xff" * 64)
    run = dry_run(tmp_path, CFG)
    (_, decision), = run.studies.values()
    assert len(decision.inputs) == 1
    assert decision.flags == (), "one image, twice on disk: not multiple-ap-images"


def test_could_be_selected_is_judged_from_one_header_and_never_misses_a_selection() -> None:
    """Decode on arrival decodes what could_be_selected says: every instance select()
    chooses must be one (else an image would wait for its decode at ready time), and
    the images rules or study rules certainly exclude are not (else a decode is wasted).
    Wrong patient and the cap need the whole study: those are decoded and not used."""
    study = [
        header(1, SeriesDescription="CHEST AP", AcquisitionTime="080000"),
        header(2, SeriesDescription="CHEST AP", PatientID="OTHER"),  # wrong patient
        header(3, SeriesDescription="CHEST PA"),  # another view
        header(4, ViewPosition="AP"),  # AP by its view position
        header(5, SC, SeriesDescription="CHEST AP"),  # a screenshot
        header(6, SeriesDescription="CHEST AP", BodyPartExamined="KNEE"),  # study rules
        header(7, SeriesDescription="CHEST AP", DerivationDescription="CATH enhanced"),
    ]
    cfg = SelectionConfig(max_images_per_study=1)
    decision = select(study, cfg)
    chosen = {i.sop_instance_uid for i in decision.inputs}
    possible = {h.instance.sop_instance_uid for h in study
                if h.dataset is not None and could_be_selected(h.dataset, cfg)}
    assert chosen == {"1.2.4"}, "the cap leaves one of the two AP images"
    assert possible == {"1.2.1", "1.2.2", "1.2.4"}
    assert chosen <= possible
    for h in study:  # alone, as it arrives: the same answer
        assert h.dataset is not None
        alone = select([h], cfg)
        assert could_be_selected(h.dataset, cfg) == bool(alone.inputs)
