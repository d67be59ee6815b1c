"""A stalled rank stops the run within ``stall_timeout`` seconds, naming it and the last iteration of each rank.

A rank that stops answering (``kill -STOP``, a deadlock that holds Python's lock, a machine that froze) leaves
the others waiting in their next collective for torch's process group timeout: 30 minutes on gloo, 10 or more
on NCCL, with nothing in the log. :class:`StallWatchdogHook` (in ``configs/_base_/default_runtime.py``) gives
every rank a heartbeat file, ``WORK_DIR/heartbeats/rank_<r>.json`` (rank, pid, host, iterations finished, the
time of its last progress, and ``alive``: refreshed by a thread of the rank every ``timeout / 10`` s, at most
10 s), and a watchdog thread. When a rank makes no progress (an iteration, a validation step or a checkpoint
save) for ``timeout`` seconds (three times that before its first iteration, which starts the data workers
and may compile), its watchdog

* logs one line: the ranks whose ``alive`` time also stopped (unresponsive: stopped or frozen; a rank of a
  hung collective is still alive), and the last iteration each rank finished;
* SIGKILLs the unresponsive ranks on its own host (a stopped process does not end on torchrun's SIGTERM,
  which would wait 30 s more), releases the run's lock (``runlock.py``) and ends its process with exit code 3;
  ``torchrun`` then stops the other ranks.

The check needs the watchdog thread to run: a rank blocked in C code that holds Python's lock is not seen
from inside. On NCCL set the process group timeout as well, ``env_cfg.dist_cfg.timeout`` (seconds), with
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: a hung collective then raises after that time. Raise ``timeout`` above
the longest evaluation or checkpoint save of a run; ``timeout=0`` turns the watchdog off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from mmengine.hooks import Hook
from mmengine.logging import print_log

from .runlock import _process_start, release_held_locks

__all__ = ['HEARTBEAT_DIR', 'StallWatchdogHook', 'diagnose_stall', 'read_heartbeats']

HEARTBEAT_DIR = 'heartbeats'
STALL_EXIT_CODE = 3
FIRST_ITERATION_FACTOR = 3


def read_heartbeats(work_dir: str, run: str, world_size: int) -> Dict[int, dict]:
    """``{rank: record}`` of the heartbeat files of run ``run`` (the runner's timestamp) in ``work_dir``."""
    found = {}
    for rank in range(world_size):
        try:
            with open(os.path.join(work_dir, HEARTBEAT_DIR, f'rank_{rank}.json'), encoding='utf-8') as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get('run') == run:
            found[rank] = record
    return found


def diagnose_stall(me: int, world_size: int, beats: Dict[int, dict], now: float, timeout: float,
                   unresponsive_after: float) -> Tuple[str, List[int]]:
    """``(message, unresponsive ranks)`` for rank ``me`` that made no progress for ``timeout`` s."""
    unresponsive, parts = [], []
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            parts.append(f'rank {rank}: no heartbeat')
            if rank != me:
                unresponsive.append(rank)
            continue
        parts.append(f"rank {rank}: {beat.get('iter', '?')}")
        if rank != me and now - float(beat.get('alive', 0)) > unresponsive_after:
            unresponsive.append(rank)
    if unresponsive:
        who = ', '.join(f"rank {r} (" + (f"pid {beats[r].get('pid')} on host {beats[r].get('host')}, last heard "
                                          f"{now - float(beats[r].get('alive', 0)):.0f} s ago)" if r in beats
                                          else 'never heard)') for r in unresponsive)
        cause = f'unresponsive: {who}'
    else:
        cause = 'every rank is alive but none moves on: a hung collective, or a step slower than stall_timeout'
    message = (f'train: STALLED: rank {me} made no progress for {timeout:g} s (stall_timeout); {cause}; '
               f'last iteration finished: {", ".join(parts)}; stopping the run')
    return message, unresponsive


class StallWatchdogHook(Hook):
    """See the module docstring. ``timeout``: seconds without progress before the run is stopped (0: off)."""

    priority = 'VERY_LOW'  # after the other hooks of an iteration (checkpoint saving included)

    def __init__(self, timeout: float = 300) -> None:
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f'StallWatchdogHook: timeout={timeout!r}; seconds >= 0 (0: off)')
        self.timeout = float(timeout)
        self.interval = min(max(self.timeout / 10, 0.2), 10.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state: dict = {}
        self.path = ''
        self._first_done = False

    # ---------------------------------------------------------------------------------------- the rank's side
    def before_train(self, runner) -> None:
        if not self.timeout:
            return
        from mmengine.dist import get_dist_info
        rank, world_size = get_dist_info()
        self.work_dir, self.world_size = runner.work_dir, world_size
        os.makedirs(os.path.join(runner.work_dir, HEARTBEAT_DIR), exist_ok=True)
        self.path = os.path.join(runner.work_dir, HEARTBEAT_DIR, f'rank_{rank}.json')
        now = time.time()
        self.state = dict(run=runner.timestamp, rank=rank, world_size=world_size, pid=os.getpid(),
                          host=socket.gethostname(), process_start=_process_start(os.getpid()), iter=runner.iter,
                          progress=now, alive=now)
        self._write()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name='xtuner-plugins-stall-watchdog', daemon=True)
        self._thread.start()

    def _progress(self, finished: Optional[int] = None, write: bool = False) -> None:
        """Progress now; ``finished``: the iterations this rank has finished."""
        if self._thread is None:
            return
        with self._lock:
            self.state['progress'] = time.time()
            if finished is not None:
                self.state['iter'] = finished
        if write:
            self._write()

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._progress(runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._first_done = True
        self._progress(runner.iter + 1, write=True)  # the loop counts the iteration after its hooks

    def before_val_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._progress()

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        self._progress()

    def after_train(self, runner) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 2 + 1)
            self._thread = None

    # ---------------------------------------------------------------------------------------- the watchdog
    def _write(self) -> None:
        with self._lock:
            self.state['alive'] = time.time()
            text = json.dumps(self.state)
        tmp = f'{self.path}.{threading.get_ident()}.tmp'
        try:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full or vanished disk: the heartbeat is best effort, the check below goes on

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            with self._lock:
                idle = time.time() - self.state['progress']
            limit = self.timeout * (1 if self._first_done else FIRST_ITERATION_FACTOR)
            if idle > limit and not self._stop.is_set():
                self._stop_run(limit)
                return

    def _stop_run(self, limit: float) -> None:
        now = time.time()
        beats = read_heartbeats(self.work_dir, self.state['run'], self.world_size)
        message, unresponsive = diagnose_stall(self.state['rank'], self.world_size, beats, now, limit,
                                               unresponsive_after=max(3 * self.interval, self.timeout / 2))
        print_log(message, logger='current', level=40)  # the console of every rank, rank 0's log file
        for rank in unresponsive:
            beat = beats.get(rank) or {}
            pid = beat.get('pid')
            if (beat.get('host') == socket.gethostname() and isinstance(pid, int)
                    and _process_start(pid) == beat.get('process_start')):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        release_held_locks()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(STALL_EXIT_CODE)
