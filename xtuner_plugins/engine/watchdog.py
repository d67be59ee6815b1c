"""A stalled rank stops the run within ``stall_timeout`` seconds, naming it and the last iteration of each rank.

A rank that stops answering (``kill -STOP``, a machine that froze, a process paused by a debugger) leaves the
others waiting in their next collective for torch's process group timeout: 30 minutes on gloo, 10 or more on
NCCL, with nothing in the log. :class:`StallWatchdogHook` (in ``configs/_base_/default_runtime.py``) gives every
rank of a run with several processes a heartbeat file, ``WORK_DIR/heartbeats/rank_<r>.json`` (rank, pid, host,
iterations finished, and ``alive``: refreshed by a thread of the rank every ``timeout / 10`` s, at most 10 s),
and reads the others' files at the same pace. When another rank has not been heard from for ``timeout``
seconds, the watchdog

* logs one line naming the silent ranks (pid, host, how long ago) and the last iteration each rank finished;
* SIGKILLs the silent ranks on its own host (a stopped process does not end on torchrun's SIGTERM, which would
  wait 30 s more), releases the run's lock (``runlock.py``) and ends its process with exit code 3; ``torchrun``
  then stops the other ranks.

The rule looks at whether a process still runs, never at how long a step takes: a real-size step of minutes on a
CPU, an evaluation or a long checkpoint save stop nothing (the thread keeps beating while the rank computes). A
rank without a heartbeat file here (another node, without a shared work folder) is not judged, and a rank that
has finished says so in its file. What the watchdog cannot see is a collective that hangs while every process
runs: for that, set the process group timeout, ``env_cfg.dist_cfg.timeout`` (seconds; on NCCL with
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``), and the collective raises after that time. ``timeout=0`` turns the
watchdog off; a run with one process has nothing to watch. A rank whose own heartbeat cannot be written (a full
disk: every rank's fails alike) says so once and takes no rank for stalled until it can write again (a full disk
read as 'STALLED: rank 0' and killed a healthy rank).
"""

from __future__ import annotations

import contextlib
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

from xtuner_plugins.errors import Refused

from . import runlock  # noqa: F401  (MMEngine's dump_config patched with the guards: runlock.py)
from .lockfile import _process_start, release_held_locks

__all__ = ['HEARTBEAT_DIR', 'StallWatchdogHook', 'diagnose_stall', 'read_heartbeats']

HEARTBEAT_DIR = 'heartbeats'
STALL_EXIT_CODE = 3


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


def diagnose_stall(me: int, world_size: int, beats: Dict[int, dict], now: float,
                   timeout: float) -> Tuple[str, List[int]]:
    """``(message, silent ranks)`` as rank ``me`` sees the heartbeats ``beats``: the ranks other than ``me``, not
    finished, whose ``alive`` time is more than ``timeout`` s old (empty message when there are none)."""
    silent = [r for r in sorted(beats) if r != me and not beats[r].get('done')
              and now - float(beats[r].get('alive', 0)) > timeout]
    if not silent:
        return '', []
    who = ', '.join(f"rank {r} (pid {beats[r].get('pid')} on host {beats[r].get('host')}, last heard "
                    f"{now - float(beats[r].get('alive', 0)):.0f} s ago)" for r in silent)
    parts = [f"rank {rank}: {beats[rank].get('iter', '?')}" if rank in beats else f'rank {rank}: no heartbeat here'
             for rank in range(world_size)]
    message = (f'train: STALLED: {who} silent for more than {timeout:g} s (stall_timeout): stopped or frozen; '
               f'seen by rank {me}; last iteration finished: {", ".join(parts)}; stopping the run')
    return message, silent


class StallWatchdogHook(Hook):
    """See the module docstring. ``timeout``: seconds without progress before the run is stopped (0: off)."""

    priority = 'VERY_LOW'  # after the other hooks of an iteration (checkpoint saving included)

    def __init__(self, timeout: float = 300) -> None:
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise Refused(f'StallWatchdogHook: timeout={timeout!r}; seconds >= 0 (0: off)')
        self.timeout = float(timeout)
        self.interval = min(max(self.timeout / 10, 0.2), 10.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state: dict = {}
        self.path = ''
        self.unwritten: Optional[str] = None   # why this rank's last heartbeat could not be written

    # ---------------------------------------------------------------------------------------- the rank's side
    def before_train(self, runner) -> None:
        from mmengine.dist import get_dist_info
        rank, world_size = get_dist_info()
        if not self.timeout or world_size < 2:
            return
        self.work_dir, self.world_size = runner.work_dir, world_size
        os.makedirs(os.path.join(runner.work_dir, HEARTBEAT_DIR), exist_ok=True)
        self.path = os.path.join(runner.work_dir, HEARTBEAT_DIR, f'rank_{rank}.json')
        self.state = dict(run=runner.timestamp, rank=rank, world_size=world_size, pid=os.getpid(),
                          host=socket.gethostname(), process_start=_process_start(os.getpid()), iter=runner.iter,
                          done=False)
        self._write()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name='xtuner-plugins-stall-watchdog', daemon=True)
        self._thread.start()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._thread is not None:
            with self._lock:
                self.state['iter'] = runner.iter + 1  # the loop counts the iteration after its hooks
            self._write()

    def after_train(self, runner) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 2 + 1)
            self._thread = None
            with self._lock:
                self.state['done'] = True  # silent from now on, on purpose
            self._write()

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
        except OSError as exc:   # a full disk: the other ranks' heartbeats, in the same folder, fail alike
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if self.unwritten is None:
                print_log(f'{os.path.dirname(self.path)}: this rank\'s heartbeat cannot be written '
                          f'({exc.strerror or exc}): until it can, no rank is taken for stalled by its silence '
                          '(the disk is full? the next checkpoint needs room too)', logger='current', level=30)
            self.unwritten = exc.strerror or str(exc)
            return
        if self.unwritten is not None:
            print_log(f'{os.path.dirname(self.path)}: heartbeats written again; the stall watchdog watches again',
                      logger='current')
            self.unwritten = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            beats = read_heartbeats(self.work_dir, self.state['run'], self.world_size)
            message, silent = diagnose_stall(self.state['rank'], self.world_size, beats, time.time(), self.timeout)
            if silent and self.unwritten is None and not self._stop.is_set():   # (a full disk silences every rank)
                self._stop_run(message, silent, beats)
                return

    def _stop_run(self, message: str, silent: List[int], beats: Dict[int, dict]) -> None:
        print_log(message, logger='current', level=40)  # the console of every rank, rank 0's log file
        for rank in silent:
            beat = beats[rank]
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
