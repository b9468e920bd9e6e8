"""The quick read-only commands (issue 24): `pxsgate results`, `status`, `trace` and `outbox
list` load neither pydicom, numpy, torch, aiohttp, structlog nor the web UI, which is what
makes them answer in ~0.1 s (benchmarks/cli.py times them; no test here does). What that
took must not change what any command says: the selection rules are still checked by every
command that uses them, and a bad YAML file is still reported with the line it is on."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pxsgate import sopclass
from pxsgate.cli import main
from pxsgate.config import load_config
from pxsgate.errors import ConfigError

from .conftest import pxsgate
from .inprocess import gateway, result_of, send
from .test_lifecycle import ap_study

# Run one command as the console script does, then report what the interpreter had loaded.
RUN_AND_LIST_MODULES = """\
import contextlib, io, json, sys
from pxsgate.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[2:])
with open(sys.argv[1], "w") as report:
    json.dump({"code": code, "stdout": out.getvalue(), "modules": sorted(sys.modules)}, report)
"""
HEAVY_PACKAGES = ("pydicom", "numpy", "torch", "aiohttp", "PIL", "pynetdicom", "structlog",
                  "uvloop", "pylibjpeg", "scipy", "sklearn", "matplotlib")
# pxsgate.ui.passwords (the standard library only) names the minimum length in --help.
HEAVY_PXSGATE = ("pxsgate.matchers", "pxsgate.log", "pxsgate.service.api",
                 "pxsgate.service.gateway", "pxsgate.preprocess", "pxsgate.infer")

BAD_RULE = """selection:
  image-rules:
    - name: ap
      select: {tag: ViewPositon, equals: AP}
"""
BAD_RULE_MESSAGE = ("selection.image-rules[0].select.tag: 'ViewPositon' is not a DICOM "
                    "keyword or a tag number like (0008,103E)")


def loaded_by(config: Path, tmp: Path, *command: str) -> dict[str, Any]:
    report = tmp / "modules.json"
    subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, str(report), *command,
                    "--config", str(config)], check=True, timeout=120)
    found: dict[str, Any] = json.loads(report.read_text())
    return found


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY_PACKAGES or m in HEAVY_PXSGATE
            or (m.startswith("pxsgate.ui.") and m != "pxsgate.ui.passwords")]


async def test_the_read_only_commands_load_nothing_heavy(tmp_path: Path) -> None:
    exporter = ("exporters:\n  - name: results-db\n    type: http\n"
                "    url: http://127.0.0.1:9/x\n    max-attempts: 1\n")
    async with gateway(tmp_path, exporter) as (gw, _model):
        two = ap_study(31, "IMP", images=2)
        await send(gw, two)
        scored = await result_of(gw, str(two[0].StudyInstanceUID))
    config = tmp_path / "pxsgate.yaml"
    uid = scored["studyInstanceUid"]
    for command, shows in ((["results"], "(1 result(s))"),
                           (["status"], "last results"),
                           (["trace", uid], "Computed Radiography Image Storage"),
                           (["outbox", "list"], "results-db")):
        found = await asyncio.to_thread(loaded_by, config, tmp_path, *command)
        assert found["code"] == 0, command
        assert shows in found["stdout"], (command, found["stdout"])
        assert "pxsgate.store" in found["modules"]  # it did read the store
        assert heavy(found["modules"]) == [], command
    # The program turns the cyclic garbage collector off for its one short command; a
    # caller that runs a command with argv keeps its process as it was.
    assert await asyncio.to_thread(main, ["outbox", "list", "--config", str(config)]) == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_bad_rule_is_refused_by_the_commands_that_use_rules(tmp_path: Path) -> None:
    config = tmp_path / "pxsgate.yaml"
    data_dir = tmp_path / "data"
    config.write_text(f"storage:\n  data-dir: {data_dir}\n{BAD_RULE}")
    for command in (["check-config"], ["serve"], ["rules", "test", str(tmp_path)]):
        refused = pxsgate(*command, "--config", config, check=False, timeout=60)
        assert refused.returncode == 2, command
        assert refused.stderr == f"pxsgate: configuration error: {BAD_RULE_MESSAGE}\n"
    # `results` never uses the rules: it answers (here: that there is no store yet).
    results = pxsgate("results", "--config", config, check=False)
    assert results.returncode == 1
    assert "no store at" in results.stderr


def test_rules_left_unchecked_are_checked_when_first_used(tmp_path: Path) -> None:
    config = tmp_path / "pxsgate.yaml"
    config.write_text(BAD_RULE)
    with pytest.raises(ConfigError) as eager:
        load_config(config)
    assert str(eager.value) == BAD_RULE_MESSAGE
    light = load_config(config, skip_dicom_checks=True)  # what `pxsgate results` loads
    with pytest.raises(ConfigError) as late:
        list(light.selection.image_rules)
    assert str(late.value) == BAD_RULE_MESSAGE
    assert [r.name for r in light.selection.study_rules] == ["chest-radiograph"]


def test_transfer_syntaxes_without_pydicom_are_still_uids(tmp_path: Path) -> None:
    def scp(syntaxes: str) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(f"dicom:\n  scp:\n    transfer-syntaxes: [{syntaxes}]\n")
        return path

    mpeg2 = '"1.2.840.10008.1.2.4.100"'  # a UID, but no decoder is installed for it
    with pytest.raises(ConfigError, match="cannot be decoded here"):
        load_config(scp(mpeg2))
    assert load_config(scp(mpeg2), skip_dicom_checks=True).dicom.scp.transfer_syntaxes == (
        "1.2.840.10008.1.2.4.100",)
    with pytest.raises(ConfigError, match="is not a valid DICOM UID"):
        load_config(scp('"1.2.x"'), skip_dicom_checks=True)


@pytest.mark.parametrize(("text", "shown"), [
    ("dicom:\n  scp:\n    port: [1, 2\n", "        port: [1, 2\n              ^"),
    ("http:\n  port: 1\n  port: 2\n", "the key 'port' is given twice\n  in \"<unicode string>\", "
     "line 3, column 3:\n      port: 2\n      ^"),
])
def test_yaml_mistakes_are_shown_where_they_are(tmp_path: Path, text: str, shown: str) -> None:
    """libyaml reads the file (fast), but its messages have no quoted line: a file it
    refuses is read again by PyYAML's own loader, whose message the user sees."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path} is not valid YAML: " in str(info.value)
    assert shown in str(info.value)


def test_the_sop_class_names_known_without_pydicom_are_pydicoms() -> None:
    from pydicom.uid import UID

    for uid, name in sopclass.COMMON_NAMES.items():
        assert name == UID(uid).name, uid
    rare = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic: looked up in pydicom
    assert sopclass.name(rare) == UID(rare).name == "X-Ray Angiographic Image Storage"
    assert sopclass.name("1.2.3.4") == "1.2.3.4"


def test_the_yaml_loaders_read_the_default_file_alike() -> None:
    from pxsgate import config as config_module

    text = (Path(__file__).resolve().parents[1] / "config" / "pxsgate.yaml").read_text()
    assert yaml.load(text, Loader=config_module._UniqueKeyLoader) == config_module._parse_yaml(
        text)
