"""Failpoints: deliberate crashes at named moments, for the crash test only.

``PXSGATE_FAILPOINTS="after-spool-write:3,during-inference:1"`` makes the service kill
itself with SIGKILL the 3rd time an instance file is durable and the 1st time a batch
reaches the model: no clean-up runs, exactly as in a power cut or an OOM kill. Unset (the
normal case) every :meth:`Failpoints.hit` is a dictionary miss. The named points:

  after-spool-write     the instance file is durable; not yet indexed nor acknowledged
  after-index           indexed in SQLite; the C-STORE response not yet sent
  during-inference      a batch is on the model
  before-result-commit  the result, its deliveries and the study state written, not
                        yet committed
  after-result-commit   committed; the outbox not yet woken

(FoundationDB and TiKV test their recovery the same way.)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping

ENV = "PXSGATE_FAILPOINTS"
POINTS = ("after-spool-write", "after-index", "during-inference", "before-result-commit",
          "after-result-commit")


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, count = item.partition(":")
            if name not in POINTS or not count.isdigit() or int(count) < 1:
                raise ValueError(f"{ENV}: {item!r} is not NAME:N with NAME one of "
                                 f"{', '.join(POINTS)}")
            self._remaining[name] = int(count)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        return cls((os.environ if environ is None else environ).get(ENV, ""))

    @property
    def armed(self) -> dict[str, int]:
        with self._lock:
            return dict(self._remaining)

    def hit(self, name: str) -> None:
        if not self._remaining:
            return
        with self._lock:
            left = self._remaining.get(name)
            if left is None:
                return
            if left > 1:
                self._remaining[name] = left - 1
                return
        os.kill(os.getpid(), signal.SIGKILL)
