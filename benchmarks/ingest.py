"""Ingest: instances/s and MB/s received into the spool from DCMTK storescu over loopback,
side by side with DCMTK's own storescp and with Orthanc on the same files in the same run.

    python -m benchmarks.ingest [--files 20] [--rows 3000 --cols 2500] [--repeats 5]
                                [--pdu-sizes 16384,65536] [--no-orthanc]

Receivers, each fed the same files by ``/usr/bin/storescu`` in one association:
  storescp   DCMTK's storescp +B (bit-preserving writes, no fsync: its best case)
  orthanc    Debian's Orthanc (/usr/sbin/Orthanc, a process of its own, never the system
             service): storage and SQLite index in a fresh temporary folder, SyncStorageArea
             on (each file fsynced before its Success), any calling AE accepted, no plugins,
             its largest PDU (131072 bytes, storescp's here too; its default is 16384);
             left out, and said so, where it is not installed
  pxsgate    pxsgate serve's receiver (fsync + rename + SQLite index before each Success),
             with its default maximum PDU (262144 bytes)
  pxsgate+j2k  the same, while a second storescu feeds JPEG 2000 AP chests that the service
             decodes and scores at the same time (settle 0: decoding overlaps ingest)
  pxsgate pdu=N  pxsgate advertising a maximum PDU of N bytes (the sender's P-DATA PDUs are
             at most that long), for each N of --pdu-sizes
  pxsgate stow-rs  the same files by STOW-RS (POST /dicomweb/studies) in one
             multipart/related request streamed from a file by a separate client process
             (http.client), to the same checks, fsync and index (pxsgate.stow)
Writes benchmarks/results/ingest-<date>.json and prints a table with the ratios
(pxsgate / storescp, pxsgate / Orthanc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import JPEG2000Lossless

from benchmarks import common
from benchmarks.common import STORESCP, STORESCU, free_port
from pxsgate.config import Config
from pxsgate.decode import auto_workers
from pxsgate.delivery.dicomweb import multipart_related
from pxsgate.service.gateway import Gateway
from pxsgate.tools import synth


def make_files(directory: Path, count: int, rows: int, cols: int, *, j2k: bool = False,
               seed: int = 7) -> list[Path]:
    rng = np.random.default_rng(seed)
    study = synth.make_study(0, seed=seed, prefix="J2K" if j2k else "INGEST",
                             description="XR CHEST PORTABLE")
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = synth.chest_radiograph(rng, rows=rows, cols=cols, view="AP")
        ds = synth.make_image_dataset(
            pixels, sop_class_uid=synth.CR_IMAGE_STORAGE, modality="CR", study=study,
            series_description="CHEST AP PORTABLE", view_position="AP", body_part="CHEST",
            image_type=("DERIVED", "PRIMARY"), series_number=i + 1, instance_number=1)
        if j2k:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = directory / f"{'j2k' if j2k else 'raw'}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run([STORESCU, *extra, "-aec", "PxsScore", "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True)
    return time.perf_counter() - started


# The STOW-RS client, a process of its own as storescu is: streams the body file in 1 MiB
# blocks; fails unless every instance was stored (HTTP 200).
STOW_CLIENT = """
import http.client, sys
port, path, ctype = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600, blocksize=1 << 20)
with open(path, "rb") as body:
    conn.request("POST", "/dicomweb/studies", body=body, headers={"Content-Type": ctype})
answer = conn.getresponse()
text = answer.read()
sys.exit(0 if answer.status == 200 else f"HTTP {answer.status}: {text[:500]!r}")
"""


def stow_body(files: list[Path], path: Path) -> tuple[Path, str]:
    """The files as one multipart/related request body, written to ``path``."""
    body, content_type = multipart_related([f.read_bytes() for f in files])
    path.write_bytes(body)
    return path, content_type


def stow_send(port: int, body: Path, content_type: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", STOW_CLIENT, str(port), str(body), content_type],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def storescp_once(files: list[Path], out: Path) -> float:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([STORESCP, "+B", "-pdu", "131072", "-od", str(out), str(port)])
    try:
        time.sleep(0.5)
        return send(port, files)
    finally:
        proc.terminate()
        proc.wait()


ORTHANC = Path("/usr/sbin/Orthanc")


def orthanc_version() -> str | None:
    """Orthanc's version, or None where it is not installed."""
    if not ORTHANC.exists():
        return None
    out = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True)
    words = (out.stdout.splitlines() or [""])[0].split()
    return words[-1] if words else "unknown"


def orthanc_config(root: Path, dicom_port: int, http_port: int) -> Path:
    """A configuration of Orthanc's own for one run: everything under ``root``."""
    config = {
        "Name": "pxsgate-ingest-benchmark",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,  # storescu calls PxsScore, as it does pxsgate
        "DicomAlwaysAllowStore": True,  # any calling AE title, from any host
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "SyncStorageArea": True,  # fsync() of each stored file (Orthanc >= 1.7.4's default)
        "StorageCompression": False,
        "MaximumPduLength": 131072,  # the most Orthanc allows; storescp -pdu 131072 here
        # HTTP only to see that it is up: loopback, nothing else reachable.
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "WebDavEnabled": False,
        "Plugins": [],
        "LuaScripts": [],
        "SaveJobs": False,
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def orthanc_once(files: list[Path], root: Path, start_timeout: float = 60) -> float:
    """Start Orthanc, wait until it answers, time storescu into it, stop it."""
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(root, dicom_port, http_port)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with (root / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(config)], cwd=root, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"Orthanc exited ({proc.returncode}) at start-up; "
                                     f"see {root / 'orthanc.log'}")
                try:
                    with opener.open(f"http://127.0.0.1:{http_port}/system", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"Orthanc did not answer in {start_timeout:g} s; "
                                         f"see {root / 'orthanc.log'}") from None
                    time.sleep(0.1)
            elapsed = send(dicom_port, files)
            with opener.open(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as answer:
                stored = json.load(answer)["CountInstances"]
            if stored != len(files):
                raise SystemExit(f"Orthanc stored {stored} of {len(files)} instances")
            return elapsed
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def pxsgate_once(files: list[Path], data: Path, j2k: list[Path] | None,
                       pdu: int | None = None,
                       stow: tuple[Path, str] | None = None) -> float:
    """One run of the gateway; ``stow``: the body and Content-Type to POST by STOW-RS
    instead of sending the files by C-STORE."""
    base = Config()
    scp = replace(base.dicom.scp, host="127.0.0.1", port=0)
    if pdu is not None:
        scp = replace(scp, max_pdu_size=pdu)
    config = replace(
        base,
        dicom=replace(base.dicom, scp=scp),
        storage=replace(base.storage, data_dir=data, min_free_mb=64),
        # No HTTP API (nothing to collide with) unless it is STOW-RS that is measured.
        http=replace(base.http, host="127.0.0.1",
                     port=free_port() if stow is not None else 0),
        # Without decode load, keep scoring out of the measured window.
        assembly=replace(base.assembly, settle_seconds=0.0 if j2k else 600.0),
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        load = None
        if j2k:
            load = asyncio.create_task(asyncio.to_thread(send, gateway.port, j2k, "-R", "-xv"))
            await asyncio.sleep(1.0)  # the first J2K studies are being decoded by now
        if stow is not None:
            elapsed = await asyncio.to_thread(stow_send, gateway.http_port, *stow)
        else:
            elapsed = await asyncio.to_thread(send, gateway.port, files)
        if load is not None:
            await load
    finally:
        await gateway.stop(grace=1.0)
    return elapsed


def run(count: int, rows: int, cols: int, repeats: int,
        pdu_sizes: tuple[int, ...] = (), orthanc: bool = True) -> dict[str, Any]:
    """Every receiver ``repeats`` times, in turns. ``orthanc``: include Orthanc where it is
    installed."""
    version = orthanc_version() if orthanc else None
    with tempfile.TemporaryDirectory(prefix="pxsgate-ingest-") as tmp:
        root = Path(tmp)
        files = make_files(root / "raw", count, rows, cols)
        j2k = make_files(root / "j2k", max(4, count // 2), rows, cols, j2k=True, seed=8)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        stow = stow_body(files, root / "stow-body")
        times: dict[str, list[float]] = {"storescp": [], "pxsgate": [], "pxsgate+j2k": [],
                                         "pxsgate stow-rs": []}
        if version is not None:
            times["orthanc"] = []
        times.update({f"pxsgate pdu={n}": [] for n in pdu_sizes})
        for r in range(repeats):  # interleaved, so drift in the machine hits all alike
            times["storescp"].append(storescp_once(files, root / f"scp{r}"))
            if version is not None:
                times["orthanc"].append(orthanc_once(files, root / f"orthanc{r}"))
            times["pxsgate"].append(asyncio.run(pxsgate_once(files, root / f"gw{r}", None)))
            times["pxsgate+j2k"].append(asyncio.run(pxsgate_once(files, root / f"gj{r}", j2k)))
            times["pxsgate stow-rs"].append(
                asyncio.run(pxsgate_once(files, root / f"gs{r}", None, stow=stow)))
            for n in pdu_sizes:
                times[f"pxsgate pdu={n}"].append(
                    asyncio.run(pxsgate_once(files, root / f"gp{n}-{r}", None, n)))
    figures: dict[str, Any] = {
        "benchmark": "ingest",
        "environment": common.environment("cpu"),
        "files": count, "image": f"{cols}x{rows} 12-bit CR, explicit VR LE",
        "total_mb": round(total_mb, 1), "repeats": repeats,
        "cpu_cores": os.cpu_count(), "decode_workers": auto_workers(os.cpu_count() or 1),
        "orthanc": version or ("not installed" if orthanc else "left out (--no-orthanc)"),
        "receivers": {},
    }
    for name, values in times.items():
        median = statistics.median(values)
        figures["receivers"][name] = {
            "median_s": round(median, 3), "spread_s": round(max(values) - min(values), 3),
            "runs_s": [round(v, 3) for v in values],
            "instances_per_s": round(count / median, 2), "mb_per_s": round(total_mb / median, 1),
        }
    rec = figures["receivers"]
    figures["ratio_pxsgate_vs_storescp"] = round(
        rec["pxsgate"]["mb_per_s"] / rec["storescp"]["mb_per_s"], 3)
    if "orthanc" in rec:
        figures["ratio_pxsgate_vs_orthanc"] = round(
            rec["pxsgate"]["mb_per_s"] / rec["orthanc"]["mb_per_s"], 3)
    figures["ratio_stow_vs_cstore"] = round(
        rec["pxsgate stow-rs"]["mb_per_s"] / rec["pxsgate"]["mb_per_s"], 3)
    figures["drop_while_decoding"] = round(
        1 - rec["pxsgate+j2k"]["mb_per_s"] / rec["pxsgate"]["mb_per_s"], 3)
    return figures


def headlines(figures: dict[str, Any]) -> list[dict[str, Any]]:
    rec = figures["receivers"]
    ratio = figures["ratio_pxsgate_vs_storescp"]
    scp = rec["storescp"]
    stow, cstore = rec["pxsgate stow-rs"], rec["pxsgate"]
    versus_orthanc = []
    if "orthanc" in rec:
        orthanc = rec["orthanc"]
        versus_orthanc = [common.headline(
            f"ingest: pxsgate beside Orthanc {figures['orthanc']} on the same files "
            "(fsync per file + SQLite index per instance, both)", cstore["mb_per_s"], "MB/s",
            spread_text=f"{cstore['instances_per_s']} inst/s",
            reference=f"Orthanc, SyncStorageArea on: {orthanc['mb_per_s']} MB/s "
                      f"(spread {orthanc['spread_s']} s of {orthanc['median_s']} s)",
            ratio=figures["ratio_pxsgate_vs_orthanc"])]
    return [
        common.headline(
            f"ingest: pxsgate receiving {figures['files']} x {figures['image']} over loopback "
            "(fsync + SQLite index per instance)", rec["pxsgate"]["mb_per_s"], "MB/s",
            spread_text=f"{rec['pxsgate']['instances_per_s']} inst/s; spread "
                        f"{rec['pxsgate']['spread_s']} s of {rec['pxsgate']['median_s']} s",
            reference=f"DCMTK storescp +B, no fsync: {scp['mb_per_s']} MB/s "
                      f"(spread {scp['spread_s']} s)",
            ratio=ratio, goal=">= storescp's rate", met=ratio >= 1.0),
        *versus_orthanc,
        common.headline(
            "ingest: pxsgate receiving the same files by STOW-RS (one multipart/related "
            "request; fsync + SQLite index per instance)", stow["mb_per_s"], "MB/s",
            spread_text=f"{stow['instances_per_s']} inst/s; spread "
                        f"{stow['spread_s']} s of {stow['median_s']} s",
            reference=f"pxsgate by C-STORE (storescu), same run: {cstore['mb_per_s']} MB/s",
            ratio=figures["ratio_stow_vs_cstore"], goal=">= 80% of C-STORE's rate",
            met=figures["ratio_stow_vs_cstore"] >= 0.8),
        common.headline(
            "ingest: drop while JPEG 2000 studies decode and score", round(
                100 * figures["drop_while_decoding"], 1), "%",
            spread_text=f"{rec['pxsgate+j2k']['mb_per_s']} MB/s",
            goal="<= 20%", met=figures["drop_while_decoding"] <= 0.20),
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest",
                                description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--cols", type=int, default=2500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pdu-sizes", default="16384,65536",
                   help="comma-separated maximum PDU sizes to compare with the default")
    p.add_argument("--no-orthanc", action="store_true",
                   help="leave Orthanc out (it is left out anyway where not installed)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    pdu_sizes = tuple(int(n) for n in args.pdu_sizes.split(",") if n)
    figures = run(args.files, args.rows, args.cols, args.repeats, pdu_sizes,
                  orthanc=not args.no_orthanc)
    figures["headline"] = headlines(figures)
    figures["ok"] = True
    out = common.save("ingest", figures, args.out)
    print(f"{args.files} files, {figures['image']}, {figures['total_mb']} MB, "
          f"median of {args.repeats}")
    for name, f in figures["receivers"].items():
        print(f"  {name:<18} {f['instances_per_s']:7.2f} inst/s  {f['mb_per_s']:7.1f} MB/s  "
              f"(median {f['median_s']} s, spread {f['spread_s']} s)")
    versus = figures.get("ratio_pxsgate_vs_orthanc")
    print(f"  pxsgate / storescp: {figures['ratio_pxsgate_vs_storescp']:.2f}; pxsgate / "
          f"Orthanc: {f'{versus:.2f}' if versus is not None else figures['orthanc']}; "
          f"STOW-RS / C-STORE: {figures['ratio_stow_vs_cstore']:.2f}; drop while decoding "
          f"JPEG 2000: {figures['drop_while_decoding']:.1%}")
    print(f"  figures: {out}")
    return figures


if __name__ == "__main__":
    main()
