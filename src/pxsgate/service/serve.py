"""``pxsgate serve``'s run: the Gateway under signals and systemd, as uvicorn's
``Server.serve`` runs an app: start-up, a main loop (here: wait for a stop signal or a
fatal error), then shutdown in reverse order with a graceful timeout.

Signals only set flags or schedule work on the loop: SIGTERM or SIGINT asks for a graceful
stop (see Gateway.stop); a second SIGINT calls ``force_exit`` (the CLI exits at once, which
loses nothing acknowledged: it is all on disk); SIGHUP re-reads the config file
(RELOADING=1, then READY=1), and is ignored once the stop has begun. A SIGTERM while the
model loads (minutes, with torch.compile) stops the start-up.

The notifier (systemd's ``NOTIFY_SOCKET``) is made here and handed to the Gateway, which
says STATUS= during the start-up, READY=1 once it is done (before the supervisor's first
WATCHDOG=1) and STOPPING=1 first thing in every stop, a failed start-up's too; the
supervisor feeds the watchdog only while the model worker is healthy. When the service
finds itself unable to go on (``Gateway.fatal``), it is stopped and the :class:`Outcome`
says why, for the CLI to exit non-zero so that systemd restarts it.

Nothing here maps an outcome or an error to an exit code: that is the CLI's job. A start-up
error goes up unchanged, after the Gateway has stopped what it had started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from pxsgate.config import Config, load_config
from pxsgate.errors import ConfigError
from pxsgate.service.failpoints import Failpoints
from pxsgate.service.gateway import Gateway
from pxsgate.service.sdnotify import Notifier

log = structlog.get_logger("pxsgate.cli")


@dataclass(frozen=True)
class Outcome:
    """How a run ended: stopped on request (a signal, during the start-up or after it), or,
    when ``fatal`` says why, because the service could not go on."""

    fatal: str = ""


class Signals:
    """The loop's signal handlers for one run. They only set :attr:`stop`, call
    ``force_exit`` (a second SIGINT) or schedule a reload on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 force_exit: Callable[[], NoReturn]) -> None:
        self.stop = asyncio.Event()
        self._loop = loop
        self._force_exit = force_exit
        self._reloads: set[asyncio.Task[None]] = set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)

    def reload_with(self, reload: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """SIGHUP runs ``reload()`` as a task on the loop."""
        self._loop.add_signal_handler(signal.SIGHUP, self._on_hup, reload)

    def stopping(self) -> None:
        """The stop has begun: a SIGHUP from now on is logged and ignored. (Not
        remove_signal_handler: that restores SIGHUP's default, which kills the process
        (exit 129) and aborts the associations the graceful stop is waiting for.)"""
        self._loop.add_signal_handler(signal.SIGHUP, self._ignore_hup)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set() and sig == signal.SIGINT:
            log.warning("gateway.forced_exit", signal=sig.name)
            self._force_exit()
        log.info("gateway.stopping", signal=sig.name)
        self.stop.set()

    def _on_hup(self, reload: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = self._loop.create_task(reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    @staticmethod
    def _ignore_hup() -> None:
        log.info("signal.ignored", signal="SIGHUP", reason="the service is stopping")


async def serve(config: Config, config_path: Path,
                force_exit: Callable[[], NoReturn]) -> Outcome:
    """Run the gateway until SIGTERM or SIGINT, or until it cannot go on; re-read
    ``config_path`` on SIGHUP. ``force_exit`` is called on a second SIGINT and must not
    return."""
    loop = asyncio.get_running_loop()
    signals = Signals(loop, force_exit)
    notifier = Notifier()
    gateway = Gateway(config, notifier=notifier, failpoints=Failpoints.from_env())
    signals.reload_with(lambda: _reload(gateway, notifier, config_path))
    if not await _startup(gateway, signals):
        return Outcome()
    try:
        await _main_loop(gateway, signals.stop)
    finally:
        signals.stopping()
        await gateway.stop()
    return Outcome(fatal=gateway.fatal_reason if gateway.fatal.is_set() else "")


async def _startup(gateway: Gateway, signals: Signals) -> bool:
    """Start the gateway; False if a stop signal came first (the start-up is cancelled, and
    Gateway.start stops what it had started). A start-up error goes up from here."""
    loop = asyncio.get_running_loop()
    starting = loop.create_task(gateway.start())
    stopping = loop.create_task(signals.stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        signals.stopping()
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    stopping.cancel()
    starting.result()
    return True


async def _main_loop(gateway: Gateway, stop: asyncio.Event) -> None:
    """Until a stop signal, or the gateway finds it cannot go on."""
    loop = asyncio.get_running_loop()
    waits = [loop.create_task(stop.wait()), loop.create_task(gateway.fatal.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()


async def _reload(gateway: Gateway, notifier: Notifier, path: Path) -> None:
    """SIGHUP: re-read the config file; an invalid one keeps what is running."""
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error("config.reload_failed", path=str(path), key=exc.path, reason=exc.reason,
                  kept="the rules and timings already running")
        return
    except Exception as exc:  # never let a reload take the service down
        log.error("config.reload_failed", path=str(path), key="", reason=repr(exc),
                  kept="the rules and timings already running")
        return
    notifier.reloading()
    gateway.reload(new)
    notifier.ready()
