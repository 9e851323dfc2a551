"""Children never outlive ``federation up``: a lifeline pipe, and a parent-death signal.

The supervisor holds the write end of one pipe for its whole life and never
writes to it; every node and the gateway get the read end (``--lifeline-fd``).
When the supervisor dies, however it dies (SIGKILL included), the kernel closes
the write end and the read end becomes readable at end-of-file: the child stops
gracefully, and exits anyway after ``supervisor.orphan_stop_seconds``. This works
on every POSIX system (the roadmap's Macs included).

PostgreSQL cannot be taught to watch a pipe, so on Linux the postmaster gets a
parent-death signal instead (``PR_SET_PDEATHSIG``, SIGINT: a fast shutdown). Two
details of that signal matter: it is cleared when the process changes its user
id, so it must be set after the switch to the ``embedded_postgres`` user (in
``preexec_fn``, which ``subprocess`` runs after ``setreuid``); and it fires when
the parent *thread* exits, so the process must be spawned from a thread that
lives as long as the supervisor (the event-loop thread, never
``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux).

    ``None`` elsewhere: there, the supervisor's next start cleans up what is left
    (see :mod:`federation.launch.supervisor`). libc is loaded here, in the parent, so the
    function run between fork and exec only makes one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return set_signal


class Lifeline:
    """The supervisor's end: a pipe whose write end lives exactly as long as this process."""

    def __init__(self) -> None:
        # Both ends are non-inheritable (os.pipe's default): only children given
        # ``child_fd`` through ``pass_fds`` get the read end, and none gets the write end
        # (a child holding it would keep every lifeline alive).
        self.child_fd, self._write_fd = os.pipe()

    def close(self) -> None:
        for fd in (self.child_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def watch_lifeline(fd: int, on_lost: Callable[[], None], *, hard_deadline: float) -> None:
    """Child side: call ``on_lost`` once the supervisor is gone, and exit after
    ``hard_deadline`` seconds if the graceful stop it starts has not finished by then.

    The deadline runs on a daemon thread, so it fires even if the event loop is stuck.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # the supervisor never writes; ignore anything else
        loop.remove_reader(fd)
        log.warning("the supervisor is gone; stopping",
                    extra={"hard_deadline_seconds": hard_deadline})
        timer = threading.Timer(hard_deadline, _exit_now)
        timer.daemon = True
        timer.start()
        on_lost()

    loop.add_reader(fd, readable)


def _exit_now() -> None:
    log.error("graceful stop took too long after the supervisor died; exiting")
    logging.shutdown()
    os._exit(1)
