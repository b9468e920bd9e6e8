"""Preprocessing: a DICOM dataset becomes the PXS model's input, exactly as the model was trained.

Pure functions, no state. The chain, in the published order::

    pixels_from_dataset  pixel_array, refuse what the model cannot take, mask unused bits
    to_uint8             min-max scale to uint8 (truncating), invert MONOCHROME1
    equalize_hist        OpenCV's cv2.equalizeHist, bit for bit
    (jpeg_roundtrip)     optional: JPEG quality 95 encode + decode, as the training images were
    resize_shorter       torchvision Resize(336) on a PIL image (antialiased bilinear)
    center_crop          torchvision CenterCrop(320)
    to_model_input       torchvision ToTensor (/255, float32), grey repeated to 3 channels
                         (per batch, on the inference device: infer.batch_tensor)

Source: QTIM-Lab/PXS-score (MIT), files PXS_preprocessing.py (function ``dcm2img``: the
DICOM -> 8-bit image step used to build the training and anchor JPEGs, itself taken from
CheXpert's author), PXS_test.py and PXS_test_direct_from_DICOM.py (``img_processing``:
``transforms.Compose([Resize(336), CenterCrop(320), ToTensor()])`` then
``np.repeat(x, 3, 0)``; no mean/std normalisation). The model itself is
torchvision v0.5.0's densenet121 (PXS_classes.py).

Differences from the published code, on purpose:
- a constant image (max == min) becomes zeros; the published ``x / x.max()`` divides 0 by 0
  and casts NaN to uint8, which is undefined (0 on x86, hence the same result there);
- signed pixel data is not bit-masked (see ``mask_unused_bits``);
- PXS_test_direct_from_DICOM.py also "autocrops" near-black borders (threshold 2) before
  equalising; that step is in neither the training preprocessing nor PXS_test.py, so it is
  not applied here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image

from pxsgate.errors import DecodeFailed, PreprocessError

__all__ = [
    "center_crop",
    "equalize_hist",
    "is_image_file",
    "jpeg_roundtrip_u8",
    "load_model_image",
    "mask_unused_bits",
    "pixels_from_dataset",
    "preprocess_dataset",
    "preprocess_file",
    "preprocess_image_file",
    "preprocess_pixels",
    "resize_shorter",
    "thumbnail_file",
    "thumbnail_pixels",
    "to_model_input",
    "to_uint8",
]

U8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]

RESIZE_TO = 336
CROP_TO = 320
# PXS_preprocessing.py writes the 8-bit images with cv2.imwrite(..., IMWRITE_JPEG_QUALITY 95).
JPEG_QUALITY = 95
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


# --- DICOM -> integer pixels ---------------------------------------------------------------


def pixels_from_dataset(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the one greyscale frame of ``ds`` and mask its unused bits (2-D integer array).

    Raises PreprocessError for missing pixel data, multi-frame, colour, or a failed decode.
    """
    _check_pixel_module(ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom and its codec plugins raise many types; translate here
        raise PreprocessError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim != 2:
        raise PreprocessError(f"expected one greyscale frame, got an array of shape {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.integer):
        raise PreprocessError(f"expected integer pixel data, got {pixels.dtype}")
    bits_stored = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    high_bit = int(ds.get("HighBit", bits_stored - 1))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return mask_unused_bits(pixels, bits_stored=bits_stored, high_bit=high_bit, signed=signed)


def _check_pixel_module(ds: pydicom.Dataset) -> None:
    """Refuse, before the (costly) decode, what the model cannot take."""
    if "PixelData" not in ds:
        raise PreprocessError("dataset has no Pixel Data (7FE0,0010)")
    frames = ds.get("NumberOfFrames", 1)
    if frames not in (None, "") and int(frames) > 1:
        raise PreprocessError(f"multi-frame image ({int(frames)} frames) is not supported")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1:
        raise PreprocessError(f"colour image (SamplesPerPixel {samples}) is not supported")
    # PALETTE COLOR has one sample per pixel but is still a colour image (PS3.3 C.7.6.3.1.2).
    if photometric not in _MONOCHROME:
        raise PreprocessError(f"photometric interpretation {photometric!r} is not supported")


def mask_unused_bits(
    pixels: np.ndarray, *, bits_stored: int, high_bit: int, signed: bool = False
) -> np.ndarray:
    """Keep bits ``high_bit - bits_stored + 1 .. high_bit``, as PXS_preprocessing.py does.

    PS3.5 section 8.1.1 note 4: nothing may be assumed about the unused bits. The published
    mask is ``2**(HighBit+1) - 2**(HighBit-BitsStored+1)``. It assumes unsigned data: for
    signed data pydicom 3 has already sign-extended from BitsStored, and masking would turn
    every negative value into a large positive one, so signed data is returned as decoded.
    """
    width = pixels.dtype.itemsize * 8
    if not 0 < bits_stored <= high_bit + 1 <= width:
        raise PreprocessError(
            f"inconsistent BitsStored {bits_stored} / HighBit {high_bit} for {width}-bit pixels"
        )
    if signed:
        return pixels
    mask = 2 ** (high_bit + 1) - 2 ** (high_bit - bits_stored + 1)
    masked: np.ndarray = np.bitwise_and(pixels, np.asarray(mask, dtype=pixels.dtype))
    return masked


# --- integer pixels -> equalised uint8 --------------------------------------------------------


def to_uint8(pixels: np.ndarray, photometric: str) -> U8Array:
    """Min-max scale to uint8 by truncation, then invert MONOCHROME1 (PXS_preprocessing.py).

    Published: ``x = x - x.min(); (x / x.max() * 255).astype(np.uint8)``, then
    ``cv2.bitwise_not`` for MONOCHROME1. The subtraction is done in int64 so that signed
    16-bit data cannot wrap around.
    """
    shifted = pixels.astype(np.int64) - np.int64(pixels.min())
    peak = shifted.max()
    if peak == 0:
        scaled = np.zeros(pixels.shape, dtype=np.uint8)
    else:
        # Same float64 operations in the same order as the published code, so the truncated
        # values agree bit for bit.
        scaled = ((shifted / peak) * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        scaled = np.bitwise_not(scaled)
    return scaled


def equalize_hist(img: np.ndarray) -> U8Array:
    """Histogram equalisation, bit-exact with OpenCV's ``cv2.equalizeHist``.

    OpenCV (modules/imgproc/src/histogram.cpp, equalizeHist) builds its LUT as: i = first
    non-empty bin; if every pixel is in bin i the image is set to i; otherwise
    ``scale = 255.f / (total - hist[i])`` in float32, ``lut[i] = 0`` and for j > i
    ``lut[j] = saturate_cast<uchar>(sum * scale)`` with sum the count of bins i+1..j and
    the product in float32; saturate_cast rounds half to even (cvRound).
    """
    if img.dtype != np.uint8 or img.ndim != 2:
        raise PreprocessError(f"equalize_hist needs a 2-D uint8 image, got {img.dtype} {img.shape}")
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return np.full(img.shape, first, dtype=np.uint8)
    scale = np.float32(255.0) / np.float32(total - hist[first])
    cumulative = np.cumsum(hist)
    sums = (cumulative - cumulative[first]).astype(np.float32)
    lut = np.clip(np.rint(sums * scale), 0, 255).astype(np.uint8)
    lut[:first] = 0  # bins below `first` are empty; OpenCV leaves them unset
    equalised: U8Array = lut[img]
    return equalised


def jpeg_roundtrip_u8(img: np.ndarray, quality: int = JPEG_QUALITY) -> U8Array:
    """Encode as baseline JPEG and decode again, as the training images were stored.

    PXS_preprocessing.py saved the equalised images with OpenCV (libjpeg, quality 95) and
    training read them with PIL; both use libjpeg's standard tables scaled to the quality and
    the ISLOW DCT, so PIL's encoder gives the same greyscale JPEG.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(
        buffer, format="JPEG", quality=quality
    )
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"), dtype=np.uint8)


# --- torchvision transforms ------------------------------------------------------------------


def resize_shorter(img: np.ndarray, size: int = RESIZE_TO) -> U8Array:
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, bilinear.

    torchvision (transforms.functional, _compute_resized_output_size): the longer side becomes
    ``int(size * long / short)``; PIL's BILINEAR filter is antialiased (a triangle filter
    scaled by the reduction factor), which torch's interpolate is not, so PIL itself is used.
    """
    height, width = img.shape
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return np.array(img, dtype=np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).resize(
        (new_w, new_h), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.uint8)


def center_crop(img: np.ndarray, size: int = CROP_TO) -> U8Array:
    """torchvision ``CenterCrop(size)``: ``top = int(round((h - size) / 2.0))``, same for left.

    Python's round() halves to even, as torchvision's does. Images smaller than the crop
    are refused: after resize_shorter(336) they cannot occur.
    """
    height, width = img.shape
    if height < size or width < size:
        raise PreprocessError(f"image {height}x{width} is smaller than the {size}x{size} crop")
    top = round((height - size) / 2.0)  # torchvision: int(round(...)); round() is an int
    left = round((width - size) / 2.0)
    return np.ascontiguousarray(img[top : top + size, left : left + size], dtype=np.uint8)


def to_model_input(img_u8: np.ndarray) -> F32Array:
    """torchvision ``ToTensor`` (float32 / 255) and ``np.repeat(x, 3, 0)``: [3, H, W] in [0, 1]."""
    if img_u8.dtype != np.uint8 or img_u8.ndim != 2:
        raise PreprocessError(f"expected a 2-D uint8 image, got {img_u8.dtype} {img_u8.shape}")
    scaled = img_u8.astype(np.float32) / np.float32(255.0)
    return np.repeat(scaled[np.newaxis, :, :], 3, axis=0)


# --- the whole chain ---------------------------------------------------------------------------


def preprocess_pixels(
    pixels: np.ndarray, photometric: str, *, jpeg_roundtrip: bool = False
) -> U8Array:
    """Integer pixels -> the 8-bit 320x320 model image.

    ``to_model_input`` (ToTensor, three channels) is the last step; the service applies it to
    whole batches on the inference device, so decoded images travel and wait as 100 KB of
    uint8 rather than 1.2 MB of float32.
    """
    img = equalize_hist(to_uint8(pixels, photometric))
    if jpeg_roundtrip:
        img = jpeg_roundtrip_u8(img)
    return center_crop(resize_shorter(img))


def preprocess_dataset(ds: pydicom.Dataset, *, jpeg_roundtrip: bool = False) -> U8Array:
    """A pydicom dataset -> the 8-bit 320x320 model image."""
    pixels = pixels_from_dataset(ds)
    photometric = str(ds.PhotometricInterpretation)
    return preprocess_pixels(pixels, photometric, jpeg_roundtrip=jpeg_roundtrip)


def _reason(exc: Exception) -> str:
    """Why a file failed, without its path: spool paths name the study and the instance
    (their UIDs), and these messages reach logs and result documents."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def preprocess_file(path: Path, *, jpeg_roundtrip: bool = False) -> U8Array:
    """A DICOM file -> the 8-bit 320x320 model image; unreadable files raise PreprocessError."""
    try:
        ds = pydicom.dcmread(path)
    except OSError as exc:  # the disk, not the image: another try may read it
        raise DecodeFailed(f"cannot read the file: {_reason(exc)}") from exc
    except Exception as exc:  # dcmread raises many types on malformed input; translate here
        raise PreprocessError(f"not a readable DICOM file: {_reason(exc)}") from exc
    try:
        return preprocess_dataset(ds, jpeg_roundtrip=jpeg_roundtrip)
    except PreprocessError:
        raise
    except Exception as exc:  # a malformed pixel-module element (pydicom converts lazily)
        raise PreprocessError(f"cannot prepare the image: {_reason(exc)}") from exc


def preprocess_image_file(path: Path) -> U8Array:
    """An 8-bit PNG or JPEG radiograph -> the 320x320 model image, as PXS_test.py reads one.

    The published test and anchor images are 8-bit files already made by ``dcm2img``
    (CheXpert's JPEGs, the site's equalised JPEGs): ``Image.open`` then Resize(336),
    CenterCrop(320), ToTensor, with no rescaling or equalisation. Greyscale only: a colour
    file (channels that differ) or a 16-bit file is refused, since neither is what the
    model was given.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in ("L", "P", "RGB", "RGBA", "LA"):
                raise PreprocessError(
                    f"{path}: {mode} image; image files must be 8-bit (give the DICOM instead)")
            if mode == "L":
                grey = np.asarray(img, dtype=np.uint8)
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1])
                        and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise PreprocessError(f"{path}: colour image ({mode}) is not supported")
                grey = np.ascontiguousarray(rgb[..., 0])
    except PreprocessError:
        raise
    except Exception as exc:  # PIL raises many types on malformed files; translate here
        raise PreprocessError(f"{path}: not a readable image file: {exc}") from exc
    return center_crop(resize_shorter(grey))


# --- thumbnails (for people, not the model) -----------------------------------------------------

THUMBNAIL_SIDE = 256


def thumbnail_pixels(pixels: np.ndarray, photometric: str,
                     max_side: int = THUMBNAIL_SIDE) -> U8Array:
    """Integer pixels -> an 8-bit picture whose longest side is at most ``max_side``.

    Windowed as the published preprocessing normalises (``to_uint8``: min-max over the whole
    image, MONOCHROME1 inverted), without the histogram equalisation, so that it looks like
    the film. Cheaper than ``to_uint8`` on the full image: the min and max are taken on
    the full image, then it is reduced by box filtering (PIL ``reduce`` on float32) to about
    twice the size wanted before it is scaled to 8 bits, then resized with Lanczos.
    """
    if pixels.ndim != 2 or max_side < 1:
        raise PreprocessError(f"cannot make a thumbnail of an array of shape {pixels.shape}")
    low, high = float(pixels.min()), float(pixels.max())
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # mode F
    factor = max(pixels.shape) // (2 * max_side)
    if factor > 1:
        image = image.reduce(factor)
    reduced = np.asarray(image, dtype=np.float32)
    if high > low:
        scaled = np.clip((reduced - np.float32(low)) * np.float32(255.0 / (high - low)),
                         0, 255).astype(np.uint8)
    else:
        scaled = np.zeros(reduced.shape, dtype=np.uint8)
    if photometric == "MONOCHROME1":
        scaled = np.bitwise_not(scaled)
    picture = Image.fromarray(scaled)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(picture, dtype=np.uint8)


def thumbnail_file(path: Path, max_side: int = THUMBNAIL_SIDE) -> U8Array:
    """A DICOM file -> its thumbnail (``thumbnail_pixels``); what the model could not take
    (colour, multi-frame, no pixel data) or an unreadable file raises PreprocessError."""
    try:
        ds = pydicom.dcmread(path)
    except OSError as exc:
        raise DecodeFailed(f"cannot read the file: {_reason(exc)}") from exc
    except Exception as exc:  # dcmread raises many types on malformed input
        raise PreprocessError(f"not a readable DICOM file: {_reason(exc)}") from exc
    try:
        return thumbnail_pixels(pixels_from_dataset(ds), str(ds.PhotometricInterpretation),
                                max_side)
    except PreprocessError:
        raise
    except Exception as exc:  # a malformed pixel-module element
        raise PreprocessError(f"cannot make the thumbnail: {_reason(exc)}") from exc


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_image_file(path: Path) -> bool:
    """PNG and JPEG files are 8-bit images; anything else is read as DICOM."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_model_image(path: Path, *, jpeg_roundtrip: bool = False) -> U8Array:
    """Any input file (DICOM, or an 8-bit PNG/JPEG) -> the 8-bit 320x320 model image."""
    if is_image_file(path):
        return preprocess_image_file(path)
    return preprocess_file(path, jpeg_roundtrip=jpeg_roundtrip)
