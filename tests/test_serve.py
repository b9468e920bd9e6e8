"""pxsgate.service.serve's signal handling, with real signals sent to this process: they
only set the stop flag, force the exit on a second SIGINT, or schedule a reload; once the
stop has begun a SIGHUP is ignored (the end-to-end run under a stand-in systemd is in
test_faults)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import NoReturn

import structlog

from pxsgate.service.serve import Signals


class Forced(Exception):
    pass


async def _until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the signal was not handled"
        await asyncio.sleep(0.01)


def _signals(forced: list[str]) -> Signals:
    def force_exit() -> NoReturn:
        forced.append("forced")
        raise Forced  # stands in for os._exit: never returns

    return Signals(asyncio.get_running_loop(), force_exit)


async def test_a_second_sigint_forces_the_exit_a_second_sigterm_does_not() -> None:
    forced: list[str] = []
    signals = _signals(forced)
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGTERM)
        await _until(signals.stop.is_set)
        os.kill(os.getpid(), signal.SIGTERM)
        await _until(lambda: len(logs) == 2)
        assert not forced
        os.kill(os.getpid(), signal.SIGINT)
        await _until(lambda: bool(forced))
    assert [(e["event"], e["signal"]) for e in logs] == [
        ("gateway.stopping", "SIGTERM"), ("gateway.stopping", "SIGTERM"),
        ("gateway.forced_exit", "SIGINT")]


async def test_sighup_reloads_until_the_stop_begins() -> None:
    signals = _signals([])
    reloads: list[int] = []

    async def reload() -> None:
        reloads.append(1)

    signals.reload_with(reload)
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: len(reloads) == 1)
        signals.stopping()
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: bool(logs))
    assert reloads == [1]
    assert (logs[0]["event"], logs[0]["signal"]) == ("signal.ignored", "SIGHUP")
    assert not signals.stop.is_set()
