"""Preprocessing as the published PXS code: masking, scaling, equalisation, resize, crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pxsgate.errors import PreprocessError
from pxsgate.preprocess import (
    center_crop,
    equalize_hist,
    jpeg_roundtrip_u8,
    mask_unused_bits,
    pixels_from_dataset,
    preprocess_dataset,
    preprocess_file,
    preprocess_pixels,
    resize_shorter,
    to_model_input,
    to_uint8,
)

from .conftest import SAMPLES

REAL_CR = SAMPLES / "RG1_J2KI.dcm"  # CR chest, MONOCHROME1, 15-bit


def make_dataset(
    pixels: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2"
) -> Dataset:
    """An uncompressed, explicit VR little endian single-frame image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def gradient_image(rows: int = 400, cols: int = 300) -> np.ndarray:
    """A 12-bit test pattern: a diagonal ramp with a brighter disc."""
    y, x = np.mgrid[0:rows, 0:cols]
    img = (x + y) * 4095 // (rows + cols - 2)
    img[(y - rows // 2) ** 2 + (x - cols // 2) ** 2 < (cols // 4) ** 2] += 500
    pattern: np.ndarray = np.clip(img, 0, 4095).astype(np.uint16)
    return pattern


# --- equalize_hist ------------------------------------------------------------------------------


def test_equalize_hist_matches_hand_computed_opencv_lut() -> None:
    # hist: 10 -> 2, 20 -> 1, 30 -> 2, 40 -> 1; total 6; first bin 10 (2 pixels).
    # scale = 255 / (6 - 2) = 63.75.  lut[10] = 0; lut[20] = 1 * 63.75 -> 64;
    # lut[30] = 3 * 63.75 = 191.25 -> 191; lut[40] = 4 * 63.75 = 255.
    img = np.array([[10, 10, 20], [30, 30, 40]], dtype=np.uint8)
    expected = np.array([[0, 0, 64], [191, 191, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(equalize_hist(img), expected)


def test_equalize_hist_rounds_half_to_even_like_cvround() -> None:
    # hist: 50 -> 2, 60 -> 1, 70 -> 2, 80 -> 7; total 12; scale = 255 / (12 - 2) = 25.5.
    # lut[60] = 1 * 25.5 -> 26; lut[70] = 3 * 25.5 = 76.5 -> 76 (half to even, not 77);
    # lut[80] = 10 * 25.5 = 255.
    img = np.array([[50, 50, 60, 70], [70, 80, 80, 80], [80, 80, 80, 80]], dtype=np.uint8)
    expected = np.array([[0, 0, 26, 76], [76, 255, 255, 255], [255, 255, 255, 255]], np.uint8)
    np.testing.assert_array_equal(equalize_hist(img), expected)


def test_equalize_hist_single_value_image_keeps_its_value() -> None:
    img = np.full((5, 7), 37, dtype=np.uint8)
    np.testing.assert_array_equal(equalize_hist(img), img)


def test_equalize_hist_equals_opencv_when_available() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, cols = rng.integers(1, 80, size=2)
        img = (rng.integers(0, 256, (rows, cols)) // rng.integers(1, 40)).astype(np.uint8)
        np.testing.assert_array_equal(equalize_hist(img), cv2.equalizeHist(img))


def test_equalize_hist_refuses_non_uint8() -> None:
    with pytest.raises(PreprocessError):
        equalize_hist(np.zeros((4, 4), dtype=np.uint16))


# --- bits, scaling, inversion ----------------------------------------------------------------


def test_mask_unused_bits_removes_junk_above_high_bit() -> None:
    junk = np.array([[0xF123, 0x0FFF], [0xA000, 0x0005]], dtype=np.uint16)
    masked = mask_unused_bits(junk, bits_stored=12, high_bit=11)
    np.testing.assert_array_equal(masked, [[0x0123, 0x0FFF], [0x0000, 0x0005]])
    # Data stored in the top bits (HighBit 15, BitsStored 12): the low 4 bits are unused.
    top = mask_unused_bits(junk, bits_stored=12, high_bit=15)
    np.testing.assert_array_equal(top, [[0xF120, 0x0FF0], [0xA000, 0x0000]])


def test_mask_unused_bits_leaves_signed_data_and_refuses_nonsense() -> None:
    signed = np.array([[-5, 7]], dtype=np.int16)
    np.testing.assert_array_equal(
        mask_unused_bits(signed, bits_stored=12, high_bit=11, signed=True), signed
    )
    with pytest.raises(PreprocessError, match="BitsStored"):
        mask_unused_bits(signed, bits_stored=17, high_bit=16)


def test_pixels_from_dataset_masks_junk_bits() -> None:
    junk = gradient_image(8, 6) | np.uint16(0xF000)
    pixels = pixels_from_dataset(make_dataset(junk, bits_stored=12))
    assert pixels.ndim == 2
    assert np.issubdtype(pixels.dtype, np.integer)
    np.testing.assert_array_equal(pixels, junk & 0x0FFF)


def test_to_uint8_truncates_and_inverts_monochrome1() -> None:
    pixels = np.array([[100, 200, 300]], dtype=np.uint16)
    # (x - 100) / 200 * 255 = 0, 127.5, 255 -> truncated to 0, 127, 255.
    np.testing.assert_array_equal(to_uint8(pixels, "MONOCHROME2"), [[0, 127, 255]])
    np.testing.assert_array_equal(to_uint8(pixels, "MONOCHROME1"), [[255, 128, 0]])


def test_to_uint8_constant_image_is_zeros_without_division_by_zero() -> None:
    with np.errstate(all="raise"):
        out = to_uint8(np.full((3, 3), 812, dtype=np.uint16), "MONOCHROME2")
    assert out.dtype == np.uint8
    assert not out.any()


def test_to_uint8_signed_16_bit_does_not_wrap() -> None:
    pixels = np.array([[-32768, 0, 32767]], dtype=np.int16)
    np.testing.assert_array_equal(to_uint8(pixels, "MONOCHROME2"), [[0, 127, 255]])


# --- resize, crop, tensor ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1000, 800), (420, 336)),  # w < h: w -> 336, h -> int(336 * 1000 / 800) = 420
        ((800, 1000), (336, 420)),
        ((333, 500), (336, 504)),  # int(336 * 500 / 333) = int(504.50...) = 504
        ((1955, 1841), (356, 336)),  # int(336 * 1955 / 1841) = int(356.80...) = 356
        ((336, 400), (336, 400)),  # already the right size: unchanged, as torchvision
    ],
)
def test_resize_shorter_follows_torchvision_size_rule(
    shape: tuple[int, int], expected: tuple[int, int]
) -> None:
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = resize_shorter(img)
    assert out.shape == expected
    assert out.dtype == np.uint8


def test_resize_shorter_is_pil_antialiased_bilinear() -> None:
    # A 2-pixel checkerboard shrunk 4x averages to mid-grey with an antialiasing filter;
    # plain bilinear sampling would alias to the pattern's values.
    board = (np.indices((1344, 1344)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_shorter(board)
    assert out.shape == (336, 336)
    assert np.abs(out[8:-8, 8:-8].astype(int) - 128).max() <= 2


def test_center_crop_uses_torchvision_offsets() -> None:
    img = np.arange(421 * 337, dtype=np.int64).reshape(421, 337).astype(np.uint8)
    out = center_crop(img)
    # top = round(101 / 2) = round(50.5) = 50 (half to even); left = round(8.5) = 8.
    np.testing.assert_array_equal(out, img[50:370, 8:328])
    even = np.arange(420 * 336).reshape(420, 336).astype(np.uint8)
    np.testing.assert_array_equal(center_crop(even), even[50:370, 8:328])
    with pytest.raises(PreprocessError, match="smaller"):
        center_crop(np.zeros((300, 400), dtype=np.uint8))


def test_to_model_input_is_totensor_repeated_to_three_channels() -> None:
    img = np.array([[0, 51], [255, 128]], dtype=np.uint8)
    out = to_model_input(img)
    assert out.shape == (3, 2, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], img.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_jpeg_roundtrip_keeps_shape_and_is_close() -> None:
    img = equalize_hist(to_uint8(gradient_image(), "MONOCHROME2"))
    out = jpeg_roundtrip_u8(img)
    assert out.shape == img.shape
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 2


# --- the whole chain ----------------------------------------------------------------------------


def _check_model_input(x: np.ndarray) -> None:
    # The 8-bit model image; ToTensor and the three channels are applied per batch.
    assert x.shape == (320, 320)
    assert x.dtype == np.uint8
    # Equalised: the full range is used.
    assert x.max() > 230
    assert x.min() < 25


def test_preprocess_dataset_on_a_12_bit_image(tmp_path: Path) -> None:
    pixels = gradient_image(400, 300)
    ds = make_dataset(pixels | np.uint16(0x3000))  # junk in the unused bits
    x = preprocess_dataset(ds)
    _check_model_input(x)
    np.testing.assert_array_equal(x, preprocess_pixels(pixels, "MONOCHROME2"))
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(preprocess_file(path), x)
    with_jpeg = preprocess_file(path, jpeg_roundtrip=True)
    _check_model_input(with_jpeg)
    assert np.abs(with_jpeg.astype(int) - x.astype(int)).mean() < 2.55


def test_monochrome1_dataset_is_the_inverse_image() -> None:
    pixels = gradient_image(400, 300)
    mono2 = preprocess_dataset(make_dataset(pixels))
    mono1 = preprocess_dataset(make_dataset(pixels, photometric="MONOCHROME1"))
    # Dark and bright swap: the two inputs are strongly anti-correlated.
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] < -0.95


def test_real_compressed_cr_chest() -> None:
    ds = pydicom.dcmread(REAL_CR)
    pixels = pixels_from_dataset(ds)
    assert pixels.shape == (1955, 1841)
    assert pixels.max() < 2**15  # BitsStored 15
    _check_model_input(preprocess_pixels(pixels, str(ds.PhotometricInterpretation)))


SAMPLE_FILES = sorted(SAMPLES.glob("*.dcm"))


def test_the_shared_samples_are_there() -> None:
    # tests/data/dicom-samples is part of the test data; missing it must not pass silently.
    assert len(SAMPLE_FILES) >= 6, f"expected the real samples in {SAMPLES}"


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_every_real_sample_decodes_and_preprocesses(path: Path) -> None:
    # JPEG 2000 (lossless, lossy), JPEG-LS near-lossless, JPEG lossless SV1, 12-bit JPEG
    # extended: every compressed syntax the samples carry has a decoder installed.
    ds = pydicom.dcmread(path)
    assert get_decoder(ds.file_meta.TransferSyntaxUID).is_available
    _check_model_input(preprocess_file(path))


def test_multi_frame_is_refused() -> None:
    ds = make_dataset(np.zeros((16, 16), dtype=np.uint16))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(PreprocessError, match="multi-frame"):
        preprocess_dataset(ds)


@pytest.mark.parametrize(("samples", "photometric"), [(3, "RGB"), (1, "PALETTE COLOR")])
def test_colour_is_refused(samples: int, photometric: str) -> None:
    ds = make_dataset(np.zeros((16, 16), dtype=np.uint16))
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.PixelData = ds.PixelData * samples
    with pytest.raises(PreprocessError, match=r"colour|PALETTE"):
        preprocess_dataset(ds)


def test_missing_pixel_data_is_refused() -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no Pixel Data"):
        preprocess_dataset(ds)


def test_corrupt_pixel_data_is_a_preprocess_error() -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    ds.PixelData = b"\x00\x01"  # far too short for 4 x 4 x 16 bits
    with pytest.raises(PreprocessError, match="cannot decode"):
        preprocess_dataset(ds)


def test_malformed_file_is_a_preprocess_error(tmp_path: Path) -> None:
    path = tmp_path / "not.dcm"
    path.write_bytes(b"this is not DICOM")
    with pytest.raises(PreprocessError, match="not a readable DICOM file"):
        preprocess_file(path)
