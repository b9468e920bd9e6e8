"""The store enforces each study job's state machine (records.TRANSITIONS), against a real
SQLite file through the Store API; and its released migrations stay as they were."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pxsgate.records import (
    UNFINISHED_STATES,
    ReceivedInstance,
    ScoredImage,
    StudyState,
    now_iso,
)
from pxsgate.results import ModelInfo, ResultDocument, StudyIdentity, build_document
from pxsgate.store import MIGRATIONS, Store

MODEL = ModelInfo("PxsScore", "0.1", "tests", "state machine tests",
                  "2026-01-01T00:00:00+00:00", "ab" * 32, anchors_sha256="cd" * 32)
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
STUDY = "1.2.826.0.1.3680043.10.543.77"

# SHA-256 of each released migration's text: a view or table built from constants (the
# JSON paths, the views' shared columns) must not change what a released migration says.
MIGRATION_DIGESTS = (
    "5ac3c523f035c8d213c8df30ca4bf66e28d759109608434b06a8259a8377bfb4",  # 1
    "70fda66e0789e5281439ebf565a4a3202e5cd18d2f507a3d1641b9e3af618203",  # 2
    "98d7ee5e323dadca77b8cb03803fe027b0f11ae5338565cb2f575b7b17724036",  # 3
    "c693aeeeeb81a56ab95e615b66803d6e447402697636b926e2943e6ac132c45a",  # 4
    "6c97575d04a724324cd0501ff77ef376b581471bcebe8cfef3cb9bdb42f29708",  # 5
    "e8751455034afbccb4a79b12a39b0f4494c0cfa2173931bf1003bab16307e63f",  # 6
    "13497e9259550a73e820119fee7528bb684e29f1435216b841dcdb604ec31fce",  # 7
    "cd6519059d98776916709e5d4e613bbde1e00ea7e98db93e689b898b25e9508c",  # 8
    "48b16cbb8d4d2ab7fac48e3a2e79edd6db54e22ce27d1923788139e5c6206e15",  # 9
    "a9cf5a81c935ec791128c883b524814aec4378ff716869fc623088963883ee7d",  # 10
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The store on each backend: SQLite's file, and a fresh PostgreSQL database."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = Store(tmp_path / "pxsgate.sqlite3", url=url, node="node-a")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def receive(store: Store, tmp: Path) -> None:
    """One image of STUDY, indexed: the study is receiving."""
    inst = ReceivedInstance(
        sop_instance_uid=f"{STUDY}.1.1", sop_class_uid=DX_IMAGE, study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=tmp / "image.dcm", size=1, sha256="00" * 32, calling_ae="MODALITY",
        called_ae="PXSGATE", peer_address="127.0.0.1", association_id="a1",
        received_at=now_iso())
    await store.record_instance(inst, deadline=time.time(), settle_seconds=0.0)


def document(status: str) -> ResultDocument:
    ok = status == "SUCCEEDED"
    return build_document(
        status=status, identity=StudyIdentity(STUDY, "MRN1", "ACC1"), site_id="TEST",
        model=MODEL, created_at=now_iso(), updated_at=now_iso(),
        scores=[ScoredImage(f"{STUDY}.1.1", f"{STUDY}.1", 4.2)] if ok else [],
        exit_code=0 if ok else 2, error_message="" if ok else "inference failed")


async def state(store: Store) -> str:
    row = await store.study(STUDY)
    assert row is not None
    return row.state


async def finished(store: Store, tmp: Path, status: str) -> None:
    """STUDY with its result stored and its one delivery settled."""
    await receive(store, tmp)
    await store.mark_study(STUDY, "ready", now_iso(), only_from=UNFINISHED_STATES)
    outcome = "stored" if status == "SUCCEEDED" else "failed"
    (delivery,) = await store.store_result(document(status), outcome, exporters=["x"])
    if status == "SUCCEEDED":
        await store.delivery_done(delivery, now_iso())
    else:
        await store.delivery_failed(delivery, "refused", now_iso(), None)


async def test_an_exported_study_is_not_moved_to_inferring(store: Store,
                                                           tmp_path: Path) -> None:
    await finished(store, tmp_path, "SUCCEEDED")
    assert await state(store) == StudyState.EXPORTED
    await store.mark_study(STUDY, "inferring", now_iso())
    assert await state(store) == StudyState.EXPORTED
    attempts = await store.begin_attempt(STUDY, now_iso())
    assert (await state(store), attempts) == (StudyState.EXPORTED, 0)
    # A result stored meanwhile (a late retry) leaves the study where it is.
    await store.store_result(document("SUCCEEDED"), "stored")
    assert await state(store) == StudyState.EXPORTED


async def test_a_move_the_table_does_not_allow_is_refused(store: Store,
                                                          tmp_path: Path) -> None:
    await finished(store, tmp_path, "SUCCEEDED")
    with pytest.raises(ValueError, match="exported"):
        await store.mark_study(STUDY, "inferring", now_iso(), only_from=("exported",))
    with pytest.raises(ValueError, match="scored"):
        await store.mark_study(STUDY, "scored", now_iso())  # no such state
    assert await state(store) == StudyState.EXPORTED


async def test_a_failed_study_stays_failed_when_its_deliveries_settle(
        store: Store, tmp_path: Path) -> None:
    await finished(store, tmp_path, "FAILED")
    assert await state(store) == StudyState.FAILED


async def test_an_unfinished_job_resumes_at_ready(store: Store, tmp_path: Path) -> None:
    """receiving -> ready -> selected -> inferring, then (a restart) back to ready; a late
    image re-opens it to receiving, which a move to selected must not overwrite."""
    await receive(store, tmp_path)
    await store.mark_study(STUDY, "selected", now_iso(), only_from=("ready",))
    assert await state(store) == StudyState.RECEIVING  # not ready yet: refused
    await store.mark_study(STUDY, "ready", now_iso(), only_from=UNFINISHED_STATES)
    await store.mark_study(STUDY, "selected", now_iso(), only_from=("ready",))
    assert await store.begin_attempt(STUDY, now_iso()) == 1
    assert await state(store) == StudyState.INFERRING
    await store.mark_study(STUDY, "ready", now_iso(), only_from=UNFINISHED_STATES)
    assert await state(store) == StudyState.READY
    await receive(store, tmp_path)  # the same bytes: a duplicate leaves it as it is
    assert await state(store) == StudyState.READY


def test_released_migrations_are_unchanged() -> None:
    digests = tuple(hashlib.sha256(m.encode()).hexdigest() for m in MIGRATIONS)
    assert digests == MIGRATION_DIGESTS
