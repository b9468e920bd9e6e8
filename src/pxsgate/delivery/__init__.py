"""Delivery of stored results: the outbox (:mod:`.outbox`: retries, dead letters,
idempotent delivery ids) and the exporters behind it, one module a protocol:

- :mod:`.http`: the result document POSTed as JSON;
- :mod:`.dicom`: a Comprehensive SR C-STOREd to a PACS (built by :mod:`.sr`), and with
  ``objects`` a Secondary Capture of the score burned into the model input (:mod:`.sc`);
- :mod:`.dicomweb`: the same SR stored by STOW-RS in a DICOMweb archive;
- :mod:`.fhir`: a FHIR R4 transaction Bundle (score and change Observations, a
  DiagnosticReport, the model's Device) POSTed to a FHIR server's base URL;
- :mod:`.hl7v2`: an HL7 v2.5.1 ORU^R01 sent by MLLP (TLS optional) to an interface engine,
  RIS or EHR, its ACK judged (AA delivered, AE retried, AR dead).
"""

from __future__ import annotations

from collections.abc import Sequence

from pxsgate.config import ExporterConfig
from pxsgate.delivery.dicom import DicomSrExporter
from pxsgate.delivery.dicomweb import StowSrExporter
from pxsgate.delivery.fhir import FhirExporter
from pxsgate.delivery.hl7v2 import Hl7Exporter
from pxsgate.delivery.http import HttpExporter
from pxsgate.delivery.outbox import Exporter
from pxsgate.pictures import PictureStore
from pxsgate.store import Store


def build_exporters(configs: Sequence[ExporterConfig], store: Store, *,
                    jpeg_roundtrip: bool = False,
                    pictures: PictureStore | None = None) -> dict[str, Exporter]:
    """The configured exporters by name; ``jpeg_roundtrip``: the service's preprocessing
    (a secondary capture shows the model input it makes), ``pictures``: where the model
    inputs are kept (read instead of decoding the image again)."""
    exporters: dict[str, Exporter] = {}
    for i, config in enumerate(configs):
        key = f"exporters[{i}]"
        if config.type == "http":
            exporters[config.name] = HttpExporter(config, key)
        elif config.type == "dicomweb":
            exporters[config.name] = StowSrExporter(config, store, key, pictures=pictures)
        elif config.type == "fhir":
            exporters[config.name] = FhirExporter(config, key)
        elif config.type == "hl7":
            exporters[config.name] = Hl7Exporter(config, store, key)
        else:
            exporters[config.name] = DicomSrExporter(config, store,
                                                     jpeg_roundtrip=jpeg_roundtrip,
                                                     pictures=pictures)
    return exporters
