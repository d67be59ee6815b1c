"""A Slurm task waiting at the rendezvous for a rank that never comes stops with one line, not after 30 minutes.

Under ``srun`` without ``--kill-on-bad-exit=1`` (Slurm's default keeps a step's other tasks running when one
fails), a task that ended before the rendezvous (a bad environment, an import that failed, a node's own problem)
left the others waiting in ``init_process_group`` for torch's process group timeout, 30 minutes on gloo, with no
word: measured on a real srun -n2 whose task 1 exited at start-up, task 0 was still waiting when srun was killed
5 minutes later. The stall watchdog (``watchdog.py``) starts with the run, after this.

:func:`rendezvous_watch` wraps the rendezvous of ``--launcher slurm`` (``slurm.py``): a thread that, when the
rendezvous has not ended ``XTUNER_PLUGINS_RENDEZVOUS_TIMEOUT`` seconds later (:data:`RENDEZVOUS_TIMEOUT_S` by
default; ``0``: no limit), prints ``train: STALLED at start-up: rank R of N ... waited S s at the rendezvous ...``
and ends the process with the stall watchdog's exit code (``os._exit``: the main thread is inside torch's C++
wait, where no Python exception reaches it; nothing of the run is written yet, no lock is held).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator, Mapping

RENDEZVOUS_ENV = 'XTUNER_PLUGINS_RENDEZVOUS_TIMEOUT'
RENDEZVOUS_TIMEOUT_S = 600.0   # seconds: nodes of a large job start minutes apart (containers, cold file systems)


def rendezvous_timeout(env: Mapping[str, str]) -> float:
    """The seconds a rank waits at the rendezvous (``0``: no limit); ValueError naming the variable for a value
    that is no number of seconds."""
    given = env.get(RENDEZVOUS_ENV, '').strip()
    if not given:
        return RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float('inf'):
        raise ValueError(f'{RENDEZVOUS_ENV}={given!r} is no number of seconds (0: no limit)')
    return seconds


@contextlib.contextmanager
def rendezvous_watch(where: str, seconds: float) -> Iterator[None]:
    """Run the body (the rendezvous); past ``seconds`` (0: never) end this process with one line (module
    docstring). ``where``: this rank and its master, as ``slurm._where`` says them."""
    from xtuner_plugins.engine.watchdog import STALL_EXIT_CODE
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        print(f'train: STALLED at start-up: {where}: waited {seconds:g} s at the rendezvous and not every rank came: '
              f'a task that ended before it (srun\'s "task N: Exited" line and the task\'s own say which) or one that '
              f'never started; srun --kill-on-bad-exit=1 ends the others at once; {RENDEZVOUS_ENV}=SECONDS waits '
              f'longer', file=sys.stderr, flush=True)
        os._exit(STALL_EXIT_CODE)

    if seconds:
        threading.Thread(target=watch, name='rendezvous-watch', daemon=True).start()
    try:
        yield
    finally:
        done.set()
