"""``pxsgate priors backfill``: results stored before priors from PACS were enabled get the
change they lack.

For each current SUCCEEDED result without a change entry (created since ``--since``), the
patient's prior is looked up in the store and, when there is none, fetched from the PACS as
the service does (priors.source; C-GET or DICOMweb: a C-MOVE would land on the running
service's port). When a prior is then found, the result is stored again as its study's
current result with the change entry (the earlier one stays, as history); the new result is
delivered to the exporters only with ``--deliver``. Safe beside the running service: it
writes through the store's transactions, and a result rescored meanwhile is left alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pxsgate import change
from pxsgate.config import Config
from pxsgate.document import ResultDocument
from pxsgate.errors import ConfigError
from pxsgate.infer import ImageResult, InferenceWorker, Scorer, load_scorer
from pxsgate.priors.finder import LookupRequest, PriorFinder
from pxsgate.priors.source import make_source
from pxsgate.records import PriorImage, ScoredImage, now_iso
from pxsgate.results import exporters_for
from pxsgate.store import Store, StudyEmbeddings, store_for
from pxsgate.store.priors import ResultWithoutChange


@dataclass
class Tally:
    results: int = 0  # without a change, looked at
    changed: int = 0  # stored again with their change
    fetched: int = 0  # lookups that fetched a prior from the PACS
    no_prior: int = 0
    superseded: int = 0  # rescored meanwhile: left alone


class Progress:
    """A progress bar on a terminal; a line every tenth of the way otherwise (logs)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self._total = max(total, 1)
        self._out = out
        self._tty = out.isatty()
        self._shown = -1

    def update(self, done: int, tally: Tally) -> None:
        share = done / self._total
        if self._tty:
            bar = "#" * int(share * 30)
            self._out.write(f"\r[{bar:<30}] {done}/{self._total} "
                            f"changed {tally.changed}, fetched {tally.fetched}")
            if done >= self._total:
                self._out.write("\n")
            self._out.flush()
            return
        tenth = int(share * 10)
        if tenth != self._shown:
            self._shown = tenth
            print(f"{done}/{self._total} results: changed {tally.changed}, "
                  f"fetched {tally.fetched}", file=self._out, flush=True)


def _with_change(item: ResultWithoutChange, prior: PriorImage,
                 lookup_document: ResultDocument) -> ResultDocument:
    h = item.headline
    entry = change.change_entry(ScoredImage(h.sop_instance_uid, h.series_instance_uid,
                                            h.score, 1), h.vector, item.study_time, prior)
    return dataclasses.replace(lookup_document.with_entry(entry), id=str(uuid.uuid4()),
                               updated_at=now_iso())


async def backfill(config: Config, *, since: str | None = None, deliver: bool = False,
                   out: TextIO = sys.stderr,
                   scorer_factory: Callable[[], Scorer] | None = None) -> Tally:
    """Give the stored results without a change theirs (see the module's docstring)."""
    priors = config.priors
    if priors.source is None:
        raise ConfigError("priors.source", "is required for priors backfill")
    if priors.source.type == "dimse" and priors.source.retrieve == "c-move":
        raise ConfigError("priors.source.retrieve",
                          "backfill retrieves by C-GET or DICOMweb: a C-MOVE's instances "
                          "would go to the running service (set retrieve: c-get for it)")
    if not config.change.enabled:
        raise ConfigError("change.enabled", "change over time is off: nothing to backfill")
    store = store_for(config)
    await store.open()
    jpeg = config.preprocess.jpeg_roundtrip
    worker = InferenceWorker(scorer_factory or (lambda: load_scorer(
        config.model, jpeg_roundtrip=jpeg)), config.model.batch)
    source = make_source(priors.source, None, "")
    try:
        model = await asyncio.to_thread(worker.start)

        async def embed(path: Path) -> ImageResult:
            from pxsgate.preprocess import preprocess_file

            image = await asyncio.to_thread(preprocess_file, path, jpeg_roundtrip=jpeg)
            return await worker.score_image(image, "prior")

        finder = PriorFinder(priors, source, store, embed, selection=lambda: config.selection,
                             priors_dir=config.storage.data_dir / "priors-backfill",
                             weights_sha256=model.weights_sha256,
                             anchors_sha256=model.anchors_sha256)
        finder.clear_leftovers()
        try:
            items = await store.results_without_change(model.weights_sha256, since)
            tally = Tally(results=len(items))
            progress = Progress(len(items), out)
            progress.update(0, tally)
            for done, item in enumerate(items, start=1):
                await _one(item, store, finder, config, deliver, tally)
                progress.update(done, tally)
        finally:
            await finder.close()
    finally:
        await asyncio.to_thread(worker.stop)
        await store.close()
    return tally


async def _one(item: ResultWithoutChange, store: Store, finder: PriorFinder, config: Config,
               deliver: bool, tally: Tally) -> None:
    document = item.document
    embeddings = StudyEmbeddings(
        images=(item.headline,), study_time=item.study_time,
        weights_sha256=item.weights_sha256, anchors_sha256=item.anchors_sha256,
        prior_from=change.look_back_start(item.study_time, config.change.look_back_days))
    uid = document.study_instance_uid
    prior = await store.prior_for(document.patient_id, uid, embeddings)
    if prior is None:
        assert embeddings.prior_from is not None
        # No wait limit here: the source's own timeout bounds each query and retrieval.
        lookup = await finder.lookup(LookupRequest(document.patient_id, uid,
                                                   item.study_time, embeddings.prior_from),
                                     wait_seconds=3600.0)
        document = document.with_prior_lookup(lookup)
        if lookup.outcome == "found":
            tally.fetched += 1
        prior = await store.prior_for(document.patient_id, uid, embeddings)
    if prior is None:
        tally.no_prior += 1
        return
    try:
        updated = _with_change(item, prior, document)
    except ValueError:  # a stored vector of another size: no change entry
        tally.no_prior += 1
        return
    exporters = exporters_for(config.exporters, updated) if deliver else []
    if await store.add_backfilled_result(item.document.id, updated, exporters):
        tally.changed += 1
    else:
        tally.superseded += 1
