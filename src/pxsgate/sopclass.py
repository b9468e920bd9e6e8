"""Which storage SOP classes carry images that the model could score.

A study that has been scored is re-opened only by an instance that could change what is
scored. Objects that are not images (structured reports, key object selections,
presentation states, waveforms, encapsulated documents, registrations, segmentations, RT
plans and structures, ...) cannot: a PACS routes them with the study (pxsgate's own SR
among them, when a router sends the study back), and scoring the study again for them
would only repeat the same score. They are still stored and indexed.

The families are those of PS3.4 Annex B.5 (Standard SOP Classes), by UID prefix, so the
decision never depends on a text field a sender wrote. Image SOP classes not listed here
(CR, DX, CT, MR, SC, US, ...) re-open a study as before.
"""

from __future__ import annotations

_STORAGE = "1.2.840.10008.5.1.4.1.1."

# UID prefixes of the non-image storage SOP classes, matched by whole components.
_NON_IMAGE_FAMILIES = (*(_STORAGE + suffix for suffix in (
    "4.2",      # MR spectroscopy
    "9",        # waveforms (ECG, audio, hemodynamic, respiratory, ...)
    "11",       # presentation states (grayscale, color, blending, XA/XRF, advanced ...)
    "66",       # raw data, spatial registration, fiducials, deformable registration,
                # segmentation, surface segmentation, tractography (66, 66.1 ... 66.6)
    "67",       # real world value mapping
    "68",       # surface scan mesh / point cloud
    "78",       # lensometry, refractive, visual acuity ... measurements
    "79",       # macular grid thickness and volume report
    "80",       # ophthalmic visual field static perimetry measurements
    "77.1.5.3", # stereometric relationship
    "81",       # ophthalmic thickness map
    "82",       # corneal topography map
    "88",       # structured reports, key object selection, CAD and dose reports
    "90",       # content assessment results
    "91",       # microscopy bulk simple annotations
    "104",      # encapsulated PDF, CDA, STL, OBJ, MTL
    "131",      # basic structured display
    "200",      # CT/XA defined and performed procedure protocols
    "481",      # radiotherapy objects (dose, structures, plans, records), not RT images
)),
    "1.2.840.10008.5.1.4.34",  # second-generation radiotherapy (delivery instructions)
)
_RT_IMAGES = frozenset(_STORAGE + suffix for suffix in ("481.1", "481.23", "481.24"))


def is_image(sop_class_uid: str) -> bool:
    """False for a storage SOP class that holds no image the model could score."""
    uid = sop_class_uid.strip()
    if uid in _RT_IMAGES:
        return True
    return not any(uid == family or uid.startswith(family + ".")
                   for family in _NON_IMAGE_FAMILIES)


# The names (as in the DICOM dictionary, PS3.6 Annex A) of the SOP classes a chest study
# usually holds, so that `pxsgate trace` names them without importing pydicom (~0.2 s);
# names() looks any other up in pydicom's dictionary. tests/test_cli_imports.py holds this
# table equal to pydicom's.
COMMON_NAMES = {
    _STORAGE + "1": "Computed Radiography Image Storage",
    _STORAGE + "1.1": "Digital X-Ray Image Storage - For Presentation",
    _STORAGE + "1.1.1": "Digital X-Ray Image Storage - For Processing",
    _STORAGE + "7": "Secondary Capture Image Storage",
    _STORAGE + "7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    _STORAGE + "7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    _STORAGE + "7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    _STORAGE + "7.4": "Multi-frame True Color Secondary Capture Image Storage",
    _STORAGE + "11.1": "Grayscale Softcopy Presentation State Storage",
    _STORAGE + "88.11": "Basic Text SR Storage",
    _STORAGE + "88.22": "Enhanced SR Storage",
    _STORAGE + "88.33": "Comprehensive SR Storage",
    _STORAGE + "88.59": "Key Object Selection Document Storage",
    _STORAGE + "104.1": "Encapsulated PDF Storage",
}


def name(sop_class_uid: str) -> str:
    """The SOP class's name from the DICOM dictionary, else the UID itself."""
    known = COMMON_NAMES.get(sop_class_uid)
    if known is not None:
        return known
    from pydicom.uid import UID  # the whole dictionary: only for a rarer class

    return str(UID(sop_class_uid).name)
