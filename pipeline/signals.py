"""Graceful stop: the first SIGINT / SIGTERM asks the running stage to stop after the current
batch (nothing half-done is marked done); a second SIGINT interrupts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stopped(Exception):
    """The user asked the stage to stop; finished work is kept and a rerun resumes."""

    def __init__(self, signame: str):
        super().__init__(f"stopped by {signame}")
        self.signame = signame


class StopFlag:
    """Set by a signal handler, checked by the stage between batches."""

    def __init__(self) -> None:
        self.signame: str | None = None

    def check(self) -> None:
        if self.signame:
            raise Stopped(self.signame)


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Install the handlers for the duration of the block (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag.signame and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signame = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
