"""Reviews in validation (issue 22): `pxsgate evaluate --exclude-rejected` and
`pxsgate export-dataset --exclude-rejected` leave out the studies whose latest review is
wrong-image-used, wrong-patient or not-a-valid-exam; a later "confirmed" takes a study back,
and reviews of a superseded result count for its study."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

from pxsgate.store import Store

from .conftest import pxsgate
from .test_evaluate import Study, evaluate, make_store, report, write_csv

STUDIES = [Study(i, float(i)) for i in range(1, 9)]
OUTCOMES = [0, 1, 0, 1, 0, 1, 0, 1]
# (study number, verdicts oldest first): rejected are 2 (wrong-patient), 5 (not valid),
# 7 (wrong-image-used after a confirmation); 3 was rejected, then confirmed.
REVIEWS = {2: ["wrong-patient"], 3: ["wrong-image-used", "confirmed"],
           5: ["not-a-valid-exam"], 7: ["confirmed", "wrong-image-used"]}
REJECTED = {2, 5, 7}


def _reviewed(tmp: Path) -> Path:
    config = make_store(tmp, STUDIES)

    async def review() -> None:
        store = Store(tmp / "data" / "pxsgate.sqlite3")
        await store.open()
        try:
            for n, verdicts in REVIEWS.items():
                uid = STUDIES[n - 1].uid
                result = await store.current_result_id(uid)
                assert result is not None
                for verdict in verdicts:
                    await store.add_review(result, uid, "rita", verdict, "", "2026-03-02")
        finally:
            await store.close()

    asyncio.run(review())
    return config


def test_evaluate_excludes_rejected_studies(tmp_path: Path) -> None:
    config = _reviewed(tmp_path)
    outcomes = write_csv(tmp_path / "outcomes.csv", ["study_instance_uid", "outcome"],
                         [[s.uid, str(o)] for s, o in zip(STUDIES, OUTCOMES, strict=True)])
    every = evaluate(config, outcomes, tmp_path / "all", "--rounds", "50")
    assert every.returncode == 0, every.stderr
    assert report(tmp_path / "all")["n"] == len(STUDIES)
    kept = evaluate(config, outcomes, tmp_path / "kept", "--rounds", "50", "--exclude-rejected")
    assert kept.returncode == 0, kept.stderr
    data = report(tmp_path / "kept")
    assert data["n"] == len(STUDIES) - len(REJECTED)
    assert data["inputs"]["exclude_rejected"] is True
    # The rejected studies' rows are now unmatched (no such scored study).
    assert data["rows"]["unmatched"] == len(REJECTED)


def test_export_dataset_excludes_rejected_studies(tmp_path: Path) -> None:
    config = _reviewed(tmp_path)

    def rows(*args: str) -> list[dict[str, str]]:
        text = pxsgate("export-dataset", "--config", config, *args).stdout
        return list(csv.DictReader(io.StringIO(text)))

    every = rows()
    kept = rows("--exclude-rejected")
    assert len(every) == len(STUDIES)
    assert len(kept) == len(STUDIES) - len(REJECTED)
    scores = sorted(round(float(r["pxs_score"])) for r in kept)
    assert scores == sorted(n for n in range(1, 9) if n not in REJECTED)
