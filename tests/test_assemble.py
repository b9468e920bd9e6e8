"""Study assembly's settle and quiet deadlines, on a clock the tests move by hand (and once
on the real event loop's clock)."""

from __future__ import annotations

import asyncio

import pytest

from pxsgate.assemble import Assembler

from .fakes import FakeClock

# Seconds of fake time; binary fractions, so the sums land exactly on the deadlines.
SETTLE, QUIET = 2.0, 16.0


def make(clock: FakeClock | None = None) -> tuple[Assembler, list[tuple[str, str]]]:
    ready: list[tuple[str, str]] = []
    assembler = Assembler(asyncio.get_running_loop(),
                          lambda uid, why: ready.append((uid, why)), clock=clock)
    return assembler, ready


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_ready_only_after_release_and_settle(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.instance_arrived("1.2.3", "a1", SETTLE, QUIET)
    clock.advance(SETTLE * 3)
    assert ready == [], "an open association holds the study back"
    delays = assembler.association_closed("a1")
    assert list(delays) == ["1.2.3"]
    assert delays["1.2.3"] == pytest.approx(SETTLE)
    clock.advance(SETTLE / 4)
    assert ready == [], "the settle time has not passed"
    clock.advance(SETTLE * 3 / 4)
    assert ready == [("1.2.3", "settled")], "ready when the settle time has passed"
    assert assembler.pending == 0


async def test_new_instance_restarts_the_settle_time(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.instance_arrived("1.2.3", "a1", SETTLE, QUIET)
    assembler.association_closed("a1")
    clock.advance(SETTLE * 0.625)
    assembler.instance_arrived("1.2.3", "a2", SETTLE, QUIET)  # a second association adds an image
    assembler.association_closed("a2")
    clock.advance(SETTLE * 0.625)
    assert ready == [], "the settle time counts from the second association's release"
    clock.advance(SETTLE * 0.375)
    assert ready == [("1.2.3", "settled")]


async def test_quiet_timeout_for_a_sender_that_never_releases(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.instance_arrived("1.2.4", "a1", SETTLE, QUIET)
    clock.advance(QUIET * 0.5)
    assert ready == []
    clock.advance(QUIET * 0.4375)
    assert ready == [], "the quiet time has not passed"
    clock.advance(QUIET * 0.0625)
    assert ready == [("1.2.4", "quiet-timeout")]
    assembler.association_closed("a1")
    clock.advance(SETTLE * 2)
    assert ready == [("1.2.4", "quiet-timeout")], "closing later does not make it ready twice"


async def test_an_instance_restarts_the_quiet_time(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.instance_arrived("1.2.5", "a1", SETTLE, QUIET)
    clock.advance(QUIET * 0.75)
    assembler.instance_arrived("1.2.5", "a1", SETTLE, QUIET)
    clock.advance(QUIET * 0.75)
    assert ready == [], "the quiet time counts from the last instance"
    clock.advance(QUIET * 0.25)
    assert ready == [("1.2.5", "quiet-timeout")]


async def test_two_studies_in_one_association_and_a_late_instance(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.instance_arrived("1.1", "a1", SETTLE, QUIET)
    assembler.instance_arrived("1.2", "a1", SETTLE, QUIET)
    assembler.association_closed("a1")
    clock.advance(SETTLE * 3)
    assert sorted(ready) == [("1.1", "settled"), ("1.2", "settled")]
    # After it was handed on: it is re-opened.
    assembler.instance_arrived("1.1", "a2", SETTLE, QUIET)
    assembler.association_closed("a2")
    clock.advance(SETTLE * 3)
    assert ready[-1] == ("1.1", "settled")
    assert len(ready) == 3
    assembler.close()


async def test_timings_are_per_study(clock: FakeClock) -> None:
    """Each study keeps the settle and quiet times of the AE title it was sent to."""
    assembler, ready = make(clock)
    assembler.instance_arrived("fast", "a1", SETTLE, QUIET)
    assembler.instance_arrived("slow", "a2", SETTLE * 6, QUIET)
    assembler.association_closed("a1")
    assembler.association_closed("a2")
    clock.advance(SETTLE * 3)
    assert ready == [("fast", "settled")]
    clock.advance(SETTLE * 2.75)
    assert ready == [("fast", "settled")]
    clock.advance(SETTLE * 0.25)
    assert ready == [("fast", "settled"), ("slow", "settled")]


async def test_resume_rearms_a_study_from_its_stored_deadline(clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.resume("1.9", SETTLE * 2, SETTLE, QUIET)
    clock.advance(SETTLE * 1.875)
    assert ready == []
    clock.advance(SETTLE * 0.125)
    assert ready == [("1.9", "settled")]
    assembler.resume("1.8", 0.0, SETTLE, QUIET)  # a deadline that passed while stopped
    assembler.instance_arrived("1.8", "a9", SETTLE, QUIET)  # ...and the sender came back
    await asyncio.sleep(0)  # the loop's turn, when a due timer would run
    clock.advance(SETTLE * 3)
    assert ready == [("1.9", "settled")], "an open association holds it again"
    assembler.association_closed("a9")
    clock.advance(SETTLE * 3)
    assert ready[-1] == ("1.8", "settled")


async def test_a_deadline_passed_while_stopped_is_ready_on_the_next_turn(
        clock: FakeClock) -> None:
    assembler, ready = make(clock)
    assembler.resume("1.7", 0.0, SETTLE, QUIET)
    assert ready == []
    await asyncio.sleep(0)
    assert ready == [("1.7", "settled")], "without waiting for any time to pass"


async def test_the_system_clock_arms_the_loop_timers() -> None:
    """Without a clock given, the assembler's timers are the event loop's, in real time."""
    settle, quiet = 0.05, 0.4  # real seconds
    assembler, ready = make()
    assembler.instance_arrived("1.2.6", "a1", settle, quiet)
    assert assembler.association_closed("a1")["1.2.6"] == pytest.approx(settle, abs=0.02)
    assert ready == []
    await asyncio.sleep(settle * 3)
    assert ready == [("1.2.6", "settled")]
