"""A real Orthanc (the Debian /usr/sbin/Orthanc, never the system service) for tests: its own
JSON configuration, storage and index under a tmp folder, DICOM and HTTP on free loopback
ports, the GDCM plugin loaded, and small REST helpers (urllib).

    with orthanc_server(tmp, modalities={"pxsgate": ("PxsScore", "127.0.0.1", 11112)},
                        lua="function OnStableStudy(...) ... end") as orthanc:
        orthanc.upload(path)
        orthanc.store("pxsgate", [study_id])

Orthanc's log is kept in ``tmp/orthanc.log``; its tail is printed when the body of the
``with`` fails (pytest shows it with the failure) and is in ``Orthanc.log_tail()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

# A remote modality: (AET, host, port), or Orthanc's own object form with AllowStore etc.
Modality = tuple[str, str, int] | Mapping[str, Any]


def orthanc_binary() -> Path:
    """/usr/sbin/Orthanc, or the test fails (CI: .ci/run must install orthanc and
    orthanc-gdcm) or skips. Without the GDCM plugin Orthanc 1.10 cannot encode JPEG 2000 and
    quietly sends uncompressed data instead."""
    for path, package in ((ORTHANC, "orthanc"), (GDCM_PLUGIN, "orthanc-gdcm")):
        if not path.exists():
            if os.environ.get("CI"):
                pytest.fail(f"{path} is missing: .ci/run must install {package}")
            pytest.skip(f"{path} is not installed (apt-get install {package})")
    return ORTHANC


def orthanc_dicomweb_plugin() -> Path:
    """Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb), or the test fails under CI
    (.ci/run must install it) or skips."""
    orthanc_binary()
    if not DICOMWEB_PLUGIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DICOMWEB_PLUGIN} is missing: .ci/run must install orthanc-dicomweb")
        pytest.skip(f"{DICOMWEB_PLUGIN} is not installed (apt-get install orthanc-dicomweb)")
    return DICOMWEB_PLUGIN


class OrthancError(AssertionError):
    """A REST call that Orthanc answered with an HTTP error (its JSON error body quoted)."""


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- REST --------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise OrthancError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        answer = self.request("POST", path, body)
        return json.loads(answer) if answer.strip() else None

    def upload(self, dicom: Path | bytes) -> dict[str, Any]:
        """POST /instances: one DICOM file; Orthanc's answer (ID, ParentStudy, Status)."""
        data = dicom if isinstance(dicom, bytes) else dicom.read_bytes()
        answer: dict[str, Any] = json.loads(
            self.request("POST", "/instances", data, content_type="application/dicom"))
        return answer

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's identifier of the study with this StudyInstanceUID, if it has one."""
        found = self.post("/tools/lookup", study_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        return ids[0] if ids else None

    def studies(self) -> list[str]:
        ids: list[str] = self.get("/studies")
        return ids

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get(f"/studies/{study_id}/instances")
        return found

    def tags(self, instance_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return found

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def transfer_syntax(self, instance_id: str) -> str:
        return self.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax").decode()

    def instances_of(self, study_uid: str, modality: str | None = None
                     ) -> list[dict[str, Any]]:
        """Simplified tags of each instance of the study (of one Modality if given), with
        Orthanc's identifier as "OrthancId", sorted by InstanceNumber; [] while Orthanc has
        no such study."""
        study = self.study_id(study_uid)
        if study is None:
            return []
        tags = [{**self.tags(i["ID"]), "OrthancId": i["ID"]}
                for i in self.study_instances(study)]
        if modality is not None:
            tags = [t for t in tags if t.get("Modality") == modality]
        return sorted(tags, key=lambda t: int(t.get("InstanceNumber") or 0))

    def store(self, modality: str, resources: Sequence[str], **options: Any) -> Any:
        """POST /modalities/{modality}/store, synchronously: a C-STORE SCU job. Orthanc 1.10
        has no "Transcode" option here (1.10.1 silently ignores one): what goes out is
        transcoded only by negotiation (see orthanc_server's scu_preferred_syntax)."""
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": list(resources), "Synchronous": True, **options})

    def changes(self, change_type: str | None = None) -> list[dict[str, Any]]:
        """Orthanc's change log (/changes), oldest first, of one ChangeType if given."""
        found: list[dict[str, Any]] = []
        since = 0
        while True:
            page = self.get(f"/changes?since={since}&limit=1000")
            found += page["Changes"]
            if page["Done"]:
                break
            since = page["Last"]
        if change_type is not None:
            found = [c for c in found if c["ChangeType"] == change_type]
        return found


def _modality(entry: Modality) -> Any:
    if isinstance(entry, tuple):
        aet, host, port = entry
        return {"AET": aet, "Host": host, "Port": port}
    return dict(entry)


def write_orthanc_config(root: Path, *, aet: str, dicom_port: int, http_port: int,
                         modalities: Mapping[str, Modality], lua: str | None,
                         stable_age: int, scu_preferred_syntax: str | None,
                         extra: Mapping[str, Any] | None) -> Path:
    (root / "storage").mkdir(parents=True, exist_ok=True)
    (root / "index").mkdir(exist_ok=True)
    scripts = []
    if lua is not None:
        script = root / "route.lua"
        script.write_text(lua, encoding="utf-8")
        scripts.append(str(script))
    config: dict[str, Any] = {
        "Name": f"pxsgate-test-{aet}",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "WebDavEnabled": False,
        "Plugins": [str(GDCM_PLUGIN)],
        "LuaScripts": scripts,
        # Only the modalities listed may store, each from the host listed.
        "DicomModalities": {name: _modality(m) for name, m in modalities.items()},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "StableAge": stable_age,
        # Lua's SendToModality keeps its association open this long after its last command
        # (default 5 s); pxsgate assembles a study only after the association is released.
        "DicomAssociationCloseDelay": 0,
        "DicomScuTimeout": 10,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "StorageCompression": False,
        "MaximumStorageSize": 0,
        "MallocArenaMax": 0,
    }
    if scu_preferred_syntax is not None:
        # What Orthanc 1.10's C-STORE SCU transcodes to when the peer does not accept an
        # instance's own transfer syntax (proposed alongside the uncompressed ones).
        config["DicomScuPreferredTransferSyntax"] = scu_preferred_syntax
    config.update(extra or {})
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def orthanc_server(root: Path, *, aet: str = "ORTHANC", dicom_port: int | None = None,
                   modalities: Mapping[str, Modality] | None = None, lua: str | None = None,
                   stable_age: int = 2, scu_preferred_syntax: str | None = None,
                   extra: Mapping[str, Any] | None = None,
                   start_timeout: float = 60) -> Iterator[Orthanc]:
    """Start Orthanc with a fresh configuration under ``root``; yield it once GET /system
    answers; SIGTERM it (then SIGKILL) on exit. On a failure inside the ``with``, the tail
    of Orthanc's log is printed."""
    binary = orthanc_binary()
    root.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = free_port()
    config = write_orthanc_config(
        root, aet=aet, dicom_port=dicom_port, http_port=http_port,
        modalities=modalities or {}, lua=lua, stable_age=stable_age,
        scu_preferred_syntax=scu_preferred_syntax, extra=extra)
    log = (root / "orthanc.log").open("wb")
    # --verbose: the log names each association (calling AET, accepted syntaxes).
    process = subprocess.Popen([str(binary), "--verbose", str(config)], cwd=root,
                               stdout=log, stderr=subprocess.STDOUT)
    orthanc = Orthanc(aet, dicom_port, http_port, root, process)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"Orthanc exited ({process.returncode}) at start-up:\n"
                                     + orthanc.log_tail())
            with contextlib.suppress(OSError, OrthancError, ValueError):
                if orthanc.get("/system").get("DicomAet") == aet:
                    assert "gdcm" in orthanc.get("/plugins"), "the GDCM plugin did not load"
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"Orthanc did not answer within {start_timeout:g} s:\n"
                                     + orthanc.log_tail())
            time.sleep(0.1)
        yield orthanc
    except Exception:
        print(f"--- Orthanc log ({orthanc.log_path}), last lines ---\n{orthanc.log_tail()}")
        raise
    finally:
        _stop(process)
        log.close()
