"""The synthetic hospital feed: studies that exercise the selection rules, each with what
pxsgate is expected to do with it.

The feed is a table (:data:`FEED`): one :class:`_Study` row per study, one :class:`_Film` per
image, each saying what is drawn and what its dataset says. :func:`hospital_feed` turns the
rows into DICOM datasets for a seed, an image size and a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pxsgate.tools.synth.chest import View, chest_radiograph
from pxsgate.tools.synth.ct import ct_slice
from pxsgate.tools.synth.derived import catheter_enhance, screen_capture
from pxsgate.tools.synth.dicom import (
    CR_IMAGE_STORAGE,
    CT_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    StudyInfo,
    add_minutes,
    make_image_dataset,
    make_study,
)
from pxsgate.tools.synth.draw import I16, U16
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


# --------------------------------------------------------------------------------------------
# What is drawn
# --------------------------------------------------------------------------------------------


@dataclass
class _StudyImages:
    """The images of one study: its generator ``image`` is ``default_rng([seed, study,
    image])``; a chest is drawn once however many copies are made of it."""

    seed: int
    study: int
    rows: int
    cols: int
    chests: dict[_Chest, U16] = field(default_factory=dict)

    def rng(self, image: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.study, image])


@dataclass(frozen=True)
class _Chest:
    view: View = "AP"
    severity: float = 0.0
    bits: int = 12
    lines: bool = False
    image: int = 0

    def draw(self, images: _StudyImages) -> U16:
        if self not in images.chests:
            images.chests[self] = chest_radiograph(
                images.rng(self.image), rows=images.rows, cols=images.cols, view=self.view,
                severity=self.severity, bits_stored=self.bits, lines=self.lines)
        return images.chests[self]

    def spacing_mm(self, images: _StudyImages) -> float:
        return 430.0 / max(images.rows, images.cols)  # a 43 cm detector


class _Make(Protocol):
    def __call__(self, pixels: U16, *, bits_stored: int) -> U16: ...


@dataclass(frozen=True)
class _Copy:
    """A copy made from a chest film: CATH-enhanced, or a viewer's screenshot."""

    of: _Chest
    make: _Make

    @property
    def bits(self) -> int:
        return self.of.bits

    def draw(self, images: _StudyImages) -> U16:
        return self.make(self.of.draw(images), bits_stored=self.of.bits)

    def spacing_mm(self, images: _StudyImages) -> float:
        return self.of.spacing_mm(images)


@dataclass(frozen=True)
class _Knee:
    bits: int = 12

    def draw(self, images: _StudyImages) -> U16:
        return knee_radiograph(images.rng(0), rows=images.rows, cols=images.cols)

    def spacing_mm(self, images: _StudyImages) -> float:
        return 240.0 / max(images.rows, images.cols)


@dataclass(frozen=True)
class _CtSlice:
    """A 512x512 slice at ``level`` of the study's patient (generator 0), with its own noise
    (generator ``noise``)."""

    level: float
    noise: int
    bits: int = 12

    def draw(self, images: _StudyImages) -> I16:
        return ct_slice(images.rng(0), level=self.level, noise_rng=images.rng(self.noise))

    def spacing_mm(self, images: _StudyImages) -> float:
        return 0.7


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Film:
    """One image of a study: what is drawn, and what its dataset says (by default a CR AP
    portable chest)."""

    drawing: _Chest | _Copy | _Knee | _CtSlice
    sop_class_uid: str = CR_IMAGE_STORAGE
    modality: str = "CR"
    series_description: str = "CHEST AP PORTABLE"
    view_position: str = "AP"
    body_part: str = "CHEST"
    image_type: tuple[str, ...] = ("DERIVED", "PRIMARY")
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2"
    derivation_description: str | None = None
    series_number: int = 1
    instance_number: int = 1
    laterality: str = ""
    patient_orientation: tuple[str, ...] = ("L", "F")
    slice_location_mm: float | None = None
    minutes: int | None = None  # acquired this long after the study time (else: the series)
    patient: int | None = None  # the number of another patient, whose film this is

    def dataset(self, images: _StudyImages, study: StudyInfo, other: StudyInfo | None) -> Dataset:
        acquired = None if self.minutes is None else add_minutes(study.study_time, self.minutes)
        extra = None if other is None else {"PatientID": other.patient_id,
                                            "PatientName": other.patient_name}
        return make_image_dataset(
            self.drawing.draw(images), sop_class_uid=self.sop_class_uid,
            modality=self.modality, study=study, series_description=self.series_description,
            view_position=self.view_position, body_part=self.body_part,
            image_type=self.image_type, photometric=self.photometric,
            derivation_description=self.derivation_description, bits_stored=self.drawing.bits,
            series_number=self.series_number, instance_number=self.instance_number,
            pixel_spacing_mm=self.drawing.spacing_mm(images), acquisition_time=acquired,
            laterality=self.laterality, patient_orientation=self.patient_orientation,
            slice_location_mm=self.slice_location_mm, extra=extra)


@dataclass(frozen=True)
class _Study:
    """One study of the feed: number n in the table is patient n and study n."""

    key: str
    description: str
    expected: Literal["scored", "skipped"]
    study_description: str
    date: str
    time: str
    sex: str
    films: tuple[_Film, ...]
    inputs: tuple[int, ...] = ()  # the films that are the model input, the headline first
    flags: tuple[str, ...] = ()


_DX_CHEST: Final = _Chest("AP", severity=0.35, bits=14, lines=True)

FEED: Final = (
    _Study("portable-ap-1", "portable AP chest (CR), moderate opacities", "scored",
           "XR CHEST AP PORTABLE", "20200403", "071512", "M",
           (_Film(_Chest("AP", severity=0.6)),), inputs=(0,)),
    _Study("portable-ap-cath", "portable AP chest (DX) with a CATH copy and a screenshot",
           "scored", "XR CHEST PORTABLE", "20200404", "023045", "F",
           (_Film(_DX_CHEST, DX_FOR_PRESENTATION_STORAGE, "DX"),
            # the CATH copy: same view, same series description, same ImageType; only the
            # DerivationDescription (and its own series) tells it apart
            _Film(_Copy(_DX_CHEST, catheter_enhance), DX_FOR_PRESENTATION_STORAGE, "DX",
                  derivation_description="CATH", series_number=2),
            # the screenshot: Secondary Capture, ImageType DERIVED\SECONDARY, burned-in text
            _Film(_Copy(_DX_CHEST, screen_capture), SECONDARY_CAPTURE_STORAGE, "DX",
                  "CHEST AP PORTABLE SCREEN CAPTURE", image_type=("DERIVED", "SECONDARY"),
                  series_number=3)),
           inputs=(0,)),
    _Study("portable-ap-3",
           "AP chest (CR, MONOCHROME1), no body part, chest only in the study description",
           "scored", "XR CHEST 1 VIEW PORTABLE", "20200405", "134501", "M",
           (_Film(_Chest("AP", severity=0.15), series_description="", body_part="",
                  photometric="MONOCHROME1"),),
           inputs=(0,)),
    _Study("pa-lateral", "PA and lateral chest (CR): no AP image", "skipped",
           "XR CHEST 2 VIEWS PA AND LATERAL", "20200406", "101010", "F",
           (_Film(_Chest("PA", bits=10), series_description="CHEST PA", view_position="PA",
                  photometric="MONOCHROME1"),
            _Film(_Chest("LATERAL", bits=10, image=1), series_description="CHEST LAT",
                  view_position="LL", photometric="MONOCHROME1", series_number=2,
                  patient_orientation=("P", "F")))),
    _Study("knee", "AP knee (CR): an AP view, but not a chest", "skipped",
           "XR KNEE RIGHT 1 VIEW", "20200407", "091500", "M",
           (_Film(_Knee(), series_description="KNEE AP", body_part="KNEE", laterality="R"),)),
    _Study("ct-chest", "chest CT, three axial slices: not CR/DX", "skipped",
           "CT CHEST WITHOUT CONTRAST", "20200408", "160000", "F",
           tuple(_Film(_CtSlice(level, noise=i + 1), CT_IMAGE_STORAGE, "CT", "CHEST 5MM",
                       view_position="", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                       instance_number=i + 1, slice_location_mm=-100.0 - 5.0 * i)
                 for i, level in enumerate((0.45, 0.6, 0.75)))),
    _Study("repeat-ap-wrong-patient",
           "two AP chests 40 min apart (the later is the headline) and another patient's "
           "film in the study",
           "scored", "XR CHEST PORTABLE", "20200409", "061500", "M",
           (_Film(_Chest("AP", severity=0.5, image=0), series_number=1, minutes=0),
            _Film(_Chest("AP", severity=0.55, image=1), series_number=2, minutes=40),
            _Film(_Chest("AP", severity=0.2, image=2), series_number=3, minutes=20,
                  patient=8)),
           inputs=(1, 0), flags=("multiple-ap-images", "wrong-patient")),
)


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
    feed: list[FeedStudy] = []
    for number, row in enumerate(FEED, start=1):
        study = make_study(number, seed=seed, prefix=prefix, description=row.study_description,
                           study_date=row.date, study_time=row.time, patient_sex=row.sex)
        images = _StudyImages(seed, number, rows, cols)
        datasets = tuple(
            film.dataset(images, study, None if film.patient is None else
                         make_study(film.patient, seed=seed, prefix=prefix))
            for film in row.films)
        feed.append(FeedStudy(row.key, row.description, row.expected,
                              tuple(datasets[i].SOPInstanceUID for i in row.inputs),
                              datasets, row.flags))
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
