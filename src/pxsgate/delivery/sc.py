"""The result as an image any PACS viewer shows: a DICOM Secondary Capture in the scored
study, its own series, built with highdicom. Many viewers do not render SR at all.

The picture is the exact model input (the 320x320 8-bit image the model saw, from the same
preprocessing), shown at twice its size (each pixel repeated, none changed), under a text
band burned into the pixels: the PXS score, the change against the patient's prior when
there is one, the review flags, and "NOT FOR CLINICAL USE" when the weights are the demo's.
BurnedInAnnotation is YES: the text is in the pixels, and nothing but what a reader of the
score needs (no patient name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pxsgate import __version__
from pxsgate.delivery.sr import MODEL_NAME, SrError, document_time, is_demo
from pxsgate.document import CHANGE_CODE, PXS_CODE
from pxsgate.records import Status

SC_SERIES_NUMBER = 9902  # the SR's is 9901
SC_SERIES_DESCRIPTION = "PXS score image"
DEMO_SC_SERIES_DESCRIPTION = "PXS score image (demonstration weights, not for clinical use)"
SCALE = 2  # each model-input pixel shown as 2x2
FONT_SIZE = 22
LINE_HEIGHT = 30
MARGIN = 12


def caption(document: Mapping[str, Any]) -> list[str]:
    """The lines burned in above the image, most important first."""
    if document.get("status") != Status.SUCCEEDED:
        raise SrError("result document is not SUCCEEDED: there is no score to show")
    block = document.get("pxsgate") or {}
    headline = block.get("headline") or {}
    score = headline.get("value")
    if score is None:
        raise SrError("result document has no headline score")
    lines = []
    if is_demo(document.get("model") or {}):
        lines.append("NOT FOR CLINICAL USE - demonstration weights")
    lines.append(f"PXS score {score}")
    for entry in document.get("results") or ():
        found = entry.get("change") if entry.get("code") == CHANGE_CODE else None
        if isinstance(found, Mapping):
            diff = float(found.get("scoreDifference", 0.0))
            date = str(found.get("priorStudyDate") or "")[:10]
            lines.append(f"Change {entry.get('value')} since {date} "
                         f"({found.get('intervalDays')} days; score {diff:+.2f})")
    flags = [str(f) for f in block.get("flags") or ()]
    if flags:
        lines.append("Review: " + ", ".join(flags))
    model = document.get("model") or {}
    lines.append(f"{model.get('name', '')} {model.get('version', '')}: the image the model "
                 "saw")
    return lines


def render(model_input: npt.NDArray[np.uint8], lines: Sequence[str]) -> npt.NDArray[np.uint8]:
    """The model input at SCALE times its size under a black band with ``lines`` in white."""
    if model_input.ndim != 2 or model_input.dtype != np.uint8:
        raise SrError("the model input is not an 8-bit grayscale image")
    image = np.repeat(np.repeat(model_input, SCALE, axis=0), SCALE, axis=1)
    band = 2 * MARGIN + LINE_HEIGHT * len(lines)
    canvas = Image.new("L", (image.shape[1], band + image.shape[0]), 0)
    canvas.paste(Image.fromarray(image, mode="L"), (0, band))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * LINE_HEIGHT), line, fill=255, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_pxs_sc(document: Mapping[str, Any], source: Dataset,
                 model_input: npt.NDArray[np.uint8], *, sop_instance_uid: str,
                 series_instance_uid: str, instance_number: int = 1,
                 manufacturer: str = "pxsgate") -> Dataset:
    """The Secondary Capture of a SUCCEEDED result: ``source`` is the headline image's
    header (its patient and study modules are copied), ``model_input`` what the model saw."""
    pixels = render(model_input, caption(document))
    demo = is_demo(document.get("model") or {})
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=orientation(source),
        series_instance_uid=series_instance_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=manufacturer, transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=DEMO_SC_SERIES_DESCRIPTION if demo else SC_SERIES_DESCRIPTION)
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = MODEL_NAME
    sc.SoftwareVersions = __version__
    sc.ImageComments = ("Not for clinical use: demonstration weights. " if demo else "") + \
        "PXS score " + str((document.get("pxsgate") or {}).get("headline", {}).get("value"))
    moment = document_time(document)
    if moment is not None:
        for prefix in ("Content", "Series", "InstanceCreation"):
            setattr(sc, f"{prefix}Date", moment.strftime("%Y%m%d"))
            setattr(sc, f"{prefix}Time", moment.strftime("%H%M%S"))
    if "PatientName" in source:
        sc.PatientName = source.PatientName
    body_part = str(source.get("BodyPartExamined", "") or "")
    if body_part:
        sc.BodyPartExamined = body_part  # a chest: not paired, no Laterality
    else:
        # Laterality (General Series, 2C) is then required: the source's, or empty.
        sc.Laterality = str(source.get("Laterality", "") or "")
    return sc


def orientation(source: Dataset) -> tuple[str, str]:
    """The source's PatientOrientation (the model input keeps the stored image's
    orientation: preprocessing neither flips nor rotates), or the frontal chest film's
    conventional one (rows to the patient's left, columns to the feet)."""
    value = source.get("PatientOrientation")
    letters = set("APRLHF")
    if value is not None and len(value) == 2 and all(
            len(str(v)) == 1 and str(v) in letters for v in value):
        return str(value[0]), str(value[1])
    return "L", "F"


def headline_uid(document: Mapping[str, Any]) -> str:
    headline = (document.get("pxsgate") or {}).get("headline") or {}
    uid = headline.get("sopInstanceUid")
    if not uid:
        results = [r for r in document.get("results") or () if r.get("code") == PXS_CODE]
        raise SrError("result document has no headline image" if results else
                      "result document has no PXS result")
    return str(uid)
