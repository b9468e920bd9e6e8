"""Configuration: defaults, the paper's Listing 1, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pxsgate.config import Config, config_from_mapping, load_config
from pxsgate.errors import ConfigError

from .conftest import REPO, pxsgate

LISTING_1 = REPO / "tests" / "data" / "listing1.yaml"
DEFAULT = REPO / "config" / "pxsgate.yaml"


def test_default_file_is_the_builtin_default() -> None:
    # The commented file documents the defaults; it must not drift from them.
    assert load_config(DEFAULT) == Config()


def test_listing_1_loads_unchanged() -> None:
    config = load_config(LISTING_1)
    scp = config.dicom.scp
    assert scp.port == 104
    assert [t.ae_title for t in scp.ae_titles] == ["PxsScore"]
    assert scp.max_associations == 4
    assert scp.verification.transfer_syntaxes == (
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
    assert scp.reject_unknown_sources is True
    assert [(s.host_ip, s.ae_title) for s in scp.sources] == [("192.168.1.2", "RMS")]
    assert config.dicom.pipeline_mappings[0].pipeline_id == "112233445566778899aabbccddeeff00"


@pytest.mark.parametrize(
    ("patch", "path", "words"),
    [
        ({"dicom": {"scp": {"port": "eleven"}}}, "dicom.scp.port", "integer"),
        ({"dicom": {"scp": {"port": 70000}}}, "dicom.scp.port", "between"),
        ({"dicom": {"scp": {"max-associations": 0}}}, "dicom.scp.max-associations", "greater"),
        ({"dicom": {"scp": {"ae-titles": [{"ae-title": "X" * 17}]}}},
         "dicom.scp.ae-titles[0].ae-title", "16"),
        ({"dicom": {"scp": {"verification": {"enabled": "yes please"}}}},
         "dicom.scp.verification.enabled", "true or false"),
        ({"dicom": {"scp": {"sources": [{"host-ip": "10.0.0.1"}]}}},
         "dicom.scp.sources[0].ae-title", "required"),
        ({"dicom": {"scp": {"transfer-syntaxes": ["1.2.x"]}}},
         "dicom.scp.transfer-syntaxes", "UID"),
        ({"dicom": {"pipeline-mappings": [{"name": "p", "clara-ae-title": "OTHER"}]}},
         "dicom.pipeline-mappings[0].clara-ae-title", "ae-titles"),
        ({"model": {"batch": {"max-sise": 4}}}, "model.batch.max-sise", "unknown key"),
        ({"assembly": {"settle-seconds": -1}}, "assembly.settle-seconds", "negative"),
        ({"logging": {"format": "xml"}}, "logging.format", "one of"),
        ({"storage": ["not", "a", "mapping"]}, "storage", "mapping"),
        ({"exporterz": []}, "exporterz", "unknown key"),
        ({"exporters": [{"name": "a", "type": "dicomweb"}]}, "exporters[0].url",
         "required for a dicomweb exporter"),
        ({"exporters": [{"name": "a", "type": "dicomweb", "url": "ftp://archive/dicom-web"}]},
         "exporters[0].url", "http(s) URL"),
        ({"exporters": [{"name": "a", "type": "dicomweb", "url": "http://10.1.2.3/dicom-web",
                         "bearer-token-file": "/etc/token"}]}, "exporters[0].url", "https"),
        ({"exporters": [{"name": "a", "type": "dicomweb", "url": "https://a/dicom-web",
                         "statuses": ["FAILED"]}]}, "exporters[0].statuses", "only SUCCEEDED"),
        ({"exporters": [{"name": "a", "type": "dicomweb", "url": "https://a/dicom-web",
                         "host": "pacs"}]}, "exporters[0].host", "dicom exporters only"),
        ({"exporters": [{"name": "a", "type": "http", "url": "https://me:secret@a/api"}]},
         "exporters[0].url", "must not carry a user or password"),
        ({"exporters": [{"name": "a", "type": "dicom", "host": "pacs", "port": 104,
                         "ae-title": "PACS", "statuses": ["SKIPPED"]}]},
         "exporters[0].statuses", "a dicom exporter sends scores"),
        # --- fhir
        ({"exporters": [{"name": "a", "type": "fhir", "patient-id-system": "urn:oid:1.2"}]},
         "exporters[0].url", "required for a fhir exporter"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir"}]},
         "exporters[0].patient-id-system", "required for a fhir exporter"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "MRN"}]},
         "exporters[0].patient-id-system", "absolute URI"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "code-system": "my codes"}]},
         "exporters[0].code-system", "absolute URI"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "score-code": " pxs"}]},
         "exporters[0].score-code", "FHIR code"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "score-code": "pxs-change"}]},
         "exporters[0].score-code", "must differ"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "http://10.0.0.5/fhir",
                         "patient-id-system": "urn:oid:1.2",
                         "bearer-token-file": "/etc/t"}]}, "exporters[0].url", "https"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "statuses": ["FAILED"]}]},
         "exporters[0].statuses", "a fhir exporter sends scores"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "ae-title": "EHR"}]},
         "exporters[0].ae-title", "dicom exporters only"),
        ({"exporters": [{"name": "a", "type": "http", "url": "https://a/api",
                         "patient-id-system": "urn:oid:1.2"}]},
         "exporters[0].patient-id-system", "fhir exporters only"),
        ({"exporters": [{"name": "a", "type": "fhir", "url": "https://ehr/fhir",
                         "patient-id-system": "urn:oid:1.2", "typo-code": "x"}]},
         "exporters[0].typo-code", "unknown key"),
        # --- fhir: end
        # hl7 exporters
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris"}]}, "exporters[0].port",
         "required for an hl7 exporter"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "url": "https://ris/api"}]}, "exporters[0].url",
         "does not apply to hl7 exporters"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "observation-id": "PXS^PXS score^L"}]},
         "exporters[0].observation-id", "HL7 delimiters"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "observation-id": ""}]}, "exporters[0].observation-id",
         "cannot be empty"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "sending-facility": "A\nB"}]}, "exporters[0].sending-facility",
         "control characters"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "statuses": ["SUCCEEDED", "FAILED"]}]}, "exporters[0].statuses",
         "only SUCCEEDED"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "ca-certificates": "/etc/ca.pem"}]}, "exporters[0].ca-certificates",
         "tls: true"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575, "tls": True,
                         "client-certificate": "/etc/c.pem"}]}, "exporters[0].client-key",
         "go together"),
        ({"exporters": [{"name": "a", "type": "hl7", "host": "ris", "port": 2575,
                         "processing-id": "X"}]}, "exporters[0].processing-id", "one of"),
        ({"exporters": [{"name": "a", "type": "http", "url": "https://a/api",
                         "include-phi": True}]}, "exporters[0].include-phi",
         "applies to hl7 exporters only"),
        ({"model": {"backend": "onnx"}}, "model.backend", "one of local, triton"),
        ({"model": {"triton": {"url": "http://triton:8000"}}}, "model.triton.url",
         "must be host:port (no scheme or path)"),
        ({"model": {"triton": {"url": "triton"}}}, "model.triton.url", "must be host:port"),
        ({"model": {"triton": {"protocol": "rest"}}}, "model.triton.protocol", "one of"),
        ({"model": {"triton": {"timeout-seconds": 0}}}, "model.triton.timeout-seconds",
         "greater"),
        ({"priors": {"enabled": True}}, "priors.source", "required when priors are enabled"),
        ({"priors": {"source": {"type": "dimse", "host": "pacs", "port": 104}}},
         "priors.source.ae-title", "required for a dimse source"),
        ({"priors": {"source": {"host": "pacs", "port": 104, "ae-title": "PACS",
                                "retrieve": "c-find"}}}, "priors.source.retrieve", "one of"),
        ({"priors": {"source": {"host": "pacs", "port": 104, "ae-title": "PACS",
                                "move-destination": "NOPE"}}},
         "priors.source.move-destination", "not one of dicom.scp.ae-titles"),
        ({"priors": {"source": {"type": "dicomweb"}}}, "priors.source.url",
         "required for a dicomweb source"),
        ({"priors": {"source": {"type": "dicomweb", "url": "https://u:p@pacs/dicom-web"}}},
         "priors.source.url", "must not carry a user or password"),
        ({"priors": {"source": {"type": "dicomweb", "url": "http://10.0.0.9/dicom-web",
                                "bearer-token-file": "/etc/t"}}}, "priors.source.url",
         "https"),
        ({"priors": {"source": {"type": "dicomweb", "url": "https://pacs/dicom-web",
                                "port": 104}}}, "priors.source.port", "dimse sources only"),
        ({"priors": {"wait-seconds": 0}}, "priors.wait-seconds", "greater"),
        ({"preprocess": {"decode-on-arrival": "yes"}}, "preprocess.decode-on-arrival",
         "true or false"),
        ({"preprocess": {"on-arrival-cache-mb": 0}}, "preprocess.on-arrival-cache-mb",
         "greater"),
        ({"exporters": [{"name": "a", "type": "dicomweb", "url": "https://a/dicom-web",
                         "objects": ["sr", "secondary-capture"]}]},
         "exporters[0].objects", "dicom exporters only"),
        ({"exporters": [{"name": "a", "type": "dicom", "host": "pacs", "port": 104,
                         "ae-title": "PACS", "objects": []}]},
         "exporters[0].objects", "nothing to send"),
        ({"exporters": [{"name": "a", "type": "dicom", "host": "pacs", "port": 104,
                         "ae-title": "PACS", "objects": ["gsps"]}]},
         "exporters[0].objects[0]", "one of"),
        ({"exporters": [{"name": "a", "type": "http", "url": "https://a/api",
                         "when": {"flags-any": ["urgent"]}}]},
         "exporters[0].when.flags-any", "unknown flag(s) urgent"),
        ({"exporters": [{"name": "a", "type": "http", "url": "https://a/api",
                         "when": {"score-at-least": "high"}}]},
         "exporters[0].when.score-at-least", "number"),
        ({"storage": {"database": "postgresql://pxsgate:secret@db:5432/pxsgate"}},
         "storage.database", "must not carry a password"),
        ({"storage": {"database": "postgresql://db/pxsgate?password=secret"}},
         "storage.database", "must not carry a password"),
        ({"storage": {"database": "mysql://db/pxsgate"}}, "storage.database",
         "sqlite or a PostgreSQL URL"),
        ({"storage": {"database": "postgresql://db:5432"}}, "storage.database",
         "with a database name"),
        ({"storage": {"node-name": "gw 1"}}, "storage.node-name", "letters, digits"),
        ({"storage": {"delivery-lease-seconds": 0}}, "storage.delivery-lease-seconds",
         "greater"),
    ],
)
def test_errors_name_the_key_path(patch: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(patch)
    assert info.value.path == path
    assert words in str(info.value)


def test_check_config_command(tmp_path: Path) -> None:
    ok = pxsgate("check-config", "--config", LISTING_1)
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(LISTING_1.read_text())
    data["dicom"]["scp"]["max-associations"] = "four"
    bad.write_text(yaml.safe_dump(data))
    result = pxsgate("check-config", "--config", bad, check=False)
    assert result.returncode == 2
    assert "dicom.scp.max-associations" in result.stderr
    missing = pxsgate("check-config", "--config", tmp_path / "absent.yaml", check=False)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_serve_refuses_a_bad_config_before_opening_a_port(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  scp:\n    port: 11112\n    colour: blue\n")
    result = pxsgate("serve", "--config", bad, check=False, timeout=60)
    assert result.returncode == 2
    assert "dicom.scp.colour" in result.stderr


def test_the_review_flags_are_the_rules_and_the_schemas() -> None:
    """An exporter's when: checks flags against records.REVIEW_FLAGS: the same as the
    rules set and the JSON Schema allows."""
    import json

    from pxsgate import rules
    from pxsgate.records import REVIEW_FLAGS

    set_by_rules = {v for k, v in vars(rules).items() if k.startswith("FLAG_")}
    schema = json.loads((Path(rules.__file__).parent / "schemas"
                         / "result-document.schema.json").read_text())
    in_schema = set(schema["$defs"]["pxsgate"]["properties"]["flags"]["items"]["enum"])
    assert set_by_rules == set(REVIEW_FLAGS) == in_schema


def test_a_fhir_exporter_loads_with_its_defaults() -> None:
    config = config_from_mapping({"exporters": [{
        "name": "ehr", "type": "fhir", "url": "https://ehr.example.org/fhir",
        "patient-id-system": "urn:oid:1.2.840.99999.1", "score-code": "99999-1"}]})
    [fhir] = config.exporters
    assert (fhir.type, fhir.patient_id_system, fhir.score_code) == (
        "fhir", "urn:oid:1.2.840.99999.1", "99999-1")
    assert fhir.code_system is None  # the exporter's default: urn:pxsgate:codes
    assert fhir.wanted_statuses == ("SUCCEEDED",)
