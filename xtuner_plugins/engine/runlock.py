"""One run per work folder: ``WORK_DIR/run.lock``.

Two runs writing into one work folder replace each other's checkpoints, ``last_checkpoint`` and
``data_manifest.json`` without a word. :class:`RunLockHook` (in ``configs/_base_/default_runtime.py``) makes
rank 0 take a lock file in the work folder before the run writes anything there (MMEngine's runner dumps the
config at the end of its construction: the lock is taken just before, the hooks are registered by then),
holding the run's pid, host, start time and command. It works the same under ``xtuner train``, ``torchrun``
and ``tools/train.py`` (the lock is taken inside the training processes, by global rank 0 only):

* a second run while the first is alive is refused on every rank, with one line naming the first run and a
  non-zero exit (``SystemExit``, no traceback); nothing of the first run is touched;
* a lock left by a process that is gone (killed, out of memory) on this host is taken over with a warning,
  so ``--resume`` after a crash just works; a lock of another host cannot be checked from here: the message
  says to delete the file once that run is known to be over;
* the lock is removed when the run ends, also when it fails with an exception (``atexit``), and when the stall
  watchdog stops the run (``watchdog.py``).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import socket
import sys
import time
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log

__all__ = ['LOCK_NAME', 'RunLock', 'RunLockError', 'RunLockHook', 'release_held_locks']

LOCK_NAME = 'run.lock'
_PATCH_MARK = '_xtuner_plugins_runlock_patch'
_held: 'list[RunLock]' = []  # locks this process holds, released at exit


class RunLockError(RuntimeError):
    """The work folder is in use by another run (the message names it)."""


def _process_start(pid: int) -> Optional[float]:
    """The start time of process ``pid`` (to tell a reused pid), None when there is no such live process."""
    import psutil
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(process.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class RunLock:
    """``WORK_DIR/run.lock``: :meth:`acquire` takes it or raises :class:`RunLockError`; :meth:`release`."""

    def __init__(self, work_dir: str, command: Optional[str] = None):
        self.work_dir = os.path.abspath(work_dir)
        self.path = os.path.join(self.work_dir, LOCK_NAME)
        self.command = command if command is not None else ' '.join([sys.executable] + sys.argv)
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return dict(pid=pid, host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S'),
                    process_start=_process_start(pid), command=self.command)

    def read(self) -> Optional[dict]:
        """The lock's record; ``{}`` for an unreadable one; None when there is no lock."""
        try:
            with open(self.path, encoding='utf-8') as f:
                record = json.load(f)
            return record if isinstance(record, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    @staticmethod
    def describe(record: dict) -> str:
        return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started "
                f"{record.get('started', '?')} ({record.get('command', '?')})")

    def is_stale(self, record: dict) -> bool:
        """The lock's process is gone: on this host, no live process with its pid and start time."""
        if record.get('host') != socket.gethostname() or not isinstance(record.get('pid'), int):
            return False
        start = _process_start(record['pid'])
        return start is None or (record.get('process_start') is not None
                                 and abs(start - record['process_start']) > 1)

    def _create(self, record: dict) -> bool:
        """Write the lock only if there is none (a temporary file hard-linked to the name: atomic)."""
        tmp = f'{self.path}.{os.getpid()}.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create-exclusive (a reader may see it empty)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(record, f)
            return True
        finally:
            os.unlink(tmp)

    def acquire(self) -> None:
        os.makedirs(self.work_dir, exist_ok=True)
        record = self._record()
        for _ in range(3):
            if self._create(record):
                self.held = True
                _held.append(self)
                return
            other = self.read()
            if other is None:
                continue  # released in between
            if other and self.is_stale(other):
                print_log(f'{self.path}: taking over the lock of a run that is gone ({self.describe(other)}); '
                          'its checkpoints stay as they are', logger='current', level=30)
                if self.read() == other:
                    os.unlink(self.path)
                continue
            if not other:  # being written, or damaged
                time.sleep(0.5)
                other = self.read() or {}
                if not other:
                    raise RunLockError(f'{self.path} exists but cannot be read; if no other run uses '
                                       f'{self.work_dir}, delete it')
            raise RunLockError(
                f'{self.work_dir} is in use by another run: {self.describe(other)}; wait for it to end or choose '
                f'another --work-dir (delete {self.path} only if that run is over)')
        raise RunLockError(f'{self.path}: could not take the lock (other runs starting at the same time?)')

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        if self in _held:
            _held.remove(self)
        record = self.read()
        if record and record.get('pid') == os.getpid() and record.get('host') == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def release_held_locks() -> None:
    """Release every lock this process holds (at exit, and before the stall watchdog ends the process)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_held_locks)


class RunLockHook(Hook):
    """See the module docstring. Rank 0 takes the lock when the runner dumps its config (or at ``before_run``
    at the latest); at ``before_run`` every rank learns whether it was refused and leaves; ``after_run``
    releases it."""

    priority = 'HIGHEST'

    def __init__(self) -> None:
        self.lock: Optional[RunLock] = None
        self.refused = ''

    def acquire(self, runner) -> None:
        """Global rank 0 takes the lock (the other ranks return)."""
        from mmengine.dist import get_rank
        if self.lock is not None or self.refused or get_rank() != 0:
            return
        lock = RunLock(runner.work_dir)
        try:
            lock.acquire()
            self.lock = lock
        except RunLockError as exc:
            self.refused = str(exc)

    def before_run(self, runner) -> None:
        from mmengine.dist import broadcast_object_list, get_dist_info
        rank, world_size = get_dist_info()
        self.acquire(runner)
        if world_size > 1:
            verdict = [self.refused]
            broadcast_object_list(verdict, src=0)
            self.refused = verdict[0]
        if self.refused:
            if rank == 0:
                print(f'train: refused: {self.refused}', file=sys.stderr, flush=True)
            raise SystemExit(2)

    def after_run(self, runner) -> None:
        if self.lock is not None:
            self.lock.release()


def _patch_dump_config() -> bool:
    """Take the lock before the runner writes into the work folder (its config dump); refused: no dump."""
    from mmengine.runner import FlexibleRunner, Runner
    patched = False
    for cls in (Runner, FlexibleRunner):
        original = cls.dump_config
        if getattr(original, _PATCH_MARK, False):
            continue

        @functools.wraps(original)
        def dump_config(self, _original=original):
            hooks = [h for h in getattr(self, '_hooks', []) if isinstance(h, RunLockHook)]
            for hook in hooks:
                hook.acquire(self)
            if not any(h.refused for h in hooks):
                _original(self)

        setattr(dump_config, _PATCH_MARK, True)
        cls.dump_config = dump_config
        patched = True
    return patched


_patch_dump_config()
