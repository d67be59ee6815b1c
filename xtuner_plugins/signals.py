"""SIGTERM taken as Ctrl-C is, by the tools that clean up on an interrupt: ``kill``, ``timeout``, Slurm and systemd
send SIGTERM, whose default ends the process at once, so what a ``finally`` or an ``except KeyboardInterrupt`` would
remove (a half-written output folder, a temporary converted model, a converter's process) was left behind. And a
stop's last noise: a DataLoader worker's traceback for the batch the stop cut
(:func:`quiet_cut_descriptor_transfers`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM inside :func:`sigterm_as_interrupt`; an ``except KeyboardInterrupt``
    takes it too (exit code 143 by convention, 128 + SIGTERM)."""


def _raise(signum, frame):
    raise from_signal(Terminated(f'signal {signum}'), signum)


def from_signal(stop: KeyboardInterrupt, signum: int) -> KeyboardInterrupt:
    """``stop``, marked as raised by a signal handler of ours for ``signum`` (:func:`sent_again_when_swallowed`)."""
    stop.from_signal = signum
    return stop


@contextlib.contextmanager
def sent_again_when_swallowed(taken_back=None) -> Iterator[None]:
    """For the block, a stop our signal handler raised where Python cannot raise it is sent again, not lost.

    A handler runs where the main thread is, which can be a weakref callback or a ``__del__`` (importlib drops its
    module locks in one, ``_bootstrap``'s ``cb``): Python prints 'Exception ignored in ...' with a traceback and
    goes on, and the stop is gone (a rank the launcher stopped printed that traceback before its closing line; a
    run alone went on training past its SIGTERM). Such a stop (:func:`from_signal`) is sent again from another
    thread 50 ms later, so the handler raises it where the main thread is then; ``taken_back(signum)`` first, for
    a handler that counts the signals it took. Anything else unraisable goes to the hook there was."""
    previous = sys.unraisablehook

    def hook(unraisable):
        signum = getattr(unraisable.exc_value, 'from_signal', None)
        if signum is None:
            return previous(unraisable)
        if taken_back is not None:
            taken_back(signum)
        # a moment later: sent at once, it was raised inside this hook, which Python swallows the same way
        resend = threading.Timer(0.05, os.kill, args=(os.getpid(), signum))
        resend.daemon = True
        resend.start()
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread for the block (sent again where it was raised in a
    place Python cannot raise it: :func:`sent_again_when_swallowed`). Outside the main thread (no signal handler
    can be set there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        with sent_again_when_swallowed():
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_code(stop: KeyboardInterrupt) -> int:
    """The exit code of a tool stopped by ``stop``: 143 for SIGTERM (:class:`Terminated`, 128 + 15), 130 for Ctrl-C."""
    return 143 if isinstance(stop, Terminated) else 130


def parent_death_signal(sig: int):
    """A function that has the process calling it get ``sig`` when its parent dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``, kept across an ``exec``: a ``preexec_fn``, or a forked worker's first call); None
    where there is no ``prctl``. libc is found here, in the parent: the child only calls it."""
    import ctypes
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # not Linux
        return None
    return lambda: prctl(1, int(sig), 0, 0, 0)   # 1: PR_SET_PDEATHSIG


def quiet_cut_descriptor_transfers() -> None:
    """In the processes this one forks from now on (its DataLoader workers), a transfer of a file descriptor that
    this process cut short (a signal ended it while it fetched a batch) is not printed as a traceback.

    A worker passes each batch's tensors to the training process as file descriptors, which its
    ``multiprocessing.resource_sharer`` thread hands over on request. When the training process ends in the
    middle of one (SIGTERM to it alone, 2 of 15 runs), that thread's error (``ConnectionResetError``,
    ``BrokenPipeError``) went to ``sys.excepthook``: a traceback after the run's closing line, about nothing lost.
    The same error in the training process itself, and any other error anywhere, is printed as before."""
    previous = sys.excepthook
    if getattr(previous, '_xtuner_plugins_owner', None) is not None:
        return
    owner = os.getpid()

    def excepthook(kind, value, tb):
        sharer = any(frame.filename.replace(os.sep, '/').endswith('multiprocessing/resource_sharer.py')
                     for frame in traceback.extract_tb(tb))
        if os.getpid() != owner and issubclass(kind, (ConnectionError, EOFError)) and sharer:
            return
        previous(kind, value, tb)
    excepthook._xtuner_plugins_owner = owner
    sys.excepthook = excepthook
