"""Several gateways on one PostgreSQL database (storage.database), against a private
PostgreSQL cluster (tests/postgres.py): each node's studies visible from every node, each
delivery sent once, a node killed mid-stream losing nothing, a prior scored on one node
giving change on another, a SQLite store copied over; and the store answering the same
on both backends."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pxsgate.records import ReceivedInstance, ScoredImage, Status, StudyState, now_iso
from pxsgate.results import ModelInfo, StudyIdentity, build_document
from pxsgate.store import AuditEntry, ResultFilter, Store, StudyEmbeddings, WorklistFilter
from pxsgate.store.results import ImageEmbedding
from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets

from .conftest import Service, pxsgate, start_service, stop_service
from .http_receiver import Receiver, http_receiver
from .test_lifecycle import wait_until
from .test_outbox import http_exporter

MODEL = ModelInfo("PxsScore", "0.1", "tests", "backend tests",
                  "2026-01-01T00:00:00+00:00", "ab" * 32, anchors_sha256="cd" * 32)
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def ap_study(index: int, seed: int, date: str, prefix: str = "PG") -> list[Any]:
    """One AP chest image of patient ``{prefix}-{index}``: a study per seed, on ``date``."""
    st = synth.make_study(index, seed=seed, prefix=prefix, description="XR CHEST PORTABLE",
                          study_date=date)
    px = synth.chest_radiograph(np.random.default_rng([index, seed]), rows=256, cols=256,
                                view="AP")
    return [synth.make_image_dataset(
        px, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=st,
        series_description="CHEST AP PORTABLE", view_position="AP", body_part="CHEST",
        series_number=1)]


def node(tmp: Path, name: str, url: str, receiver: Receiver, **storage: Any) -> Service:
    lines = [f"  database: {url}", f"  node-name: {name}", *(
        f"  {k.replace('_', '-')}: {v}" for k, v in storage.items())]
    (tmp / name).mkdir(exist_ok=True)
    return start_service(tmp / name, storage="\n".join(lines) + "\n",
                         extra=http_exporter(receiver.url))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with http_receiver() as r:
        yield r


def test_two_nodes_share_results_priors_and_deliver_each_once(
        tmp_path: Path, pg_url: str, receiver: Receiver) -> None:
    a = node(tmp_path, "node-a", pg_url, receiver)
    b = node(tmp_path, "node-b", pg_url, receiver)
    try:
        first = ap_study(1, seed=1, date="20240101")  # the prior, to node A
        assert send_datasets("127.0.0.1", a.port, first).ok
        a.wait_for([first[0].StudyInstanceUID])
        later = ap_study(1, seed=2, date="20240301")  # same patient, later, to node B
        others = [ap_study(i, seed=i, date="20240105") for i in (2, 3, 4)]
        assert send_datasets("127.0.0.1", b.port, later).ok
        for i, study in enumerate(others):
            assert send_datasets("127.0.0.1", (a, b)[i % 2].port, study).ok
        uids = [s[0].StudyInstanceUID for s in (first, later, *others)]
        docs_b = b.wait_for(uids)
        docs_a = a.wait_for(uids)  # every node's results, from either node
        assert {u: d["id"] for u, d in docs_a.items()} == {u: d["id"] for u, d in docs_b.items()}
        change = [r for r in docs_b[later[0].StudyInstanceUID]["results"]
                  if r.get("code") == "pxs.change"]
        assert change, "the prior scored on node A gives change on node B"
        assert change[0]["change"]["priorSource"] == "pxsgate"
        wait_until(lambda: len(receiver.accepted()) >= len(uids), what="every delivery")
        time.sleep(2.0)  # a second send, if any node were to make one, would come now
        keys = [r.headers["Idempotency-Key"] for r in receiver.accepted()]
        assert len(keys) == len(set(keys)) == len(uids)
        rows = json.loads(pxsgate("outbox", "list", "--config", a.config, "--json").stdout)
        assert sorted(r["id"] for r in rows) == sorted(keys)
        assert {r["state"] for r in rows} == {"delivered"}
    finally:
        assert stop_service(a) == 0
        assert stop_service(b) == 0


def test_a_node_killed_mid_stream_loses_nothing(tmp_path: Path, pg_url: str,
                                               receiver: Receiver) -> None:
    """SIGKILL node A while studies arrive at both nodes, then restart it: every
    acknowledged study has exactly one current result, and every delivery arrived."""
    a = node(tmp_path, "node-a", pg_url, receiver, delivery_lease_seconds=3)
    b = node(tmp_path, "node-b", pg_url, receiver, delivery_lease_seconds=3)
    acknowledged: list[str] = []
    try:
        for i in range(1, 9):
            study = ap_study(10 + i, seed=i, date="20240201")
            target = a if i % 2 else b
            if i == 5:
                os.kill(a.process.pid, signal.SIGKILL)
                a.process.wait(30)
            if i >= 5 and target is a:
                continue  # node A is down: the router sends to B only
            if send_datasets("127.0.0.1", target.port, study).ok:
                acknowledged.append(study[0].StudyInstanceUID)
        a = node(tmp_path, "node-a", pg_url, receiver, delivery_lease_seconds=3)
        a.wait_for(acknowledged)
        ids = {_current_id(b, uid) for uid in acknowledged}  # exactly one current each
        assert len(ids) == len(acknowledged) >= 6
        wait_until(lambda: {_result_of(r) for r in receiver.accepted()} >= ids, timeout=90,
                   what="a delivery of every current result")
    finally:
        assert stop_service(a) == 0
        assert stop_service(b) == 0


def _current_id(svc: Service, uid: str) -> str:
    out = pxsgate("results", "--config", svc.config, "--json", "--study-uid", uid)
    docs = json.loads(out.stdout)
    assert len(docs) == 1, f"{len(docs)} current results for one study"
    return str(docs[0]["id"])


def _result_of(request: Any) -> str:
    return str(request.document["id"])


def test_store_copy_moves_a_sqlite_site_to_postgresql(tmp_path: Path, pg_url: str,
                                                      receiver: Receiver) -> None:
    (tmp_path / "site").mkdir()
    svc = start_service(tmp_path / "site", extra=http_exporter(receiver.url))
    try:
        studies = [ap_study(i, seed=i, date="20240110", prefix="CP") for i in (1, 2)]
        for s in studies:
            assert send_datasets("127.0.0.1", svc.port, s).ok
        svc.wait_for([s[0].StudyInstanceUID for s in studies])
        wait_until(lambda: len(receiver.accepted()) >= 2, what="the deliveries")
    finally:
        assert stop_service(svc) == 0
    db = svc.data_dir / "pxsgate.sqlite3"
    out = pxsgate("store", "copy", "--from", f"sqlite:{db}", "--to", pg_url)
    assert "copied" in out.stdout
    before = json.loads(pxsgate("results", "--config", svc.config, "--json",
                                "--history").stdout)
    moved = node(tmp_path, "site-pg", pg_url, receiver)
    try:
        after = json.loads(pxsgate("results", "--config", moved.config, "--json",
                                   "--history").stdout)
        assert after == before  # the same documents, byte for byte as JSON
        # The one-shot commands read the shared store as they read SQLite's.
        uid = studies[0][0].StudyInstanceUID
        cfg = str(moved.config)
        assert "SUCCEEDED" in pxsgate("trace", uid, "--config", cfg).stdout
        assert "results" in pxsgate("status", "--config", cfg).stdout.lower()
        csv = pxsgate("export-dataset", "--config", cfg).stdout.splitlines()
        assert len(csv) == 3
        assert "pxs_score" in csv[0]
        listed = json.loads(pxsgate("outbox", "list", "--config", cfg, "--json").stdout)
        assert {r["state"] for r in listed} == {"delivered"}
        again = pxsgate("store", "copy", "--from", f"sqlite:{db}", "--to", pg_url,
                        check=False)
        assert again.returncode != 0
        assert "not empty" in again.stderr
    finally:
        assert stop_service(moved) == 0


# --- the store on both backends ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str | None]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return tmp_path / "pxsgate.sqlite3", url


async def _fill(store: Store, tmp: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Two studies of one patient scored, one FAILED: their UIDs, and the documents stored
    (as built, in their own field order)."""
    uids = []
    built = []
    for i, (date, score) in enumerate((("20240101", 1.25), ("20240301", 2.5), ("", None))):
        uid = f"1.2.826.0.1.3680043.10.543.9{i}"
        uids.append(uid)
        inst = ReceivedInstance(
            sop_instance_uid=f"{uid}.1.1", sop_class_uid=DX, study_instance_uid=uid,
            series_instance_uid=f"{uid}.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=tmp / f"{i}.dcm", size=100 + i, sha256=f"{i:02d}" * 32, calling_ae="MOD",
            called_ae="PXSGATE", peer_address="127.0.0.1", association_id=f"a{i}",
            received_at=now_iso())
        await store.record_instance(inst, deadline=time.time(), settle_seconds=0.5)
        identity = StudyIdentity(uid, "PAT-1", f"ACC-{i}",
                                 f"{date[:4]}-{date[4:6]}-{date[6:]}T08:00:00" if date else None)
        images = [] if score is None else [ScoredImage(f"{uid}.1.1", f"{uid}.1", score)]
        document = build_document(
            status=Status.SUCCEEDED if images else Status.FAILED, identity=identity,
            site_id="Hospital", model=MODEL, created_at=now_iso(), updated_at=now_iso(),
            scores=images, exit_code=0 if images else 2,
            error_message="" if images else "decoding failed")
        built.append(document.to_json())
        embeddings = None if score is None else StudyEmbeddings(
            (ImageEmbedding(f"{uid}.1.1", f"{uid}.1", score, 4,
                            np.arange(4, dtype="<f2").tobytes()),),
            f"{date[:4]}-{date[4:6]}-{date[6:]}T08:00:00", "ab" * 32, "cd" * 32,
            prior_from="")
        async with store.transaction() as tx:
            await tx.prior_image(document, embeddings)
            await tx.add_result(document, StudyState.STORED, exporters=("x",),
                                embeddings=embeddings)
    return uids, built


async def test_the_store_answers_the_same_on_both_backends(
        backend: tuple[Path, str | None], tmp_path: Path) -> None:
    path, url = backend
    store = Store(path, url=url, node="n1")
    await store.open()
    try:
        uids, built = await _fill(store, tmp_path)
        docs = await store.results(ResultFilter())
        assert [d["studyInstanceUid"] for d in docs] == uids
        # Read back as stored, fields in the document's order too (JSONB keeps its own).
        assert [json.dumps(d) for d in docs] == [json.dumps(b) for b in built]
        assert await store.result(docs[0]["id"]) == docs[0]
        prior = await store.prior_image(store.patient_key("PAT-1"), "ab" * 32,
                                        before="2024-03-01T08:00:00")
        assert prior is not None
        assert prior.study_instance_uid == uids[0]
        assert prior.vector == np.arange(4, dtype="<f2").tobytes()
        rows, more = await store.worklist_page(WorklistFilter(), 10)
        assert not more
        assert [r.study_instance_uid for r in rows] == list(reversed(uids))
        assert [r.score for r in rows] == [None, 2.5, 1.25]
        failed, _ = await store.worklist_page(WorklistFilter(status="FAILED"), 10)
        assert [r.study_instance_uid for r in failed] == [uids[2]]
        high, _ = await store.worklist_page(WorklistFilter(score_min=2.0), 10)
        assert [r.study_instance_uid for r in high] == [uids[1]]
        assert await store.find_study(store.study_label_hashed(uids[1])) == uids[1]
        assert await store.scored_before(uids[0])
        assert await store.delivery_counts() == {"pending": 3}
        names, research = await store.researcher_rows()
        assert "pxs_score" in names
        assert len(research) == 3
        column = names.index("pxs_score")
        assert sorted(r[column] for r in research if r[column] is not None) == [1.25, 2.5]
        last = await store.last_results(3)
        assert {type(r[6]) for r in last} == {int}  # exitCode, typed on both
        assert sorted(r[3] for r in last if r[3] is not None) == ["1.25", "2.5"]
        trend = await store.trend_rows("2000-01-01T00:00:00.000Z")
        assert len(trend) == 3
        claimed = await store.due_deliveries(time.time() + 1, ["x"], 10)
        assert len(claimed) == 3
        assert await store.due_deliveries(time.time() + 1, ["x"], 10) == []  # leased
        async with store.db.execute("SELECT count(*) FROM support_view") as cur:
            assert (await cur.fetchone())[0] == 3
        audit_id = await store.record_audit(AuditEntry(now_iso(), "rita", "reviewer",
                                                       "login", 0))
        assert audit_id >= 1
        with pytest.raises(Exception, match="append-only"):
            await store.db.execute("DELETE FROM audit")
        assert await store.schema_version() == 10
    finally:
        await store.close()


async def test_a_lease_passes_to_another_node_only_when_it_runs_out(pg_url: str,
                                                                    tmp_path: Path) -> None:
    a = Store(tmp_path / "a", url=pg_url, node="a")
    b = Store(tmp_path / "b", url=pg_url, node="b")
    await a.open()
    await b.open()
    try:
        a.delivery_lease_seconds = b.delivery_lease_seconds = 60
        await _fill(a, tmp_path)
        now = time.time() + 1
        mine = await a.due_deliveries(now, ["x"], 2)
        theirs = await b.due_deliveries(now, ["x"], 10)
        assert len(mine) == 2
        assert len(theirs) == 1
        assert {d.id for d in mine}.isdisjoint(d.id for d in theirs)
        assert await b.due_deliveries(now + 30, ["x"], 10) == []  # A's lease holds
        taken = await b.due_deliveries(now + 61, ["x"], 10)  # A died: its lease ran out
        assert {d.id for d in taken} == {d.id for d in mine} | {d.id for d in theirs}
        # Node B's pending studies are its own: A's are not resumed by B.
        assert await b.pending_studies() == []
        assert len(await a.pending_studies()) == 3  # still receiving: A's to resume
    finally:
        await a.close()
        await b.close()


async def test_a_hung_server_is_an_error_then_the_store_reconnects(pg_url: str,
                                                                  tmp_path: Path) -> None:
    """The server process serving the store stops answering (SIGSTOP): the next statement
    is a StoreError after the client's deadline, not a wait for ever; once the server
    answers again, the store opens a new connection and goes on."""
    from pxsgate.errors import StoreError
    from pxsgate.store.db import PostgresDatabase

    store = Store(tmp_path / "unused", url=pg_url, node="n1")
    await store.open()
    try:
        db = store.db
        assert isinstance(db, PostgresDatabase)
        db.timeout_s = 1.0
        async with db.execute("SELECT pg_backend_pid()") as cur:
            pid = int((await cur.fetchone())[0])
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not answer in 1 s"):
                await store.results(ResultFilter())
            # The deadline, then psycopg's own wait for the server to take the cancel (5 s).
            assert time.monotonic() - started < 10
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await store.results(ResultFilter()) == []  # a new connection
        async with db.execute("SELECT pg_backend_pid()") as cur:
            assert int((await cur.fetchone())[0]) != pid
    finally:
        await store.close()
