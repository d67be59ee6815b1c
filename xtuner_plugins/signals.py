"""SIGTERM taken as Ctrl-C is, by the tools that clean up on an interrupt: ``kill``, ``timeout``, Slurm and systemd
send SIGTERM, whose default ends the process at once, so what a ``finally`` or an ``except KeyboardInterrupt`` would
remove (a half-written output folder, a temporary converted model, a converter's process) was left behind."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM inside :func:`sigterm_as_interrupt`; an ``except KeyboardInterrupt``
    takes it too (exit code 143 by convention, 128 + SIGTERM)."""


def _raise(signum, frame):
    raise Terminated(f'signal {signum}')


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread for the block. Outside the main thread (no signal
    handler can be set there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
