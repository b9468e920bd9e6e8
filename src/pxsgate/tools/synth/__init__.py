"""A synthetic hospital feed: radiographs that look like radiographs, wrapped in real DICOM.

Used by ``pxsgate demo``, by the tests and by the benchmarks. Nothing here is a real person
or a real image: anatomy is drawn from smooth analytic shapes (soft-edged ellipses, bands
and domes), vectorised with numpy and fully determined by a :class:`numpy.random.Generator`.

Pixel conventions
-----------------
The image generators return *stored values in the MONOCHROME2 sense*: bright = dense
(bone, heart, consolidation), dark = air (lungs, outside the body). Values lie in
``[0, 2**bits_stored - 1]``. :func:`make_image_dataset` inverts them when asked to store
a MONOCHROME1 image, as many CR readers do.

The feed
--------
:func:`hospital_feed` builds seven studies that exercise the selection rules (one AP portable
chest, a DX AP chest with a CATH-enhanced copy and a screenshot, an AP chest described only by
its study description, a PA + lateral pair, a knee, a chest CT, and a repeated AP chest with
another patient's film filed into the study). Each :class:`FeedStudy` says whether pxsgate
should score it and which SOP instances are the model input.

Modules
-------
``draw`` (drawing primitives, the patient canvas, exposure) and ``text`` (burned-in text);
the anatomy: ``chest`` (chest radiographs, drawn by ``frontal`` and ``lateral`` with the
vessels and opacities of ``lung``), ``knee`` and ``ct``; ``derived`` (CATH copies and
screenshots); ``dicom`` (UIDs, studies, datasets); ``feed`` (the hospital feed, a table).
Everything the demo, the tests and the benchmarks use is imported here, as
``from pxsgate.tools import synth``. The service does not import this package, except for
``model.anchors: demo``.
"""

from pxsgate.tools.synth.chest import View, chest_radiograph, normal_chest_anchors
from pxsgate.tools.synth.ct import ct_slice
from pxsgate.tools.synth.derived import catheter_enhance, screen_capture
from pxsgate.tools.synth.dicom import (
    CR_IMAGE_STORAGE,
    CT_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    DX_FOR_PROCESSING_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    StudyInfo,
    make_image_dataset,
    make_study,
    synthetic_uid,
)
from pxsgate.tools.synth.feed import FeedStudy, hospital_feed, write_feed
from pxsgate.tools.synth.knee import knee_radiograph

__all__ = [
    "CR_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
    "DX_FOR_PRESENTATION_STORAGE",
    "DX_FOR_PROCESSING_STORAGE",
    "SECONDARY_CAPTURE_STORAGE",
    "FeedStudy",
    "StudyInfo",
    "View",
    "catheter_enhance",
    "chest_radiograph",
    "ct_slice",
    "hospital_feed",
    "knee_radiograph",
    "make_image_dataset",
    "make_study",
    "normal_chest_anchors",
    "screen_capture",
    "synthetic_uid",
    "write_feed",
]
