"""Change over time (issue 10): each scored image's embedding is kept with its result, and a
study of a patient with a prior scored image gets a ``pxs.change`` entry: the Siamese
distance between the two headline images.

From outside: the in-process gateway (tests/inprocess.py, whose stand-in model's embedding
is a vector of image statistics) receiving real DICOM over loopback, the real SQLite file,
and ``pxsgate export-dataset`` as a user runs it. Distances are checked against the
stand-in model's embedding computed again here from the received file with the service's
own preprocessing, and against the float16 vectors read back from the store.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import Dataset
from structlog.testing import capture_logs

from pxsgate import change
from pxsgate.config import BatchConfig, ModelConfig, config_from_mapping, load_config
from pxsgate.errors import ConfigError
from pxsgate.infer import InferenceWorker, PxsScorer
from pxsgate.log import configure_logging
from pxsgate.preprocess import preprocess_file, preprocess_pixels
from pxsgate.pxs import pxs_scores
from pxsgate.records import ScoredImage, StudyState
from pxsgate.results import (
    CHANGE_CODE,
    PXS_CODE,
    ModelInfo,
    ResultDocument,
    StudyIdentity,
    build_document,
)
from pxsgate.service.gateway import Gateway
from pxsgate.store import MIGRATIONS, PRIOR_IMAGE_SQL, ImageEmbedding, Store, StudyEmbeddings
from pxsgate.tools import synth

from .conftest import pxsgate, write_config
from .inprocess import gateway, result_of, send, stand_in_embedding
from .test_results import assert_valid, schema_validator

PREFIX = "CHG"
RESEARCH_COLUMNS = [
    "result_id", "patient_hash", "study_date", "status", "pxs_score", "image_scores",
    "model_id", "model_version", "weights_sha256", "anchors_sha256", "flags",
    "ready_to_stored_s", "inference_s", "scored_at_utc", "change_distance", "score_change",
    "interval_days",
]


def visit(patient: int, number: int, date: str, time: str = "080000",
          severity: float = 0.0, view: str = "AP") -> Dataset:
    """One AP chest film of ``patient`` (same anatomy at every visit; ``severity`` adds
    opacities), as study ``number`` of that patient, on ``date``."""
    base = synth.make_study(patient, seed=patient, prefix=PREFIX, study_date=date,
                            study_time=time, description="XR CHEST PORTABLE")
    study = replace(base, study_instance_uid=synth.synthetic_uid(PREFIX, "study", patient,
                                                                 number),
                    accession_number=f"CHG{patient:02d}V{number}")
    pixels = synth.chest_radiograph(np.random.default_rng([patient]), rows=256, cols=256,
                                    view="AP", severity=severity)
    return synth.make_image_dataset(
        pixels, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=study,
        series_description=f"CHEST {view} PORTABLE", view_position=view, body_part="CHEST")


async def scored(gw: Gateway, ds: Dataset) -> dict[str, Any]:
    """Send one study and wait for its result (studies go one after the other)."""
    await send(gw, [ds])
    doc = await result_of(gw, str(ds.StudyInstanceUID))
    assert_valid(doc)
    return doc


def change_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    entries = [r for r in doc["results"] if r["code"] == CHANGE_CODE]
    assert len(entries) <= 1
    return entries[0] if entries else None


def headline_score(doc: dict[str, Any]) -> float:
    return float(doc["pxsgate"]["headline"]["value"])


def stored_vector(gw: Gateway, sop_uid: str) -> tuple[bytes, int]:
    with sqlite3.connect(gw.config.db_path) as db:
        rows = db.execute("""SELECT v.vector, e.dim FROM embeddings e
                             JOIN embedding_vectors v ON v.id = e.vector_id
                             JOIN results r ON r.id = e.result_id
                             WHERE e.sop_instance_uid = ? AND r.current = 1""",
                          (sop_uid,)).fetchall()
    assert len(rows) == 1, rows
    return bytes(rows[0][0]), int(rows[0][1])


async def direct_vector(gw: Gateway, sop_uid: str) -> np.ndarray:
    """The stand-in model's embedding of the received file, computed again here with the
    service's preprocessing (float32, before the store rounds it to float16)."""
    path = (await gw.store.instance_paths([sop_uid]))[sop_uid]
    return stand_in_embedding(preprocess_file(path))


async def check_change(gw: Gateway, doc: dict[str, Any], prior: dict[str, Any],
                       days: float) -> None:
    """``doc``'s change entry is the distance to ``prior``'s headline image, as computed
    from the images directly and from the stored vectors."""
    entry = change_of(doc)
    assert entry is not None, "a prior exists: a change entry"
    found = entry["change"]
    this_sop = doc["pxsgate"]["headline"]["sopInstanceUid"]
    prior_sop = prior["pxsgate"]["headline"]["sopInstanceUid"]
    assert found["priorStudyInstanceUid"] == prior["studyInstanceUid"]
    assert found["priorSopInstanceUid"] == prior_sop
    assert found["priorStudyDate"] == prior["pxsgate"]["studyDateTime"]
    assert found["intervalDays"] == days
    assert found["priorScore"] == pytest.approx(headline_score(prior), abs=1e-6)
    assert found["scoreDifference"] == pytest.approx(
        headline_score(doc) - headline_score(prior), abs=2e-6)
    derived = [ref["refSopInstanceUid"] for ref in entry["derivedFrom"]]
    assert derived == [[this_sop], [prior_sop]]
    assert [ref["refSopInstanceUid"] for ref in entry["presentOn"]] == [[this_sop]]
    assert entry["value"] == f"{found['distance']:.6f}".rstrip("0").rstrip(".")
    assert doc["results"][-1] is entry
    assert doc["results"][0]["code"] == PXS_CODE

    # From the images themselves: the same embedding, rounded to float16 as stored ...
    this_vec, prior_vec = await direct_vector(gw, this_sop), await direct_vector(gw, prior_sop)
    this_blob, dim = stored_vector(gw, this_sop)
    prior_blob, _ = stored_vector(gw, prior_sop)
    assert this_blob == change.pack(this_vec)
    assert prior_blob == change.pack(prior_vec)
    assert dim == this_vec.size == 21
    # ... whose distance is the entry's, exactly; float32's differs by float16's precision.
    expected = float(np.linalg.norm(change.unpack(this_blob, dim).astype(np.float64)
                                    - change.unpack(prior_blob, dim).astype(np.float64)))
    assert found["distance"] == expected
    assert found["distance"] == pytest.approx(float(np.linalg.norm(this_vec - prior_vec)),
                                              rel=5e-3)
    assert found["distance"] > 0


@asynccontextmanager
async def log_events() -> AsyncIterator[list[MutableMapping[str, Any]]]:
    """structlog's capture_logs, for an ``async with`` after the in-process gateway's (which
    configures logging when it starts)."""
    with capture_logs() as logs:
        yield logs


async def test_change_to_the_prior_study_in_and_out_of_date_order(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _), log_events() as logs:
        # Patient 1, in date order: no prior, then the one before each time.
        a1 = await scored(gw, visit(1, 1, "20200101", severity=0.1))
        a2 = await scored(gw, visit(1, 2, "20200301", severity=0.5))
        a3 = await scored(gw, visit(1, 3, "20200615", "143000", severity=0.9))
        assert change_of(a1) is None, "a patient's first study has no prior"
        await check_change(gw, a2, a1, days=60.0)  # 2020 is a leap year
        await check_change(gw, a3, a2, days=106.27)  # 106 days and 6.5 hours

        # Patient 2, out of order: June first, then January, March, and September.
        b3 = await scored(gw, visit(2, 3, "20200615", severity=0.6))
        b1 = await scored(gw, visit(2, 1, "20200101", severity=0.1))
        b2 = await scored(gw, visit(2, 2, "20200301", severity=0.3))
        b4 = await scored(gw, visit(2, 4, "20200915", severity=0.8))
        assert change_of(b3) is None, "nothing of patient 2 was scored before it"
        assert change_of(b1) is None, "a later study (June) is not a prior of January's"
        await check_change(gw, b2, b1, days=60.0)  # not June's, which came in before it
        # September's prior is June's, the latest before it, not March's (the last to come).
        await check_change(gw, b4, b3, days=92.0)
        # A study stored earlier is left as it was: June's result is not rewritten.
        assert await result_of(gw, b3["studyInstanceUid"]) == b3

        # Patient 3, scored after everything above: other patients' studies are no prior,
        # nor is a study of the same patient at the same time.
        c1 = await scored(gw, visit(3, 1, "20201201"))
        c2 = await scored(gw, visit(3, 2, "20201201", severity=0.4))
        assert change_of(c1) is None
        assert change_of(c2) is None

    # Logged without PHI: the study's key and the interval, no UID, ID or date.
    logged = [e for e in logs if e["event"] == "change.computed"]
    assert len(logged) == 4
    secrets = {str(v) for d in (a1, a2, a3, b1, b2, b3, b4)
               for v in (d["patientId"], d["accessionNumber"], d["studyInstanceUid"],
                         d["pxsgate"]["headline"]["sopInstanceUid"],
                         d["pxsgate"]["studyDateTime"])}
    for event in logged:
        assert not secrets & {str(v) for v in event.values()}
        assert len(event["study"]) == 12
    assert sorted(e["interval_days"] for e in logged) == [60.0, 60.0, 92.0, 106.27]


async def test_look_back_excludes_an_old_prior(tmp_path: Path) -> None:
    async with gateway(tmp_path, extra="change:\n  look-back-days: 30\n") as (gw, _):
        first = await scored(gw, visit(4, 1, "20200101"))
        second = await scored(gw, visit(4, 2, "20200301", severity=0.5))
        third = await scored(gw, visit(4, 3, "20200315", severity=0.7))
        assert change_of(first) is None
        assert change_of(second) is None, "60 days back: beyond the 30-day look-back"
        await check_change(gw, third, second, days=14.0)


async def test_change_disabled_adds_no_entry_but_keeps_embeddings(tmp_path: Path) -> None:
    async with gateway(tmp_path, extra="change:\n  enabled: false\n") as (gw, _):
        first = await scored(gw, visit(5, 1, "20200101"))
        second = await scored(gw, visit(5, 2, "20200301", severity=0.5))
        assert change_of(first) is None
        assert change_of(second) is None
        assert [r["code"] for r in second["results"]] == [PXS_CODE]
        # The embeddings are kept all the same: turning change on later compares with them.
        _, dim = stored_vector(gw, second["pxsgate"]["headline"]["sopInstanceUid"])
        assert dim == 21


def test_change_config_is_validated() -> None:
    assert config_from_mapping({}).change.look_back_days == 365.0
    assert config_from_mapping({"change": {"look-back-days": None}}).change.look_back_days \
        is None
    for bad, key in (({"look-back-days": 0}, "change.look-back-days"),
                     ({"look-back-days": "a year"}, "change.look-back-days"),
                     ({"enabled": "yes"}, "change.enabled"),
                     ({"lookback": 3}, "change.lookback")):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"change": bad})
        assert caught.value.path == key


def test_check_config_names_a_bad_change_key(tmp_path: Path) -> None:
    path = tmp_path / "pxsgate.yaml"
    path.write_text("change:\n  look-back-days: -5\n", encoding="utf-8")
    out = pxsgate("check-config", "--config", path, check=False)
    assert out.returncode == 2
    assert "change.look-back-days" in out.stderr


# --- the real model: the embedding its score came from -----------------------------------


@pytest.fixture(scope="module")
def scorer() -> PxsScorer:
    return PxsScorer.load(ModelConfig(device="cpu", batch=BatchConfig(max_size=4)))


def test_the_scorer_hands_out_the_embeddings_its_scores_came_from(scorer: PxsScorer) -> None:
    images = np.stack([preprocess_file_like(visit(10 + i, 1, "20200101")) for i in range(3)])
    scores, embeddings = scorer.score_and_embed(images)
    assert embeddings.shape == (3, 1000)
    assert embeddings.dtype == np.float32
    np.testing.assert_array_equal(embeddings, scorer.embed(images).numpy())
    assert scores == scorer.score_batch(images)
    recomputed = pxs_scores(torch.from_numpy(embeddings), scorer.anchors.embeddings)
    assert scores == [float(s) for s in recomputed]

    worker = InferenceWorker(lambda: scorer, BatchConfig(max_size=4, max_delay_ms=200))
    worker.start()

    async def all_three() -> list[Any]:
        return list(await asyncio.gather(*(worker.score_image(img) for img in images)))

    try:
        answers = asyncio.run(all_three())
    finally:
        worker.stop()
    for answer, score, embedding in zip(answers, scores, embeddings, strict=True):
        assert answer.batch_size == 3
        assert answer.score == pytest.approx(score, rel=1e-6)
        np.testing.assert_allclose(answer.embedding, embedding, rtol=1e-5, atol=1e-6)


def preprocess_file_like(ds: Dataset) -> np.ndarray:
    """The model image the service makes of ``ds``."""
    return preprocess_pixels(ds.pixel_array, str(ds.PhotometricInterpretation))


async def test_change_with_the_demo_model(tmp_path: Path, scorer: PxsScorer) -> None:
    path = write_config(tmp_path / "pxsgate.yaml", tmp_path / "data", settle=0.2)
    path.write_text(path.read_text() + "preprocess:\n  workers: 1\nmodel:\n  device: cpu\n",
                    encoding="utf-8")
    configure_logging("json", "info")
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        first = await scored(gw, visit(9, 1, "20200101", severity=0.1))
        second = await scored(gw, visit(9, 2, "20200108", severity=0.8))
        this_vec, prior_vec = [scorer.embed(np.stack([preprocess_file(
            (await gw.store.instance_paths([sop]))[sop])])).numpy()[0]
            for sop in (second["pxsgate"]["headline"]["sopInstanceUid"],
                        first["pxsgate"]["headline"]["sopInstanceUid"])]
    finally:
        await gw.stop()
    assert change_of(first) is None
    entry = change_of(second)
    assert entry is not None
    assert second["model"]["weightsSha256"] == scorer.info.weights_sha256
    assert entry["change"]["intervalDays"] == 7.0
    # The scorer's own embeddings of the same images, rounded to float16 as the store does.
    expected = change.distance(change.pack(this_vec), change.pack(prior_vec), 1000)
    assert entry["change"]["distance"] == pytest.approx(expected, rel=1e-6)
    assert entry["change"]["distance"] == pytest.approx(
        float(np.linalg.norm(this_vec - prior_vec)), rel=1e-2)
    assert entry["change"]["scoreDifference"] == pytest.approx(
        headline_score(second) - headline_score(first), abs=2e-6)


# --- the store: which result is a prior, and how it is found -----------------------------

MODEL = ModelInfo("Pxs", "1", "tests", "d", "2026-01-01T00:00:00+00:00", "0" * 64,
                  anchors_sha256="a" * 64)


async def put(store: Store, study: str, patient: str, when: str | None, vector: list[float],
              *, status: str = "SUCCEEDED", model: ModelInfo = MODEL,
              find_prior: bool = False) -> dict[str, Any]:
    """Store a result of ``study`` (one image, its SOP UID ``study``.1) the way the pipeline
    does; return the document as stored."""
    image = ScoredImage(f"{study}.1", f"{study}.9", sum(vector), 1,
                        np.array(vector, dtype=np.float32))
    created = "2026-11-26T10:00:00.000+00:00"
    scores = [image] if status == "SUCCEEDED" else []
    doc = build_document(status=status, identity=StudyIdentity(study, patient, "A", when),
                         site_id="H", model=model, created_at=created, updated_at=created,
                         scores=scores, exit_code=0 if scores else 2,
                         error_message="" if scores else "failed")
    time_key = change.study_time_key(when, created)
    embeddings = StudyEmbeddings(
        (ImageEmbedding(image.sop_instance_uid, image.series_instance_uid, image.score,
                        len(vector), change.pack(np.array(vector))),),
        time_key, model.weights_sha256, model.anchors_sha256,
        prior_from="" if find_prior else None) if scores else None
    async with store.transaction() as tx:  # as the study's code stores a result
        prior = await tx.prior_image(doc, embeddings)
        if prior is not None:
            entry = change.change_entry(image, change.pack(np.array(vector)), time_key, prior)
            doc = doc.with_entry(entry)
        await tx.add_result(doc, StudyState.STORED, embeddings=embeddings)
    return doc.to_json()


async def test_only_current_succeeded_results_of_the_same_weights_are_priors(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "pxsgate.sqlite3")
    await store.open()
    try:
        key = store.patient_key("MRN9")

        async def prior_of(before: str, weights: str = "0" * 64, not_before: str = ""
                           ) -> str | None:
            found = await store.prior_image(key, weights, before=before, not_before=not_before)
            return None if found is None else found.result_id

        old = await put(store, "1.9.1", "MRN9", "2020-01-01T08:00:00", [1.0, 0.0])
        assert await prior_of("2020-02-01T08:00:00") == old["id"]
        # Re-scored: the study's new result is the prior, its old one no longer.
        new = await put(store, "1.9.1", "MRN9", "2020-01-01T08:00:00", [2.0, 0.0])
        assert await prior_of("2020-02-01T08:00:00") == new["id"]
        # Other weights, another patient, the same time, beyond the look-back: no prior.
        assert await prior_of("2020-02-01T08:00:00", weights="1" * 64) is None
        assert await store.prior_image(store.patient_key("MRN8"), "0" * 64,
                                       before="2020-02-01T08:00:00") is None
        assert await prior_of("2020-01-01T08:00:00") is None
        assert await prior_of("2020-02-01T08:00:00", not_before="2020-01-02T00:00:00") is None
        # Its latest result FAILED: the study has no current score, so it is no prior.
        await put(store, "1.9.1", "MRN9", "2020-01-01T08:00:00", [], status="FAILED")
        assert await prior_of("2020-02-01T08:00:00") is None

        # Through store_result: the change is computed from the stored float16 vectors.
        await put(store, "1.9.2", "MRN9", "2020-03-01", [0.0, 0.5])
        doc = await put(store, "1.9.3", "MRN9", None, [3.0, 4.5], find_prior=True)
        found = doc["results"][-1]["change"]
        assert found["priorStudyInstanceUid"] == "1.9.2"
        assert found["priorStudyDate"] == "2020-03-01"  # as the prior's document has it
        assert found["distance"] == 5.0
        assert found["scoreDifference"] == pytest.approx(7.5 - 0.5)
        assert found["intervalDays"] > 2000  # no StudyDate: its time is when it was scored
        assert_valid(doc)
    finally:
        await store.close()


async def test_prior_lookup_is_served_by_the_index(tmp_path: Path) -> None:
    store = Store(tmp_path / "pxsgate.sqlite3")
    await store.open()
    try:
        for patient in range(20):
            for study in range(10):
                await put(store, f"1.8.{patient}.{study}", f"P{patient}",
                          f"20{10 + study}-01-01", [float(study)] * 8)
        await store.db.execute("ANALYZE")
        params = {"patient": store.patient_key("P3"), "weights": "0" * 64,
                  "before": "2018-06-01T00:00:00", "not_before": "2017-06-01T00:00:00",
                  "study": "1.8.3.8"}
        async with store.db.execute("EXPLAIN QUERY PLAN " + PRIOR_IMAGE_SQL, params) as cur:
            plan = [str(row[3]) for row in await cur.fetchall()]
        assert any(step.startswith("SEARCH e USING INDEX embeddings_prior (patient_key=? "
                                   "AND weights_sha256=? AND study_time>? AND study_time<?)")
                   for step in plan), plan
        assert not any(step.startswith("SCAN") for step in plan), plan
        assert not any("TEMP B-TREE" in step for step in plan), plan
        found = await store.prior_image(params["patient"], "0" * 64,
                                        before=params["before"],
                                        not_before=params["not_before"])
        assert found is not None
        assert found.study_instance_uid == "1.8.3.8"
    finally:
        await store.close()


async def test_the_schema_knows_the_change_entry(tmp_path: Path) -> None:
    store = Store(tmp_path / "pxsgate.sqlite3")
    await store.open()
    try:
        await put(store, "1.7.1", "MRN7", "2020-01-01", [0.0, 1.0])
        doc = await put(store, "1.7.2", "MRN7", "2020-01-02", [1.0, 1.0], find_prior=True)
        stored = await store.result(doc["id"])
    finally:
        await store.close()
    assert stored == doc
    # The typed document reads the stored one back to the same JSON, key order included.
    assert json.dumps(ResultDocument.from_json(doc).to_json()) == json.dumps(doc)
    validator = schema_validator()
    assert validator.is_valid(doc)
    score, entry = doc["results"]
    found = entry["change"]
    assert (found["distance"], found["intervalDays"], entry["value"]) == (1.0, 1.0, "1")

    def with_results(*results: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {**doc, "results": list(results), **fields}

    assert not validator.is_valid(with_results(score, entry, entry)), "one change at most"
    assert not validator.is_valid(with_results(entry)), "scores first"
    assert not validator.is_valid(with_results(score, {**entry, "change": {}}))
    assert not validator.is_valid(with_results(score, {k: v for k, v in entry.items()
                                                       if k != "change"}))
    assert not validator.is_valid(with_results({**score, "change": found}))
    assert not validator.is_valid(with_results(score, {**entry, "derivedFrom":
                                                       entry["derivedFrom"][:1]}))
    assert not validator.is_valid(with_results(
        score, entry, status="FAILED", exitCode=2, errorMessage="x")), "only on SUCCEEDED"


async def test_a_version_4_store_is_migrated(tmp_path: Path) -> None:
    db_path = tmp_path / "pxsgate.sqlite3"
    db = sqlite3.connect(db_path)
    for number, script in enumerate(MIGRATIONS[:4], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    old = {"id": "22222222-2222-4222-8222-222222222222", "studyInstanceUid": "1.2.4",
           "patientId": "MRN2", "accessionNumber": "A2", "status": "SUCCEEDED",
           "createdAt": "2026-11-26T10:00:00.000+01:00", "model": {"id": "PxsScore-0.1"},
           "results": [{"code": PXS_CODE, "value": "0.5"}, {"code": PXS_CODE, "value": "0.25"}],
           "pxsgate": {"headline": {"value": "0.5"}, "studyDateTime": "2020-01-01T08:00:00"}}
    db.execute("""INSERT INTO results (id, study_instance_uid, patient_id, accession_number,
                      model_id, status, created_at, document, created_utc)
                  VALUES (?,?,?,?,?,?,?,?,?)""",
               (old["id"], "1.2.4", "MRN2", "A2", "PxsScore-0.1", "SUCCEEDED",
                old["createdAt"], json.dumps(old), "2026-11-26T09:00:00.000Z"))
    db.commit()
    db.close()
    store = Store(db_path)
    await store.open()
    try:
        # A result stored after the migration finds the migrated store's tables.
        await put(store, "1.2.5", "MRN2", "2020-02-01", [1.0], find_prior=True)
        names, rows = await store.researcher_rows()
    finally:
        await store.close()
    assert names == RESEARCH_COLUMNS
    by_id = {r[0]: dict(zip(names, r, strict=True)) for r in rows}
    migrated = by_id[old["id"]]
    assert json.loads(migrated["image_scores"]) == [0.5, 0.25]
    assert (migrated["change_distance"], migrated["score_change"],
            migrated["interval_days"]) == (None, None, None)
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("SELECT count(*) FROM embeddings").fetchone() == (1,)
    db.close()


# --- export-dataset ---------------------------------------------------------------------------


async def test_export_dataset_is_de_identified_csv_with_the_change(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        sent = [visit(6, 2, "20200301", severity=0.5), visit(6, 1, "20200101"),
                visit(7, 1, "20200201", severity=0.2), visit(8, 1, "20200401", view="PA")]
        docs = [await scored(gw, ds) for ds in sent]
    assert [d["status"] for d in docs] == ["SUCCEEDED"] * 3 + ["SKIPPED"]
    later, earlier = docs[0], docs[1]
    assert change_of(later) is None, "March came in before January: nothing to compare"

    config = tmp_path / "pxsgate.yaml"
    out = tmp_path / "dataset.csv"
    run = pxsgate("export-dataset", "--config", config, "--out", out)
    assert run.stdout == ""
    assert run.stderr.strip() == f"wrote 4 row(s) to {out}"
    text = out.read_text(encoding="utf-8")
    assert pxsgate("export-dataset", "--config", config).stdout == text  # stdout alike
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == RESEARCH_COLUMNS
    assert len(rows) == 4
    assert [(r["patient_hash"], r["study_date"]) for r in rows] == sorted(
        (r["patient_hash"], r["study_date"]) for r in rows)
    by_id = {r["result_id"]: r for r in rows}
    assert by_id[earlier["id"]]["change_distance"] == ""

    # A third study of patient 6, in April: its prior is March's, in the export too.
    async with gateway(tmp_path) as (gw, _):
        latest = await scored(gw, visit(6, 3, "20200401", severity=0.9))
    april = change_of(latest)
    assert april is not None
    rows = list(csv.DictReader(io.StringIO(
        pxsgate("export-dataset", "--config", config).stdout)))
    mine = {r["result_id"]: r for r in rows}[latest["id"]]
    assert float(mine["change_distance"]) == pytest.approx(april["change"]["distance"])
    assert float(mine["score_change"]) == pytest.approx(
        april["change"]["scoreDifference"])
    assert float(mine["interval_days"]) == 31.0
    assert mine["study_date"] == "2020-04-01"
    assert json.loads(mine["image_scores"]) == [float(latest["results"][0]["value"])]
    patient6 = [r for r in rows if r["patient_hash"] == mine["patient_hash"]]
    assert [r["study_date"] for r in patient6] == ["2020-01-01", "2020-03-01", "2020-04-01"]

    # Nothing that names the patient or the study: IDs, names, accessions, UIDs.
    full = pxsgate("export-dataset", "--config", config).stdout
    for ds in [*sent, visit(6, 3, "20200401")]:
        for value in (ds.PatientID, str(ds.PatientName), ds.AccessionNumber,
                      ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert str(value) not in full, value

    # Filters, as for `pxsgate results`.
    assert len(list(csv.DictReader(io.StringIO(pxsgate(
        "export-dataset", "--config", config, "--model", "Fast-2").stdout)))) == 5
    assert list(csv.DictReader(io.StringIO(pxsgate(
        "export-dataset", "--config", config, "--model", "PxsScore-0.1").stdout))) == []
    assert list(csv.DictReader(io.StringIO(pxsgate(
        "export-dataset", "--config", config, "--since", "2999-01-01").stdout))) == []
    bad = pxsgate("export-dataset", "--config", config, "--since", "yesterday", check=False)
    assert bad.returncode == 2
    assert "since" in bad.stderr


async def test_a_version_5_store_is_migrated_with_receptions_and_kinds(tmp_path: Path) -> None:
    """Migration 6 (issue 17): the instances a version-5 store holds are images (they could
    re-open their study, as before) and each has one reception, from its last association."""
    db_path = tmp_path / "pxsgate.sqlite3"
    db = sqlite3.connect(db_path)
    for number, script in enumerate(MIGRATIONS[:5], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    db.execute("""INSERT INTO instances (sop_instance_uid, study_instance_uid,
                      series_instance_uid, sop_class_uid, transfer_syntax_uid, path, size,
                      sha256, calling_ae, called_ae, peer_address, association_id,
                      received_at, receive_count)
                  VALUES ('1.2.9.1', '1.2.9', '1.2.9.0', '1.2.840.10008.5.1.4.1.1.1',
                          '1.2.840.10008.1.2', '/x', 1, 'ab', 'ROUTER', 'PxsScore',
                          '127.0.0.1', 'a000007', '2026-11-26T10:00:00.000+01:00', 2)""")
    db.commit()
    db.close()
    store = Store(db_path)
    await store.open()
    try:
        detail = await store.study_detail("1.2.9")
    finally:
        await store.close()
    assert detail is None  # no study row: the instance alone was inserted here
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("SELECT kind FROM instances").fetchall() == [("image",)]
    assert db.execute("SELECT sop_instance_uid, association_id, calling_ae, outcome "
                      "FROM receptions").fetchall() == [("1.2.9.1", "a000007", "ROUTER", "new")]
    assert db.execute("SELECT count(*) FROM made_instances").fetchone() == (0,)
    db.close()
