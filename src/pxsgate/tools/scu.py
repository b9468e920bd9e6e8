"""A small C-STORE/C-ECHO client (pynetdicom) used by ``pxsgate demo`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import AE

from pxsgate.errors import PxsgateError


@dataclass(frozen=True)
class SendReport:
    statuses: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return all(s == 0x0000 for s in self.statuses)


def send_datasets(host: str, port: int, datasets: Sequence[Dataset], *,
                  called_ae: str = "PxsScore", calling_ae: str = "PXSGATE-SCU") -> SendReport:
    """Send ``datasets`` in one association; return each C-STORE status (-1: no response)."""
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise PxsgateError(f"association with {called_ae}@{host}:{port} was not accepted")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return SendReport(tuple(statuses))


def echo(host: str, port: int, *, called_ae: str = "PxsScore",
         calling_ae: str = "PXSGATE-SCU") -> int:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise PxsgateError(f"association with {called_ae}@{host}:{port} was not accepted")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()
