"""Where the fields of a stored result document are, as SQLite JSON paths.

``results.document`` holds the result document as JSON text (schemas/result.schema.json);
the views and queries read its fields with ``json_extract(document, PATH)``. Each path is
spelled here once. A view's text is part of a released migration: change a path only
together with a new migration that re-creates the views using it.
"""

from __future__ import annotations

# The document's own fields.
EXIT_CODE = "$.exitCode"
ERROR_MESSAGE = "$.errorMessage"
RESULTS = "$.results"  # the entries: one PXS score per scored image, then any change
MODEL_VERSION = "$.model.version"
WEIGHTS_SHA256 = "$.model.weightsSha256"
ANCHORS_SHA256 = "$.model.anchorsSha256"

# pxsgate's own section.
STUDY_DATETIME = "$.pxsgate.studyDateTime"
HEADLINE_VALUE = "$.pxsgate.headline.value"  # the study's PXS score
SELECTION_RULE = "$.pxsgate.selection.rule"
SELECTION_REASON = "$.pxsgate.selection.reason"

# Inside one entry of RESULTS (json_each(document, RESULTS) e: e.value).
ENTRY_VALUE = "$.value"
ENTRY_CODE = "$.code"
CHANGE_DISTANCE = "$.change.distance"
CHANGE_SCORE_DIFFERENCE = "$.change.scoreDifference"
CHANGE_INTERVAL_DAYS = "$.change.intervalDays"


def stage(name: str) -> str:
    """When the study reached a stage (received, ready, inferred, stored, ...)."""
    return f"$.pxsgate.stages.{name}"


def doc(path: str) -> str:
    """SQL for one field of the result document, of ``results`` aliased ``r``."""
    return f"json_extract(r.document, '{path}')"


# The paths that hold JSON numbers (typed on PostgreSQL, whose json_extract returns
# text: db.translate reads them with json_number / json_integer instead). The scores'
# values are strings (Listing 3), read as text on both and CAST where compared.
NUMBER_PATHS = frozenset({CHANGE_DISTANCE, CHANGE_SCORE_DIFFERENCE, CHANGE_INTERVAL_DAYS})
INTEGER_PATHS = frozenset({EXIT_CODE})

# A result's PXS score: radiologist_view.pxs_score, researcher_view.pxs_score, evaluate's.
PXS_SCORE = f"CAST({doc(HEADLINE_VALUE)} AS REAL)"
