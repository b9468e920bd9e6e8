"""Tests of the synthetic hospital feed (pxsgate.tools.synth)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pxsgate.tools import synth

from .conftest import dcmtk

ROWS = COLS = 256


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def box(img: npt.NDArray[Any], r0: float, r1: float, c0: float, c1: float) -> float:
    """Mean over a box given in fractions of the image height and width."""
    rows, cols = img.shape
    region = img[int(r0 * rows) : int(r1 * rows), int(c0 * cols) : int(c1 * cols)]
    return float(region.astype(np.float64).mean())


def lungs(img: npt.NDArray[Any]) -> float:
    return (box(img, 0.40, 0.55, 0.20, 0.32) + box(img, 0.40, 0.55, 0.68, 0.80)) / 2


@pytest.fixture(scope="module")
def feed() -> list[synth.FeedStudy]:
    return synth.hospital_feed(0, rows=128, cols=128)


@pytest.fixture(scope="module")
def feed_by_key(feed: list[synth.FeedStudy]) -> dict[str, synth.FeedStudy]:
    return {study.key: study for study in feed}


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["AP", "PA", "LATERAL"])
def test_chest_is_deterministic(view: synth.View) -> None:
    a = synth.chest_radiograph(rng(7), rows=ROWS, cols=COLS, view=view)
    b = synth.chest_radiograph(rng(7), rows=ROWS, cols=COLS, view=view)
    c = synth.chest_radiograph(rng(8), rows=ROWS, cols=COLS, view=view)
    assert a.dtype == np.uint16
    assert a.shape == (ROWS, COLS)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_knee_and_ct_are_deterministic() -> None:
    assert np.array_equal(
        synth.knee_radiograph(rng(1), rows=128, cols=128),
        synth.knee_radiograph(rng(1), rows=128, cols=128),
    )
    assert not np.array_equal(
        synth.knee_radiograph(rng(1), rows=128, cols=128),
        synth.knee_radiograph(rng(2), rows=128, cols=128),
    )
    assert np.array_equal(synth.ct_slice(rng(1), size=128), synth.ct_slice(rng(1), size=128))
    assert not np.array_equal(synth.ct_slice(rng(1), size=128), synth.ct_slice(rng(2), size=128))


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_values_within_bits_stored(bits: int) -> None:
    maxv = (1 << bits) - 1
    images = [
        synth.chest_radiograph(rng(), rows=128, cols=96, view="AP", severity=1.0, bits_stored=bits),
        synth.chest_radiograph(rng(), rows=96, cols=128, view="LATERAL", bits_stored=bits),
        synth.chest_radiograph(rng(), rows=128, cols=128, catheter_enhanced=True, bits_stored=bits),
        synth.knee_radiograph(rng(), rows=128, cols=128, bits_stored=bits),
    ]
    for img in images:
        assert img.dtype == np.uint16
        assert int(img.max()) <= maxv
        # a real dynamic range: dark air outside the body, bright bone and labels
        assert int(img.min()) < 0.15 * maxv
        assert int(img.max()) > 0.8 * maxv
    screenshot = synth.screen_capture(images[0], bits_stored=bits)
    assert screenshot.dtype == np.uint16
    assert int(screenshot.max()) <= maxv


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="bits_stored"):
        synth.chest_radiograph(rng(), rows=64, cols=64, bits_stored=17)
    with pytest.raises(ValueError, match="severity"):
        synth.chest_radiograph(rng(), rows=64, cols=64, severity=1.5)
    with pytest.raises(ValueError, match="view"):
        synth.chest_radiograph(rng(), rows=64, cols=64, view="OBLIQUE")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        synth.chest_radiograph(rng(), rows=8, cols=64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("view", ["AP", "PA"])
def test_frontal_chest_anatomy(seed: int, view: synth.View) -> None:
    img = synth.chest_radiograph(rng(seed), rows=ROWS, cols=COLS, view=view, marker=False)
    lung = lungs(img)
    heart = box(img, 0.58, 0.66, 0.46, 0.56)  # heart shadow and spine
    # upper mediastinum: the brightest column of the midline band above the heart
    band = img[int(0.22 * ROWS) : int(0.32 * ROWS), int(0.4 * COLS) : int(0.6 * COLS)]
    upper_mediastinum = float(band.astype(np.float64).mean(axis=0).max())
    abdomen = box(img, 0.85, 0.95, 0.25, 0.40)  # soft tissue below the diaphragm
    outside = (box(img, 0.0, 0.05, 0.0, 0.05) + box(img, 0.0, 0.05, 0.95, 1.0)) / 2
    assert lung < 0.75 * heart
    assert lung < 0.75 * upper_mediastinum
    assert lung < 0.75 * abdomen
    assert outside < lung  # air outside the patient is the darkest
    # left and right lungs are both there
    assert box(img, 0.40, 0.55, 0.20, 0.32) < 0.8 * abdomen
    assert box(img, 0.40, 0.55, 0.68, 0.80) < 0.8 * abdomen


def test_lateral_looks_different() -> None:
    ap = synth.chest_radiograph(rng(3), rows=ROWS, cols=COLS, view="AP", marker=False)
    lat = synth.chest_radiograph(rng(3), rows=ROWS, cols=COLS, view="LATERAL", marker=False)
    # the midline of a frontal film is mediastinum and spine; of a lateral film, lung
    assert box(lat, 0.35, 0.5, 0.45, 0.55) < box(ap, 0.35, 0.5, 0.45, 0.55)
    # one lung field in the middle, soft tissue below the diaphragm
    assert box(lat, 0.35, 0.5, 0.45, 0.6) < 0.8 * box(lat, 0.85, 0.95, 0.3, 0.6)


def test_severity_raises_lung_density() -> None:
    means = [
        lungs(synth.chest_radiograph(rng(11), rows=ROWS, cols=COLS, severity=s, marker=False))
        for s in (0.0, 0.3, 0.6, 1.0)
    ]
    assert means == sorted(means)
    assert means[-1] > 1.25 * means[0]
    # the rest of the patient does not change with severity
    normal = synth.chest_radiograph(rng(11), rows=ROWS, cols=COLS, severity=0.0, marker=False)
    sick = synth.chest_radiograph(rng(11), rows=ROWS, cols=COLS, severity=1.0, marker=False)
    assert abs(box(sick, 0.85, 0.95, 0.25, 0.4) - box(normal, 0.85, 0.95, 0.25, 0.4)) < 20


def test_catheter_enhanced_copy_accentuates_lines() -> None:
    plain = synth.chest_radiograph(rng(5), rows=ROWS, cols=COLS, lines=True)
    cath = synth.chest_radiograph(rng(5), rows=ROWS, cols=COLS, catheter_enhanced=True)
    assert np.array_equal(synth.catheter_enhance(plain), cath)

    def detail(img: npt.NDArray[np.uint16]) -> float:
        f = img.astype(np.float64)
        lap = 4 * f[1:-1, 1:-1] - f[:-2, 1:-1] - f[2:, 1:-1] - f[1:-1, :-2] - f[1:-1, 2:]
        return float(np.abs(lap).mean())

    assert detail(cath) > 1.5 * detail(plain)
    # same patient: strongly correlated with the original
    assert np.corrcoef(plain.ravel(), cath.ravel())[0, 1] > 0.9


def test_ct_slice_hounsfield_units() -> None:
    ct = synth.ct_slice(rng(2), size=256)
    assert ct.dtype == np.int16
    assert ct.shape == (256, 256)
    hu = ct.astype(np.float64) - 1024
    assert ct[0, 0] == 0  # outside the reconstruction circle
    assert -1050 < hu[128, 20] < -900  # air inside the field of view
    lung = hu[110:140, 50:80].mean()
    assert -950 < lung < -700
    spine = hu[170:180, 124:132].mean()  # vertebral body
    assert spine > 150
    assert 0 < hu[100:110, 125:135].mean() < 100  # mediastinum
    assert int(ct.max()) < 4096


def test_normal_chest_anchors() -> None:
    anchors = synth.normal_chest_anchors(3, 4, rows=128, cols=128)
    assert len(anchors) == 4
    assert all(a.shape == (128, 128) and a.dtype == np.uint16 for a in anchors)
    again = synth.normal_chest_anchors(3, 2, rows=128, cols=128)
    assert all(np.array_equal(a, b) for a, b in zip(anchors, again, strict=False))
    assert not np.array_equal(anchors[0], anchors[1])
    assert not np.array_equal(anchors[0], synth.normal_chest_anchors(4, 1, rows=128, cols=128)[0])
    for a in anchors:
        assert lungs(a) < 0.75 * box(a, 0.85, 0.95, 0.25, 0.40)


def test_1024_chest_is_fast() -> None:
    synth.chest_radiograph(rng(), rows=128, cols=128)
    start = time.perf_counter()
    synth.chest_radiograph(rng(), rows=1024, cols=1024)
    # typically ~0.2 s on one slow core; generous so that a loaded CI box does not flake
    assert time.perf_counter() - start < 2.0


def test_large_12_bit_film() -> None:
    img = synth.chest_radiograph(rng(), rows=3000, cols=2500, bits_stored=12)
    assert img.shape == (3000, 2500)
    assert int(img.max()) <= 4095
    assert lungs(img) < 0.75 * box(img, 0.85, 0.95, 0.25, 0.40)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------


def test_feed_studies(feed_by_key: dict[str, synth.FeedStudy], feed: list[synth.FeedStudy]) -> None:
    assert [s.key for s in feed] == [
        "portable-ap-1",
        "portable-ap-cath",
        "portable-ap-3",
        "pa-lateral",
        "knee",
        "ct-chest",
        "repeat-ap-wrong-patient",
    ]
    expected = {s.key: s.expected for s in feed}
    assert expected == {
        "portable-ap-1": "scored",
        "portable-ap-cath": "scored",
        "portable-ap-3": "scored",
        "pa-lateral": "skipped",
        "knee": "skipped",
        "ct-chest": "skipped",
        "repeat-ap-wrong-patient": "scored",
    }
    wrong = feed_by_key["repeat-ap-wrong-patient"].datasets[2]
    assert wrong.PatientID == "PXSDEMO-008", "another patient's film filed into study 7"
    for n, study in enumerate(feed, start=1):
        assert study.description
        uids = [ds.SOPInstanceUID for ds in study.datasets]
        assert set(study.expected_inputs) <= set(uids)
        assert bool(study.expected_inputs) == (study.expected == "scored")
        assert {ds.StudyInstanceUID for ds in study.datasets} == {
            study.datasets[0].StudyInstanceUID
        }
        for ds in study.datasets:
            if ds is wrong:
                continue
            assert ds.PatientID == f"PXSDEMO-{n:03d}"
            assert str(ds.PatientName).startswith("DEMO^")
            assert 0 < len(ds.AccessionNumber) <= 16
            assert ds.Manufacturer == "pxsgate synthetic"
            assert ds.InstitutionName == "Demo Hospital"
            assert ds.BitsAllocated == 16
            assert ds.HighBit == ds.BitsStored - 1
            assert ds.SamplesPerPixel == 1
            assert (ds.Rows, ds.Columns) == ds.pixel_array.shape
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            for keyword in (
                "AcquisitionDate",
                "AcquisitionTime",
                "ContentDate",
                "ContentTime",
                "StudyDate",
                "StudyTime",
                "SeriesNumber",
                "InstanceNumber",
                "PixelSpacing",
            ):
                assert keyword in ds, keyword

    all_uids = [
        uid
        for s in feed
        for ds in s.datasets
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)
    ]
    assert all(UID(u).is_valid for u in all_uids)
    assert len({ds.SOPInstanceUID for s in feed for ds in s.datasets}) == 14
    assert len({s.datasets[0].StudyInstanceUID for s in feed}) == 7


def test_feed_study_tags(feed_by_key: dict[str, synth.FeedStudy]) -> None:
    (ap1,) = feed_by_key["portable-ap-1"].datasets
    assert ap1.SOPClassUID == synth.CR_IMAGE_STORAGE
    assert (ap1.Modality, ap1.ViewPosition, ap1.BodyPartExamined) == ("CR", "AP", "CHEST")
    assert ap1.SeriesDescription == "CHEST AP PORTABLE"
    assert list(ap1.ImageType) == ["DERIVED", "PRIMARY"]
    assert "ImagerPixelSpacing" in ap1
    assert feed_by_key["portable-ap-1"].expected_inputs == (ap1.SOPInstanceUID,)

    orig, cath, shot = feed_by_key["portable-ap-cath"].datasets
    assert orig.SOPClassUID == synth.DX_FOR_PRESENTATION_STORAGE
    assert orig.PresentationIntentType == "FOR PRESENTATION"
    assert (orig.Modality, orig.ViewPosition) == ("DX", "AP")
    assert "DerivationDescription" not in orig
    assert cath.SOPClassUID == orig.SOPClassUID
    assert cath.DerivationDescription == "CATH"
    assert list(cath.ImageType) == list(orig.ImageType) == ["DERIVED", "PRIMARY"]
    assert cath.SeriesInstanceUID != orig.SeriesInstanceUID
    assert shot.SOPClassUID == synth.SECONDARY_CAPTURE_STORAGE
    assert "SECONDARY" in shot.ImageType
    assert (shot.BurnedInAnnotation, orig.BurnedInAnnotation) == ("YES", "NO")
    assert len({orig.SeriesInstanceUID, cath.SeriesInstanceUID, shot.SeriesInstanceUID}) == 3
    assert feed_by_key["portable-ap-cath"].expected_inputs == (orig.SOPInstanceUID,)

    (ap3,) = feed_by_key["portable-ap-3"].datasets
    assert (ap3.BodyPartExamined, ap3.SeriesDescription) == ("", "")
    assert ap3.StudyDescription == "XR CHEST 1 VIEW PORTABLE"
    assert ap3.ViewPosition == "AP"
    assert ap3.PhotometricInterpretation == "MONOCHROME1"

    pa, lat = feed_by_key["pa-lateral"].datasets
    assert (pa.ViewPosition, pa.SeriesDescription) == ("PA", "CHEST PA")
    assert (lat.ViewPosition, lat.SeriesDescription) == ("LL", "CHEST LAT")

    (knee,) = feed_by_key["knee"].datasets
    assert (knee.BodyPartExamined, knee.ViewPosition, knee.SeriesDescription) == (
        "KNEE",
        "AP",
        "KNEE AP",
    )
    assert "CHEST" not in knee.StudyDescription

    ct = feed_by_key["ct-chest"].datasets
    assert len(ct) == 3
    for i, ds in enumerate(ct, start=1):
        assert ds.SOPClassUID == synth.CT_IMAGE_STORAGE
        assert (ds.Modality, ds.BodyPartExamined) == ("CT", "CHEST")
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert ds.PixelRepresentation == 1
        assert float(ds.RescaleIntercept) == -1024
        assert ds.InstanceNumber == i
        assert ds.pixel_array.dtype == np.int16


def test_at_least_one_cr_study_is_monochrome1(feed: list[synth.FeedStudy]) -> None:
    photometric = {(ds.Modality, ds.PhotometricInterpretation) for s in feed for ds in s.datasets}
    assert ("CR", "MONOCHROME1") in photometric
    assert ("CR", "MONOCHROME2") in photometric


def test_monochrome1_is_stored_inverted() -> None:
    px = synth.chest_radiograph(rng(4), rows=128, cols=128, bits_stored=12)
    study = synth.make_study(1)
    kwargs: dict[str, Any] = dict(
        sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=study, view_position="AP"
    )
    m1 = synth.make_image_dataset(px, photometric="MONOCHROME1", **kwargs)
    m2 = synth.make_image_dataset(px, photometric="MONOCHROME2", **kwargs)
    assert np.array_equal(m2.pixel_array, px)
    assert np.array_equal(m1.pixel_array, 4095 - px)
    # in the stored MONOCHROME1 values the lungs (air) are the high values
    assert lungs(m1.pixel_array) > box(m1.pixel_array, 0.85, 0.95, 0.25, 0.40)


def test_monochrome1_in_feed_is_inverted(feed_by_key: dict[str, synth.FeedStudy]) -> None:
    (ds,) = feed_by_key["portable-ap-3"].datasets
    stored = ds.pixel_array
    shown = (1 << ds.BitsStored) - 1 - stored.astype(np.int64)
    assert lungs(shown) < 0.75 * box(shown, 0.85, 0.95, 0.25, 0.40)


def test_make_image_dataset_signed_ct_and_extra() -> None:
    ct = synth.ct_slice(rng(), size=64)
    ds = synth.make_image_dataset(
        ct,
        sop_class_uid=synth.CT_IMAGE_STORAGE,
        modality="CT",
        study=synth.make_study(9, prefix="T"),
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_location_mm=-12.5,
        extra={"ProtocolName": "TEST"},
    )
    assert (ds.PixelRepresentation, ds.BitsStored) == (1, 16)
    assert np.array_equal(ds.pixel_array, ct)
    assert float(ds.SliceLocation) == -12.5
    assert ds.ProtocolName == "TEST"
    assert ds.PatientID == "T-009"
    assert "ViewPosition" not in ds
    with pytest.raises(ValueError, match="uint16 or int16"):
        synth.make_image_dataset(
            ct.astype(np.float32),  # type: ignore[arg-type]
            sop_class_uid=synth.CT_IMAGE_STORAGE,
            modality="CT",
            study=synth.make_study(9),
        )


def test_feed_is_deterministic_in_seed() -> None:
    def digest(seed: int) -> list[tuple[str, bytes]]:
        return [
            (ds.SOPInstanceUID, ds.PixelData)
            for s in synth.hospital_feed(seed, rows=64, cols=64)
            for ds in s.datasets
        ]

    a, b, c = digest(5), digest(5), digest(6)
    assert a == b
    assert not {uid for uid, _ in a} & {uid for uid, _ in c}
    assert all(pa != pc for (_, pa), (_, pc) in zip(a, c, strict=True))


def test_write_feed_round_trip(feed: list[synth.FeedStudy], tmp_path: Path) -> None:
    paths = synth.write_feed(feed, tmp_path / "feed")
    assert len(paths) == sum(len(s.datasets) for s in feed) == 14
    assert len(set(paths)) == len(paths)
    originals = [ds for s in feed for ds in s.datasets]
    for path, original in zip(paths, originals, strict=True):
        assert path.suffix == ".dcm"
        raw = path.read_bytes()
        assert raw[:132] == bytes(128) + b"DICM"
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == original.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == original.SOPInstanceUID
        assert meta.ImplementationClassUID
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert ds.PatientName == original.PatientName


# ------------------------------------------------------------------------------------------
# Over the network: pynetdicom C-STORE, and DCMTK's storescu where installed
# ------------------------------------------------------------------------------------------


class _Receiver:
    """A pynetdicom storage SCP on an ephemeral port that keeps what it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SYNTHTEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert self.server is not None
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        assert self.server is not None
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    try:
        yield r
    finally:
        r.close()


def test_feed_is_sendable_with_pynetdicom(feed: list[synth.FeedStudy], receiver: _Receiver) -> None:
    from pynetdicom import AE

    datasets = [ds for s in feed for ds in s.datasets]
    ae = AE(ae_title="SYNTHSCU")
    for uid in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="SYNTHTEST")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()
    got = {ds.SOPInstanceUID: ds for ds in receiver.received}
    assert set(got) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        assert np.array_equal(got[ds.SOPInstanceUID].pixel_array, ds.pixel_array)


@pytest.mark.dcmtk
def test_feed_is_sendable_with_storescu(
    feed: list[synth.FeedStudy], receiver: _Receiver, tmp_path: Path
) -> None:
    storescu = dcmtk("storescu")  # DCMTK's, by absolute path: pynetdicom ships a namesake
    paths = synth.write_feed(feed, tmp_path)
    proc = subprocess.run(
        [storescu, "-aec", "SYNTHTEST", "-xe", "127.0.0.1", str(receiver.port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(receiver.received) == len(paths)


# ------------------------------------------------------------------------------------------
# The service does not carry the generator
# ------------------------------------------------------------------------------------------


def test_the_service_does_not_import_the_synthetic_feed() -> None:
    """The gateway, the anchor pool and the command line load without pxsgate.tools.synth:
    only ``model.anchors: demo`` (and the demo, tests and benchmarks) draw images."""
    code = ("import sys, pxsgate.service.gateway, pxsgate.anchors, pxsgate.cli; "
            "loaded = sorted(m for m in sys.modules if m.startswith('pxsgate.tools.synth')); "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
