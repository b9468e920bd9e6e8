"""The DICOM exporters: a Comprehensive SR per result (TID 1500 measurement of the PXS score,
referencing the source images; built by :mod:`pxsgate.delivery.sr`), C-STOREd to a PACS
(here) or sent by STOW-RS (:mod:`pxsgate.delivery.dicomweb`).

It raises ExportError for what a later try may fix (connection refused, timeouts, DICOM
failure statuses) and PermanentExportError for what it cannot (a result whose source images
are no longer in the spool, a superseded result, an SR that cannot be built).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from pxsgate.config import ExporterConfig
from pxsgate.document import ResultDocument
from pxsgate.errors import ConfigError, ExportError, PermanentExportError
from pxsgate.pictures import PictureStore
from pxsgate.records import now_iso
from pxsgate.store import MadeInstance, Store

# C-STORE statuses that mean stored (PS3.4 B.2.3): success and the three warnings.
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _source_uids(document: ResultDocument) -> list[str]:
    """The scored images of the result: the SR's evidence. Only the PXS score entries: a
    pxs.change entry also names the prior image, of another study (and maybe long gone
    from the spool), which the SR does not report."""
    return [uid for entry in document.scores for uid in entry.source_uids]


def _read_headers(paths: Sequence[Path]) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in paths]


class SrExporter:
    """A Comprehensive SR per result (and, with ``objects: [sr, secondary-capture]``, a
    Secondary Capture showing the score), sent to a PACS by the subclass's protocol. Each
    object's SOP Instance UID derives from the result id and the exporter, so a delivery
    sent twice is the same instance to the PACS. The objects of one study for one exporter
    share a series per kind; a rescore's has the next InstanceNumber, and its SR names the
    SR it supersedes (PredecessorDocumentsSequence). Each is registered in the store before
    it is sent, so that a router sending the study back brings it in as pxsgate's own,
    which never re-opens the study."""

    def __init__(self, config: ExporterConfig, store: Store, *,
                 jpeg_roundtrip: bool = False, pictures: PictureStore | None = None) -> None:
        self.name = config.name
        self._config = config
        self._store = store
        self._jpeg_roundtrip = jpeg_roundtrip  # the service's preprocessing, for the SC
        self._pictures = pictures  # the model inputs saved when the study was scored

    async def start(self) -> None:
        return None

    async def deliver(self, delivery_id: str, document: ResultDocument) -> None:
        for dataset in await self._build_objects(document):
            await self._send(dataset)

    async def close(self) -> None:
        return None

    async def _send(self, dataset: Dataset) -> None:
        raise NotImplementedError

    async def _build_objects(self, document: ResultDocument) -> list[Dataset]:
        """What the exporter sends for the result, in ``objects`` order."""
        objects = []
        for kind in self._config.objects:
            if kind == "sr":
                objects.append(await self._build(document))
            else:
                objects.append(await self._build_sc(document))
        return objects

    async def _sources(self, document: ResultDocument, uids: Sequence[str]) -> dict[str, Path]:
        """The files of the result's images; PermanentExportError when one is gone from the
        spool or the result is no longer its study's current one."""
        paths = await self._store.instance_paths(list(uids))
        missing = [u for u in uids if u not in paths or not paths[u].exists()]
        if missing:
            raise PermanentExportError(
                f"{len(missing)} source image(s) of the result are no longer in the spool")
        if not await self._store.is_current(document.id):
            # The study was scored again while this delivery waited: an SR of the old score
            # would take the next number and supersede the newer one in PACS.
            raise PermanentExportError(
                "superseded: the study was scored again; its newer result's SR is sent")
        return paths

    async def _build(self, document: ResultDocument) -> Dataset:
        """The result's SR, registered as pxsgate's own; PermanentExportError when it cannot
        be built (its images gone from the spool, a newer result, a header it cannot use)."""
        from pxsgate.delivery import sr  # highdicom loads only where an SR exporter is configured

        uids = _source_uids(document)
        paths = await self._sources(document, uids)
        result_id = document.id
        study_uid = document.study_instance_uid
        made, previous = await self._store.made_instance(
            result_id=result_id, exporter=self.name, study_uid=study_uid,
            sop_class_uid=ComprehensiveSRStorage,  # what build_pxs_sr makes
            sop_instance_uid=sr.uid_from_id(f"{result_id}/{self.name}/sr"),
            series_instance_uid=sr.uid_from_id(f"{study_uid}/{self.name}/sr-series"),
            at=now_iso())
        try:
            sources = await asyncio.to_thread(_read_headers, [paths[u] for u in uids])
            return sr.build_pxs_sr(
                document.to_json(), sources, sop_instance_uid=made.sop_instance_uid,
                series_instance_uid=made.series_instance_uid,
                instance_number=made.instance_number,
                previous_versions=[_reference(previous)] if previous is not None else ())
        except Exception as exc:
            await self._forget(made, exc, "SR")

    async def _build_sc(self, document: ResultDocument) -> Dataset:
        """The result's Secondary Capture (the headline image's model input with the score
        burned in), registered as pxsgate's own under ``{exporter}/sc``."""
        from pxsgate.delivery import sc, sr

        json_doc = document.to_json()
        try:
            headline = sc.headline_uid(json_doc)
        except sr.SrError as exc:
            raise PermanentExportError(f"cannot build the secondary capture: {exc}") from exc
        paths = await self._sources(document, [headline])
        result_id, study_uid = document.id, document.study_instance_uid
        made, _ = await self._store.made_instance(
            result_id=result_id, exporter=f"{self.name}/sc", study_uid=study_uid,
            sop_class_uid=SecondaryCaptureImageStorage,
            sop_instance_uid=sr.uid_from_id(f"{result_id}/{self.name}/sc"),
            series_instance_uid=sr.uid_from_id(f"{study_uid}/{self.name}/sc-series"),
            at=now_iso())
        try:
            path = paths[headline]
            (source,) = await asyncio.to_thread(_read_headers, [path])
            model_input = await asyncio.to_thread(self._model_input, headline, path)
            return sc.build_pxs_sc(json_doc, source, model_input,
                                   sop_instance_uid=made.sop_instance_uid,
                                   series_instance_uid=made.series_instance_uid,
                                   instance_number=made.instance_number)
        except Exception as exc:
            await self._forget(made, exc, "secondary capture")

    def _model_input(self, sop_uid: str, path: Path) -> Any:
        """What the model saw: the picture saved when it was scored; without one (pictures
        off, or not written) the same preprocessing of the same file (deterministic)."""
        from pxsgate.preprocess import CROP_TO, preprocess_file

        if self._pictures is not None:
            saved = self._pictures.load_model_input(sop_uid)
            if saved is not None and saved.shape == (CROP_TO, CROP_TO):
                return saved
        return preprocess_file(path, jpeg_roundtrip=self._jpeg_roundtrip)

    async def _forget(self, made: MadeInstance, exc: Exception, what: str) -> NoReturn:
        """An object that could not be built is never sent: it must not be named as a
        predecessor or take a number."""
        from pxsgate.delivery import sr

        await self._store.forget_made_instance(made.sop_instance_uid)
        if isinstance(exc, sr.SrError | PermanentExportError):
            raise PermanentExportError(f"cannot build the {what}: {exc}") from exc
        # highdicom's messages may quote header values: not kept.
        raise PermanentExportError(f"cannot build the {what}: {type(exc).__name__}") from exc


class DicomSrExporter(SrExporter):
    """The SR by C-STORE, one association per delivery."""

    def __init__(self, config: ExporterConfig, store: Store, *,
                 jpeg_roundtrip: bool = False, pictures: PictureStore | None = None) -> None:
        if config.host is None or config.port is None or config.ae_title is None:
            raise ConfigError(config.name, "a dicom exporter needs host, port and ae-title")
        super().__init__(config, store, jpeg_roundtrip=jpeg_roundtrip, pictures=pictures)
        self._host, self._port, self._called = config.host, config.port, config.ae_title

    async def _send(self, dataset: Dataset) -> None:
        from pxsgate.delivery import sr

        try:
            status = await asyncio.to_thread(
                sr.send_dataset, dataset, host=self._host, port=self._port,
                called_ae=self._called, calling_ae=self._config.calling_ae_title,
                timeout=self._config.timeout_seconds)
        except Exception as exc:
            raise ExportError(str(exc)) from exc
        if status not in STORED:
            raise ExportError(f"C-STORE to {self._called}@{self._host}:{self._port} "
                              f"answered 0x{status:04X}")


def _reference(made: MadeInstance) -> Dataset:
    """An SR pxsgate sent earlier, as build_pxs_sr names its predecessors."""
    ds = Dataset()
    ds.SOPClassUID = made.sop_class_uid
    ds.SOPInstanceUID = made.sop_instance_uid
    ds.StudyInstanceUID = made.study_instance_uid
    ds.SeriesInstanceUID = made.series_instance_uid
    return ds
