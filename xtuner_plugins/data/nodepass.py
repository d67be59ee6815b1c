"""Work done once per node, over every core: the sample index, the start-up check and the sample lengths.

:func:`node_once` makes the first process on a node (rank or not) that needs a cache build it, while the others
wait on a file lock (``fcntl.flock``, polled, with a log line every minute) and then read what it wrote. No rank
waits in a collective (an NCCL or gloo barrier with its 30-minute timeout): a rank waits on a file, and when the
builder dies its lock is released by the kernel and the next waiter builds. Once the lock is free, every rank goes
on within the seconds it takes to map the cache, so their first collective finds them all.

:func:`run_slices` splits ``n`` samples into contiguous slices, disjoint and together complete, and runs them on
a pool of forked processes (every core by default: the other ranks of the node are waiting meanwhile), the
results in slice order; :func:`imap_parts` runs given parts so, yielding each result as it comes
(``tools/shard_dataset.py``).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

from mmengine.logging import print_log

from xtuner_plugins.errors import Stated

T = TypeVar('T')
MIN_SLICE = 2000        # fewer samples than this per process: no pool (forking costs more than it saves)
LOG_EVERY_S = 60.0
_TASK: Optional[Callable] = None  # what the forked pool processes run, set before the pool forks


def default_workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def slices(n: int, k: int) -> List[Tuple[int, int]]:
    """``k`` (or fewer) contiguous ``(start, stop)`` slices of ``range(n)``, disjoint and together complete."""
    k = max(1, min(k, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _run(bounds: Tuple[int, int]):
    return _TASK(*bounds)


class WorkerDied(Stated, RuntimeError):
    """A process of the pool ended abruptly (killed: the OOM killer, a signal): nothing it computed is kept."""


def imap_parts(task: Callable[[int, int], T], parts: List[Tuple[int, int]], workers: int,
               what: str = 'the work') -> Iterator[T]:
    """``task(start, stop)`` for each of ``parts``, on ``workers`` forked processes (in this process when
    ``workers`` is 1), yielded in the parts' order as they finish.

    A ``concurrent.futures`` process pool, not ``multiprocessing.Pool``: a worker that dies (the OOM killer, a
    signal) ends it with ``BrokenProcessPool``, where ``Pool.imap`` waited forever for the part it lost; and when the
    caller stops reading (an error, Ctrl-C, SIGTERM to the process group) the workers are killed outright, where
    ``Pool.terminate`` could wait forever on a queue lock a worker died holding. A worker's death is raised as
    :class:`WorkerDied`, naming ``what`` was being done."""
    global _TASK
    if workers <= 1 or len(parts) <= 1:
        for a, b in parts:
            yield task(a, b)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    _TASK = task
    pool = ProcessPoolExecutor(min(workers, len(parts)), multiprocessing.get_context('fork'), _end_with,
                               (os.getpid(),))
    done = False
    try:
        yield from pool.map(_run, parts)
        done = True
    except BrokenProcessPool:
        raise WorkerDied(f'{what}: one of its {min(workers, len(parts))} processes ended abruptly (killed: out of '
                         f'memory? see dmesg)') from None
    finally:
        _TASK = None
        if not done:   # stopped early: the workers are killed, not awaited (they ignore SIGINT)
            if hasattr(pool, 'kill_workers'):   # Python 3.14's own
                pool.kill_workers()
            else:   # before it, the pool's table of its processes (private, read where it is there)
                for process in list((getattr(pool, '_processes', None) or {}).values()):
                    process.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def run_slices(task: Callable[[int, int], T], n: int, workers: Optional[int] = None, what: str = '',
               progress: Optional[Callable[[int], object]] = None) -> List[T]:
    """``task(start, stop)`` over slices of ``range(n)``, in a pool of ``workers`` forked processes (default: every
    core; in this process when one is enough); the results in slice order. Progress is logged every minute, or
    given to ``progress`` (the samples each finished slice held)."""
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, n // MIN_SLICE))
    if workers == 1:
        return [task(0, n)] if n else []
    parts = slices(n, workers * 8)  # small slices: a slow one does not hold up the end
    results: List[T] = []
    begun, logged, done = time.monotonic(), time.monotonic(), 0
    for (a, b), result in zip(parts, imap_parts(task, parts, workers, what or 'the work')):
        results.append(result)
        done += b - a
        if progress is not None:
            progress(b - a)
        elif time.monotonic() - logged > LOG_EVERY_S:
            logged = time.monotonic()
            print_log(f'{what}: {done} of {n} samples in {logged - begun:.0f} s on {workers} processes',
                      logger='current')
    return results


def _end_with(parent: int) -> None:
    """A pool worker's start: killed when its parent dies (Linux's ``PR_SET_PDEATHSIG``). A tool killed by
    SIGTERM (``kill``, ``timeout``) left its workers checking on, orphaned, for minutes, each then printing
    ``BrokenPipeError`` tracebacks. SIGKILL: a worker holds nothing to save, and SIGTERM would run the handlers
    it inherited from the parent. A worker ignores SIGINT (Ctrl-C reaches the whole process group; the parent,
    which stops the pool, says what was stopped) and dies of SIGTERM, which the pool sends its workers as it closes:
    the handler inherited from a tool that reads SIGTERM as Ctrl-C (``signals.sigterm_as_interrupt``) made each
    worker the pool closed print a traceback, also after a run that succeeded."""
    import signal

    from xtuner_plugins.signals import parent_death_signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    arm = parent_death_signal(signal.SIGKILL)
    if arm is None:   # not Linux
        return
    arm()
    if os.getppid() != parent:   # the parent died before this ran
        os._exit(1)


_said_no_locks: set = set()


def _no_locks(folder: str, exc: OSError) -> None:
    """Say once per folder that its file system takes no file locks: each process then computes its own."""
    if folder not in _said_no_locks:
        _said_no_locks.add(folder)
        print_log(f'the cache folder {folder} takes no file locks ({exc.strerror}: NFS mounted nolock, Lustre without '
                  f'flock?): each process computes what it needs itself, at the same time as the others of its node; '
                  f'set the data set\'s cache_dir to a local disk (/tmp/...) for one pass per node', logger='current',
                  level=30)


def node_once(cache_file: str, load: Callable[[], Optional[T]], build: Callable[[], T], what: str) -> T:
    """``load()`` if it finds the cache, else ``build()`` by one process of the node at a time (the others wait on
    ``cache_file + '.lock'``, then ``load()`` what it wrote). Without a writable cache folder, or on a file system
    without file locks (one warning), each builds its own (the caches are written atomically)."""
    found = load()
    if found is not None:
        return _used(cache_file, found)
    lock_file = cache_file + '.lock'
    try:
        os.makedirs(os.path.dirname(lock_file) or '.', exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask: a group may share the folder
    except OSError:
        return build()
    try:
        begun = logged = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.5)
                if time.monotonic() - logged > LOG_EVERY_S:   # (was unreachable, after the return below)
                    logged = time.monotonic()
                    print_log(f'waiting {logged - begun:.0f} s for another process of this node computing {what} '
                              f'(lock {lock_file})', logger='current')
            except OSError as exc:  # a file system without file locks (NFS mounted nolock, Lustre without flock)
                _no_locks(os.path.dirname(lock_file), exc)
                return build()
        found = load()  # another process built it while this one waited
        return _used(cache_file, found) if found is not None else build()
    finally:
        os.close(fd)  # releases the lock


def _used(cache_file: str, found: T) -> T:
    """``found``, read from ``cache_file``, whose modification time is set to now: the time a cache was last used,
    by which ``tools/data_cache.py --prune`` finds the entries nothing has read for a while. Another user's file
    (a cache folder a group shares, written under umask 022) cannot be given a time by this user: this user's own
    mark beside it is (``CACHE_FILE.used-UID``, empty). A folder this process may only read is left as it is."""
    try:
        os.utime(cache_file)
    except PermissionError:
        try:
            mark = f'{cache_file}.used-{os.getuid()}'
            with open(mark, 'a'):
                pass
            os.utime(mark)
        except OSError:
            pass
    except OSError:
        pass
    return found
