"""Study assembly on a real event loop with short settle and quiet times."""

from __future__ import annotations

import asyncio

import pytest

from pxsgate.assemble import Assembler

SETTLE, QUIET = 0.05, 0.4


def make() -> tuple[Assembler, list[tuple[str, str]]]:
    ready: list[tuple[str, str]] = []
    assembler = Assembler(asyncio.get_running_loop(),
                          lambda uid, why: ready.append((uid, why)))
    return assembler, ready


async def test_ready_only_after_release_and_settle() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.3", "a1", SETTLE, QUIET)
    await asyncio.sleep(SETTLE * 3)
    assert ready == [], "an open association holds the study back"
    delays = assembler.association_closed("a1")
    assert list(delays) == ["1.2.3"]
    assert delays["1.2.3"] == pytest.approx(SETTLE)
    await asyncio.sleep(SETTLE / 5)
    assert ready == [], "the settle time has not passed"
    await asyncio.sleep(SETTLE * 3)
    assert ready == [("1.2.3", "settled")]
    assert assembler.pending == 0


async def test_new_instance_restarts_the_settle_time() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.3", "a1", SETTLE, QUIET)
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 0.6)
    assembler.instance_arrived("1.2.3", "a2", SETTLE, QUIET)  # a second association adds an image
    assembler.association_closed("a2")
    await asyncio.sleep(SETTLE * 0.6)
    assert ready == []
    await asyncio.sleep(SETTLE * 2)
    assert ready == [("1.2.3", "settled")]


async def test_quiet_timeout_for_a_sender_that_never_releases() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.2.4", "a1", SETTLE, QUIET)
    await asyncio.sleep(QUIET * 0.5)
    assert ready == []
    await asyncio.sleep(QUIET)
    assert ready == [("1.2.4", "quiet-timeout")]
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 2)
    assert ready == [("1.2.4", "quiet-timeout")], "closing later does not make it ready twice"


async def test_two_studies_in_one_association_and_a_late_instance() -> None:
    assembler, ready = make()
    assembler.instance_arrived("1.1", "a1", SETTLE, QUIET)
    assembler.instance_arrived("1.2", "a1", SETTLE, QUIET)
    assembler.association_closed("a1")
    await asyncio.sleep(SETTLE * 3)
    assert sorted(ready) == [("1.1", "settled"), ("1.2", "settled")]
    # After it was handed on: it is re-opened.
    assembler.instance_arrived("1.1", "a2", SETTLE, QUIET)
    assembler.association_closed("a2")
    await asyncio.sleep(SETTLE * 3)
    assert ready[-1] == ("1.1", "settled")
    assert len(ready) == 3
    assembler.close()


async def test_timings_are_per_study() -> None:
    """Each study keeps the settle and quiet times of the AE title it was sent to."""
    assembler, ready = make()
    assembler.instance_arrived("fast", "a1", SETTLE, QUIET)
    assembler.instance_arrived("slow", "a2", SETTLE * 6, QUIET)
    assembler.association_closed("a1")
    assembler.association_closed("a2")
    await asyncio.sleep(SETTLE * 3)
    assert ready == [("fast", "settled")]
    await asyncio.sleep(SETTLE * 5)
    assert ready == [("fast", "settled"), ("slow", "settled")]


async def test_resume_rearms_a_study_from_its_stored_deadline() -> None:
    assembler, ready = make()
    assembler.resume("1.9", SETTLE * 2, SETTLE, QUIET)
    await asyncio.sleep(SETTLE)
    assert ready == []
    await asyncio.sleep(SETTLE * 3)
    assert ready == [("1.9", "settled")]
    assembler.resume("1.8", 0.0, SETTLE, QUIET)  # a deadline that passed while stopped
    assembler.instance_arrived("1.8", "a9", SETTLE, QUIET)  # ...and the sender came back
    await asyncio.sleep(SETTLE * 3)
    assert ready == [("1.9", "settled")], "an open association holds it again"
    assembler.association_closed("a9")
    await asyncio.sleep(SETTLE * 3)
    assert ready[-1] == ("1.8", "settled")
