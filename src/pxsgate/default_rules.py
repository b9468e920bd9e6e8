"""The default selection rules: the paper's approach ("Study Selection", "Series
Selection"), generalised. config/pxsgate.yaml spells out exactly these (a test holds them
equal), so a site edits a copy of what runs.

Study rules: a candidate study has CR/DX images of the chest (BodyPartExamined, or, when
that is empty, a chest word in the study or series description).

Image rules, first match decides:
  1. not a screenshot: SECONDARY in ImageType, or a Secondary Capture SOP class;
  2. not a DX "For Processing" image (the raw detector image, never shown to a reader);
  3. not a CATH-enhanced copy (DerivationDescription, the paper's rule);
  4. AP named in SeriesDescription -> model input;
  5. another view named in SeriesDescription -> not (the description wins over
     ViewPosition: at the paper's hospital it is the standardised one);
  6. otherwise ViewPosition AP -> model input.
No rule excludes on BurnedInAnnotation or on DERIVED: real portable films carry burned-in
markers and ImageType DERIVED\\PRIMARY.

Data only: pxsgate.config compiles them (pxsgate.matchers, which imports pydicom) when
they are first used.
"""

from __future__ import annotations

from typing import Any

CHEST_WORDS = ["CHEST", "THORAX", "CXR", "LUNG", "LUNGS"]
OTHER_VIEWS = ["PA", "LAT", "LATERAL", "LL", "RL", "LLD", "RLD", "OBL", "OBLIQUE"]
SECONDARY_CAPTURE = [
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
]
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

STUDY_RULES_DATA: list[dict[str, Any]] = [
    {
        "name": "chest-radiograph",
        "accept": {"all": [
            {"tag": "Modality", "one-of": ["CR", "DX"]},
            {"any": [
                {"tag": "BodyPartExamined", "one-of": ["CHEST", "THORAX"]},
                {"all": [
                    {"tag": "BodyPartExamined", "missing": True},
                    {"any": [
                        {"tag": "StudyDescription", "contains-token": CHEST_WORDS},
                        {"tag": "SeriesDescription", "contains-token": CHEST_WORDS},
                    ]},
                ]},
            ]},
        ]},
    },
]

IMAGE_RULES_DATA: list[dict[str, Any]] = [
    {"name": "screenshot", "exclude": {"any": [
        {"tag": "ImageType", "equals": "SECONDARY"},
        {"tag": "SOPClassUID", "one-of": SECONDARY_CAPTURE},
    ]}},
    {"name": "for-processing", "exclude": {"any": [
        {"tag": "PresentationIntentType", "equals": "FOR PROCESSING"},
        {"tag": "SOPClassUID", "equals": DX_FOR_PROCESSING},
    ]}},
    {"name": "cath-copy", "exclude": {"tag": "DerivationDescription", "contains-token": "CATH"}},
    {"name": "ap-in-description", "select": {"tag": "SeriesDescription", "contains-token": "AP"}},
    {"name": "other-view-in-description",
     "exclude": {"tag": "SeriesDescription", "contains-token": OTHER_VIEWS}},
    {"name": "ap-view-position", "select": {"tag": "ViewPosition", "equals": "AP"}},
]

