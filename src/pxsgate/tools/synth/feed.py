"""The synthetic hospital feed: studies that exercise the selection rules, each with what
pxsgate is expected to do with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pxsgate.tools.synth.chest import chest_radiograph
from pxsgate.tools.synth.ct import ct_slice
from pxsgate.tools.synth.derived import catheter_enhance, screen_capture
from pxsgate.tools.synth.dicom import (
    CR_IMAGE_STORAGE,
    CT_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    add_minutes,
    make_image_dataset,
    make_study,
)
from pxsgate.tools.synth.knee import knee_radiograph


@dataclass(frozen=True)
class FeedStudy:
    """One study of the synthetic feed, with what pxsgate is expected to do with it."""

    key: str
    description: str
    expected: Literal["scored", "skipped"]
    expected_inputs: tuple[str, ...]
    datasets: tuple[Dataset, ...]
    expected_flags: tuple[str, ...] = ()


def hospital_feed(
    seed: int = 0, *, rows: int = 1024, cols: int = 1024, prefix: str = "PXSDEMO"
) -> list[FeedStudy]:
    """Seven studies that exercise the selection rules; deterministic in ``seed``.

    1. ``portable-ap-1``: CR AP portable chest (MONOCHROME2, 12-bit, severity 0.6) -> scored.
    2. ``portable-ap-cath``: DX AP chest, a CATH-enhanced copy (only DerivationDescription
       tells it apart) and a Secondary Capture screenshot -> scored, input = the original.
    3. ``portable-ap-3``: CR AP chest, MONOCHROME1, empty BodyPartExamined and empty
       SeriesDescription; only the study description says chest -> scored.
    4. ``pa-lateral``: CR PA + lateral chest -> skipped (no AP image).
    5. ``knee``: CR AP knee -> skipped (not a chest).
    6. ``ct-chest``: three CT slices of the chest -> skipped (not CR/DX).
    7. ``repeat-ap-wrong-patient``: two CR AP chests 40 minutes apart and an AP chest of
       another patient filed into the study -> scored, both AP images of the study's patient
       are input (the later is the headline), flagged multiple-ap-images and wrong-patient.
    """

    def rng(study: int, image: int) -> np.random.Generator:
        return np.random.default_rng([seed, study, image])

    chest_mm = 430.0 / max(rows, cols)
    feed: list[FeedStudy] = []

    # 1. portable AP chest, CR
    st = make_study(
        1,
        seed=seed,
        prefix=prefix,
        description="XR CHEST AP PORTABLE",
        study_date="20200403",
        study_time="071512",
        patient_sex="M",
    )
    px = chest_radiograph(rng(1, 0), rows=rows, cols=cols, view="AP", severity=0.6)
    ds = make_image_dataset(
        px,
        sop_class_uid=CR_IMAGE_STORAGE,
        modality="CR",
        study=st,
        series_description="CHEST AP PORTABLE",
        view_position="AP",
        body_part="CHEST",
        pixel_spacing_mm=chest_mm,
    )
    feed.append(
        FeedStudy(
            "portable-ap-1",
            "portable AP chest (CR), moderate opacities",
            "scored",
            (ds.SOPInstanceUID,),
            (ds,),
        )
    )

    # 2. DX AP chest + CATH-enhanced copy + screenshot
    st = make_study(
        2,
        seed=seed,
        prefix=prefix,
        description="XR CHEST PORTABLE",
        study_date="20200404",
        study_time="023045",
        patient_sex="F",
    )
    bits = 14
    px = chest_radiograph(
        rng(2, 0), rows=rows, cols=cols, view="AP", severity=0.35, bits_stored=bits, lines=True
    )
    orig = make_image_dataset(
        px,
        sop_class_uid=DX_FOR_PRESENTATION_STORAGE,
        modality="DX",
        study=st,
        series_description="CHEST AP PORTABLE",
        view_position="AP",
        body_part="CHEST",
        bits_stored=bits,
        series_number=1,
        pixel_spacing_mm=chest_mm,
    )
    # the CATH copy: same view, same series description, same ImageType; only the
    # DerivationDescription (and its own series) tells it apart
    cath = make_image_dataset(
        catheter_enhance(px, bits_stored=bits),
        sop_class_uid=DX_FOR_PRESENTATION_STORAGE,
        modality="DX",
        study=st,
        series_description="CHEST AP PORTABLE",
        view_position="AP",
        body_part="CHEST",
        derivation_description="CATH",
        bits_stored=bits,
        series_number=2,
        pixel_spacing_mm=chest_mm,
    )
    # the screenshot: Secondary Capture, ImageType DERIVED\SECONDARY, burned-in annotations
    shot = make_image_dataset(
        screen_capture(px, bits_stored=bits),
        sop_class_uid=SECONDARY_CAPTURE_STORAGE,
        modality="DX",
        study=st,
        series_description="CHEST AP PORTABLE SCREEN CAPTURE",
        view_position="AP",
        body_part="CHEST",
        image_type=("DERIVED", "SECONDARY"),
        bits_stored=bits,
        series_number=3,
        pixel_spacing_mm=chest_mm,
    )
    feed.append(
        FeedStudy(
            "portable-ap-cath",
            "portable AP chest (DX) with a CATH copy and a screenshot",
            "scored",
            (orig.SOPInstanceUID,),
            (orig, cath, shot),
        )
    )

    # 3. AP chest described only by the study description, MONOCHROME1
    st = make_study(
        3,
        seed=seed,
        prefix=prefix,
        description="XR CHEST 1 VIEW PORTABLE",
        study_date="20200405",
        study_time="134501",
        patient_sex="M",
    )
    px = chest_radiograph(rng(3, 0), rows=rows, cols=cols, view="AP", severity=0.15)
    ds = make_image_dataset(
        px,
        sop_class_uid=CR_IMAGE_STORAGE,
        modality="CR",
        study=st,
        series_description="",
        view_position="AP",
        body_part="",
        photometric="MONOCHROME1",
        pixel_spacing_mm=chest_mm,
    )
    feed.append(
        FeedStudy(
            "portable-ap-3",
            "AP chest (CR, MONOCHROME1), no body part, chest only in the study description",
            "scored",
            (ds.SOPInstanceUID,),
            (ds,),
        )
    )

    # 4. PA + lateral, no AP image
    st = make_study(
        4,
        seed=seed,
        prefix=prefix,
        description="XR CHEST 2 VIEWS PA AND LATERAL",
        study_date="20200406",
        study_time="101010",
        patient_sex="F",
    )
    pa = chest_radiograph(rng(4, 0), rows=rows, cols=cols, view="PA", bits_stored=10)
    lat = chest_radiograph(rng(4, 1), rows=rows, cols=cols, view="LATERAL", bits_stored=10)
    ds_pa = make_image_dataset(
        pa,
        sop_class_uid=CR_IMAGE_STORAGE,
        modality="CR",
        study=st,
        series_description="CHEST PA",
        view_position="PA",
        body_part="CHEST",
        bits_stored=10,
        photometric="MONOCHROME1",
        series_number=1,
        pixel_spacing_mm=chest_mm,
    )
    ds_lat = make_image_dataset(
        lat,
        sop_class_uid=CR_IMAGE_STORAGE,
        modality="CR",
        study=st,
        series_description="CHEST LAT",
        view_position="LL",
        body_part="CHEST",
        bits_stored=10,
        photometric="MONOCHROME1",
        series_number=2,
        pixel_spacing_mm=chest_mm,
        patient_orientation=("P", "F"),
    )
    feed.append(
        FeedStudy(
            "pa-lateral", "PA and lateral chest (CR): no AP image", "skipped", (), (ds_pa, ds_lat)
        )
    )

    # 5. knee
    st = make_study(
        5,
        seed=seed,
        prefix=prefix,
        description="XR KNEE RIGHT 1 VIEW",
        study_date="20200407",
        study_time="091500",
        patient_sex="M",
    )
    px = knee_radiograph(rng(5, 0), rows=rows, cols=cols)
    ds = make_image_dataset(
        px,
        sop_class_uid=CR_IMAGE_STORAGE,
        modality="CR",
        study=st,
        series_description="KNEE AP",
        view_position="AP",
        body_part="KNEE",
        laterality="R",
        pixel_spacing_mm=240.0 / max(rows, cols),
    )
    feed.append(
        FeedStudy("knee", "AP knee (CR): an AP view, but not a chest", "skipped", (), (ds,))
    )

    # 6. CT chest
    st = make_study(
        6,
        seed=seed,
        prefix=prefix,
        description="CT CHEST WITHOUT CONTRAST",
        study_date="20200408",
        study_time="160000",
        patient_sex="F",
    )
    slices = []
    for i, level in enumerate((0.45, 0.6, 0.75)):
        px_ct = ct_slice(rng(6, 0), level=level, noise_rng=rng(6, i + 1))
        slices.append(
            make_image_dataset(
                px_ct,
                sop_class_uid=CT_IMAGE_STORAGE,
                modality="CT",
                study=st,
                series_description="CHEST 5MM",
                body_part="CHEST",
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                instance_number=i + 1,
                pixel_spacing_mm=0.7,
                slice_location_mm=-100.0 - 5.0 * i,
            )
        )
    feed.append(
        FeedStudy(
            "ct-chest", "chest CT, three axial slices: not CR/DX", "skipped", (), tuple(slices)
        )
    )

    # 7. a repeated AP chest, and another patient's film filed into the study
    st = make_study(7, seed=seed, prefix=prefix, description="XR CHEST PORTABLE",
                    study_date="20200409", study_time="061500", patient_sex="M")
    other = make_study(8, seed=seed, prefix=prefix, patient_sex="F")
    films = []
    for i, (severity, minutes, patient) in enumerate(((0.5, 0, st), (0.55, 40, st),
                                                      (0.2, 20, other))):
        px = chest_radiograph(rng(7, i), rows=rows, cols=cols, view="AP", severity=severity)
        ds = make_image_dataset(
            px, sop_class_uid=CR_IMAGE_STORAGE, modality="CR", study=st,
            series_description="CHEST AP PORTABLE", view_position="AP", body_part="CHEST",
            series_number=i + 1, pixel_spacing_mm=chest_mm,
            acquisition_time=add_minutes("061500", minutes))
        ds.PatientID = patient.patient_id
        ds.PatientName = patient.patient_name
        films.append(ds)
    feed.append(
        FeedStudy(
            "repeat-ap-wrong-patient",
            "two AP chests 40 min apart (the later is the headline) and another patient's "
            "film in the study",
            "scored",
            (films[1].SOPInstanceUID, films[0].SOPInstanceUID),
            tuple(films),
            ("multiple-ap-images", "wrong-patient"),
        )
    )
    return feed


def write_feed(feed: Sequence[FeedStudy], directory: Path) -> list[Path]:
    """Write one DICOM Part 10 file per dataset under ``directory``; return the paths.

    Names are ``NN-<key>-sSSS-iIII.dcm`` so that a directory listing is in feed order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for n, study in enumerate(feed, start=1):
        for ds in study.datasets:
            series, instance = int(ds.SeriesNumber), int(ds.InstanceNumber)
            path = directory / f"{n:02d}-{study.key}-s{series:03d}-i{instance:03d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
    return paths
