"""What the pages need from the running gateway besides the store: the pictures, the
outbox's wake-up, force completion, the queues and the model (service/gateway.py fills it
in; a test may leave any of it out, and the pages say so)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from pxsgate.pictures import PictureStore


async def _nothing_forced(study_uid: str) -> bool:
    return False


async def _no_health() -> dict[str, Any]:
    return {}


class StudyKeys:
    """Study keys the worklist showed a viewer, and their UIDs (the most recent
    ``size``): the de-identified study page finds its study here without hashing every
    study's UID (``Store.find_study``, the fallback)."""

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._uids: OrderedDict[str, str] = OrderedDict()

    def add(self, key: str, uid: str) -> None:
        self._uids[key] = uid
        self._uids.move_to_end(key)
        while len(self._uids) > self._size:
            self._uids.popitem(last=False)

    def get(self, key: str) -> str | None:
        return self._uids.get(key)


@dataclass(frozen=True)
class UiServices:
    pictures: PictureStore | None = None  # None: pictures.enabled is off
    # Make a study still being received ready now; False when it is not being received.
    force_study: Callable[[str], Awaitable[bool]] = _nothing_forced
    wake_outbox: Callable[[], None] = lambda: None  # deliveries made due: send them now
    health: Callable[[], Awaitable[dict[str, Any]]] = _no_health  # /healthz's report
    model: Callable[[], dict[str, Any] | None] = lambda: None  # the loaded model's block
    data_dir: Path | None = None  # storage.data-dir: its free space
    study_keys: StudyKeys = field(default_factory=StudyKeys)


SERVICES_KEY = web.AppKey("ui_services", UiServices)


def services_of(request: web.Request) -> UiServices:
    return request.config_dict[SERVICES_KEY]
