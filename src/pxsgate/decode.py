"""What runs first in each decode process (see pipeline.DecodePool).

Kept apart from pipeline.py on purpose: a spawned process imports the module of every
function it is given, and pipeline.py imports torch (through infer.py). From here and
preprocess.py a decode process loads numpy, pydicom and PIL only: about 50 MB instead of
250 MB each.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)


def init_worker(parent: int | None = None, log_format: str = "auto",
                include_phi: bool = False) -> None:
    """Lower the process's priority, tie its life to the service's, and send what the
    libraries log or warn here (pydicom decoding a peer's file) through the service's
    format, without data set values unless ``include_phi``."""
    import sys

    from pxsgate.log import route_library_logs

    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    route_library_logs(use_json, include_phi)
    # Decoding yields the CPU to reception: a busy decoder must not slow C-STORE answers.
    # Nice 19 weighs 15 against the receiver threads' 1024 in the Linux scheduler.
    with contextlib.suppress(OSError):
        os.nice(19)
    # A service killed with SIGKILL (a crash, the OOM killer) runs no clean-up: without
    # this its decode processes would live on as orphans. Linux only; best effort.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect


def warm() -> int:
    """A no-op task: starting every process before the first study needs one."""
    return os.getpid()
