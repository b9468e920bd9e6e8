"""Study assembly on a real event loop with short settle and quiet times."""

from __future__ import annotations

import asyncio

from pxsgate.assemble import Assembler
from pxsgate.config import AssemblyConfig

SETTLE, QUIET = 0.05, 0.4


def make() -> tuple[Assembler, list[tuple[str, str]]]:
    ready: list[tuple[str, str]] = []
    assembler = Assembler(AssemblyConfig(settle_seconds=SETTLE, quiet_timeout_seconds=QUIET),
                          asyncio.get_running_loop(), lambda uid, why: ready.append((uid, why)))
    return assembler, ready


async def test_ready_only_after_release_and_settle() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.3", "a1")
    await asyncio.sleep(SETTLE * 3)
    assert ready == [], "an open association holds the study back"
    assert assembler.association_closed("a1") == {"1.2.3"}
    await asyncio.sleep(SETTLE / 5)
    assert ready == [], "the settle time has not passed"
    await asyncio.sleep(SETTLE * 3)
    assert ready == [("1.2.3", "settled")]
    assert assembler.pending == 0


async def test_new_instance_restarts_the_settle_time() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.3", "a1")
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 0.6)
    assembler.instance_arrived("1.2.3", "a2")  # a second association adds an image
    assembler.association_closed("a2")
    await asyncio.sleep(SETTLE * 0.6)
    assert ready == []
    await asyncio.sleep(SETTLE * 2)
    assert ready == [("1.2.3", "settled")]


async def test_quiet_timeout_for_a_sender_that_never_releases() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.4", "a1")
    await asyncio.sleep(QUIET * 0.5)
    assert ready == []
    await asyncio.sleep(QUIET)
    assert ready == [("1.2.4", "quiet-timeout")]
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 2)
    assert ready == [("1.2.4", "quiet-timeout")], "closing later does not make it ready twice"


async def test_two_studies_in_one_association_and_a_late_instance() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.1", "a1")
    assembler.instance_arrived("1.2", "a1")
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 3)
    assert sorted(ready) == [("1.1", "settled"), ("1.2", "settled")]
    assembler.instance_arrived("1.1", "a2")  # after it was handed on: it is re-opened
    assembler.association_closed("a2")
    await asyncio.sleep(SETTLE * 3)
    assert ready[-1] == ("1.1", "settled")
    assert len(ready) == 3
    assembler.close()
