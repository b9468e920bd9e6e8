"""Delivery of stored results: the outbox (:mod:`.outbox`: retries, dead letters,
idempotent delivery ids) and the exporters behind it, one module a protocol:

- :mod:`.http`: the result document POSTed as JSON;
- :mod:`.dicom`: a Comprehensive SR C-STOREd to a PACS (built by :mod:`.sr`);
- :mod:`.dicomweb`: the same SR stored by STOW-RS in a DICOMweb archive;
- :mod:`.hl7v2`: an HL7 v2.5.1 ORU^R01 sent by MLLP (TLS optional) to an interface engine,
  RIS or EHR, its ACK judged (AA delivered, AE retried, AR dead).
"""

from __future__ import annotations

from collections.abc import Sequence

from pxsgate.config import ExporterConfig
from pxsgate.delivery.dicom import DicomSrExporter
from pxsgate.delivery.dicomweb import StowSrExporter
from pxsgate.delivery.hl7v2 import Hl7Exporter
from pxsgate.delivery.http import HttpExporter
from pxsgate.delivery.outbox import Exporter
from pxsgate.store import Store


def build_exporters(configs: Sequence[ExporterConfig], store: Store) -> dict[str, Exporter]:
    exporters: dict[str, Exporter] = {}
    for i, config in enumerate(configs):
        key = f"exporters[{i}]"
        if config.type == "http":
            exporters[config.name] = HttpExporter(config, key)
        elif config.type == "dicomweb":
            exporters[config.name] = StowSrExporter(config, store, key)
        elif config.type == "hl7":
            exporters[config.name] = Hl7Exporter(config, store, key)
        else:
            exporters[config.name] = DicomSrExporter(config, store)
    return exporters
