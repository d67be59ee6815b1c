"""The lock file of one run per work folder (``WORK_DIR/run.lock``; the hook that takes it: ``runlock.py``).

:class:`RunLock` takes the lock (a file holding the run's pid, host, start time and command, created only if there
is none) or raises :class:`RunLockError` naming the run that holds it; it tells a lock left by a process that is
gone from a live run's, takes a gone one over, and removes its own when the run ends (``atexit``, and
:func:`release_held_locks` before the stall watchdog ends the process). A forked child (a DataLoader worker)
closes its copies of the held locks' files.

**Gone or alive.** The run holding the lock also holds an ``flock`` of the file for as long as it lives (the
kernel drops it when the process ends, however it ends; forked children such as DataLoader workers close their
copy). On the same host and boot (the record's ``boot_id``, ``/proc/sys/kernel/random/boot_id``) that flock
decides, whatever PID namespace the run was in: a live run in another container sharing the hostname (and the
work folder) keeps its lock, one whose container is gone does not. A lock taken under another boot of this host
is gone (the machine restarted). A record without the flock (a file system that cannot lock) falls back on the
pid and its start time, checked only in the run's own PID namespace (the record's ``pid_ns``,
``/proc/self/ns/pid``): another namespace's pid cannot be checked from here, as another host's. Two machines
given the same hostname cannot be told apart from one restarted.

**One takeover.** Runs taking over the same stale lock at the same moment: each takes an exclusive flock of the
stale file, and only under it checks that the path still names that file with that record, and removes it; the
other then finds the path changed (or a live run's lock) and goes back to the start. Where the file system
cannot lock files at all, a stale lock is not taken over (the message says to delete it).
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

from mmengine.logging import print_log

__all__ = ['LOCK_NAME', 'RunLock', 'RunLockError', 'release_held_locks']

LOCK_NAME = 'run.lock'
_held: 'list[RunLock]' = []  # locks this process holds, released at exit
TAKEOVER_WAIT_S = 0.5  # how long a stale lock's flock is waited for (another run taking it over holds it briefly)


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


@functools.lru_cache(maxsize=None)
def _boot_id() -> Optional[str]:
    """This machine's boot (Linux's ``boot_id``: a new one at each start), None where there is none."""
    try:
        with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
            return f.read().strip() or None
    except OSError:
        return None


def _slurm_run() -> dict:
    """``slurm_job`` and ``slurm_restart`` (its requeues so far) of the Slurm job this process runs in; {} outside
    one."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job:
        return {}
    try:
        restart = int(os.environ.get('SLURM_RESTART_COUNT') or 0)
    except ValueError:
        restart = 0
    return dict(slurm_job=job, slurm_restart=restart)


def _pid_namespace() -> Optional[str]:
    """This process's PID namespace (``pid:[INODE]``), None where there is none."""
    try:
        return os.readlink('/proc/self/ns/pid')
    except OSError:
        return None


def _flock(fd: int) -> Optional[bool]:
    """An exclusive flock of ``fd`` without waiting: True, False when another open file holds one, None when the
    file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the held locks' files: the flock is its
    parent's, and ends with it."""
    for lock in _held:
        lock._close()
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """``WORK_DIR/run.lock``: :meth:`acquire` takes it or raises :class:`RunLockError`; :meth:`release`."""

    def __init__(self, work_dir: str, command: Optional[str] = None):
        self.work_dir = os.path.abspath(work_dir)
        self.path = os.path.join(self.work_dir, LOCK_NAME)
        self.command = command if command is not None else ' '.join([sys.executable] + sys.argv)
        self.held = False
        self._fd: Optional[int] = None  # the lock file, flocked while the run lives

    def _record(self) -> dict:
        pid = os.getpid()
        return dict(pid=pid, host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S'),
                    process_start=_process_start(pid), command=self.command, boot_id=_boot_id(),
                    pid_ns=_pid_namespace(), **_slurm_run())

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

    def is_stale(self, record: dict, unlocked: bool = False) -> bool:
        """The lock's process is gone (module docstring): on this host, under another boot; in this boot, its
        flock free (``unlocked``: this process holds it now) and, in this PID namespace, no live process with its
        pid and start time. A Slurm job requeued (``SLURM_RESTART_COUNT`` above the lock's, the same
        ``SLURM_JOB_ID``): its earlier run is gone, on whatever node it ran (Slurm ends every process of a job before
        it starts it again); a requeued job on another node was refused by its own killed run's lock."""
        now = _slurm_run()
        if now and record.get('slurm_job') == now['slurm_job'] \
                and isinstance(record.get('slurm_restart'), int) and now['slurm_restart'] > record['slurm_restart']:
            return True
        if record.get('host') != socket.gethostname() or not isinstance(record.get('pid'), int):
            return False
        boot = _boot_id()
        if boot and record.get('boot_id') and record['boot_id'] != boot:
            return True
        flocked = bool(record.get('flock') and boot and record.get('boot_id') == boot)
        if flocked and not unlocked:
            return False
        if record.get('pid_ns') and record['pid_ns'] != _pid_namespace():
            return flocked  # its pid is another namespace's: only a free flock says it is gone
        start = _process_start(record['pid'])
        return start is None or (record.get('process_start') is not None
                                 and abs(start - record['process_start']) > 1)

    @staticmethod
    def _elsewhere(record: dict) -> str:
        """What the refusal adds for a run of this host in another PID namespace (its pid is not one of ours)."""
        if record.get('host') != socket.gethostname() or not record.get('pid_ns') or \
                record['pid_ns'] == _pid_namespace() or record.get('boot_id') != _boot_id():
            return ''
        return (' (in another PID namespace: another container on this host' +
                ('' if record.get('flock') else ', whose pid cannot be checked from here') + ')')

    def _create(self, record: dict) -> bool:
        """Write the lock only if there is none (a temporary file hard-linked to the name: atomic), flocked before
        it has the name; this process keeps it open while it holds the lock."""
        tmp = f'{self.path}.{os.getpid()}.{threading.get_ident()}.tmp'
        fd: Optional[int] = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            os.write(fd, json.dumps(dict(record, flock=bool(_flock(fd)))).encode('utf-8'))
            os.fsync(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: create-exclusive (a reader may see it empty)
                os.close(fd)
                fd = None
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                except FileExistsError:
                    return False
                os.write(fd, json.dumps(dict(record, flock=bool(_flock(fd)))).encode('utf-8'))
            self._fd, fd = fd, None
            return True
        finally:
            if fd is not None:
                os.close(fd)
            os.unlink(tmp)

    def _names(self, fd: int) -> bool:
        """Whether the lock's path still names the file open as ``fd``."""
        try:
            here, there = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _take_over(self, other: dict) -> str:
        """Remove the lock of record ``other`` if its run is gone, atomically (module docstring): ``'removed'``,
        ``'changed'`` (the path names another file, or another record, now: look again) or ``'live'``."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 'changed'
        try:
            if not self.is_stale(other, unlocked=True):  # alive whatever its flock: no need to look at it
                return 'live'
            deadline = time.monotonic() + TAKEOVER_WAIT_S
            locked = _flock(fd)
            while locked is False and time.monotonic() < deadline and self._names(fd):
                time.sleep(0.02)
                locked = _flock(fd)
            if not self._names(fd):
                return 'changed'
            with open(fd, encoding='utf-8', closefd=False) as f:
                try:
                    now = json.loads(f.read())
                except ValueError:
                    now = {}
            if now != other:
                return 'changed'
            if not self.is_stale(other, unlocked=bool(locked)):
                return 'live'
            if not locked:
                if locked is None:  # no flock on this file system: two runs could both remove it
                    raise RunLockError(f'{self.path} is left by a run that is gone ({self.describe(other)}), but this '
                                       'file system cannot lock files, so it is not taken over (two runs starting '
                                       'at once could both take it): delete it if that run is over')
                return 'live'  # held by a process this one cannot see end (a child of that run)
            os.unlink(self.path)
            return 'removed'
        finally:
            os.close(fd)

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
            if other:
                verdict = self._take_over(other)
                if verdict == 'removed':
                    print_log(f'{self.path}: taking over the lock of a run that is gone ({self.describe(other)}); '
                              'its checkpoints stay as they are', logger='current', level=30)
                if verdict != 'live':
                    continue
            if not other:  # being written, or damaged
                time.sleep(0.5)
                other = self.read() or {}
                if not other:
                    raise RunLockError(f'{self.path} exists but cannot be read; if no other run uses '
                                       f'{self.work_dir}, delete it')
            raise RunLockError(
                f'{self.work_dir} is in use by another run: {self.describe(other)}{self._elsewhere(other)}; wait for '
                f'it to end or choose another --work-dir (delete {self.path} only if that run is over)')
        raise RunLockError(f'{self.path}: could not take the lock (other runs starting at the same time?)')

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

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
            except OSError as exc:   # a folder gone read-only, a disk lost: at exit, after the run's own error
                print(f'{self.path}: not removed ({exc.strerror or exc}); the next run in this folder on this host '
                      'takes it over', file=sys.stderr, flush=True)
        self._close()


def release_held_locks() -> None:
    """Release every lock this process holds (at exit, and before the stall watchdog ends the process)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_held_locks)
