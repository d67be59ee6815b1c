"""Work once per node: slices disjoint and complete, a pool of forked processes giving the results in order, and a
cache built by one process while the others wait on its file lock (no collective)."""

import multiprocessing
import os
import time

import pytest

from xtuner_plugins.data import nodepass
from xtuner_plugins.data.nodepass import node_once, run_slices, slices


@pytest.mark.parametrize('n, k', [(0, 3), (1, 4), (10, 3), (10, 10), (7, 20), (1000, 16)])
def test_slices_are_disjoint_and_complete(n, k):
    parts = slices(n, k)
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(n)) and all(b > a for a, b in parts) and len(parts) <= max(1, k)


def test_a_pool_of_processes_computes_every_slice_once_in_order(monkeypatch):
    monkeypatch.setattr(nodepass, 'MIN_SLICE', 1)
    done = run_slices(lambda a, b: (os.getpid(), list(range(a, b))), 100, workers=2)
    assert [i for _, part in done for i in part] == list(range(100))
    assert os.getpid() not in {pid for pid, _ in done}  # computed in the pool, not here
    assert run_slices(lambda a, b: [(a, b)], 100, workers=1) == [[(0, 100)]]  # one process: here, one slice


def _racer(cache, log):
    def build():
        with open(log, 'a') as f:
            f.write(f'{os.getpid()}\n')
        time.sleep(0.5)
        with open(cache, 'w') as f:
            f.write('built')
        return 'built'

    def load():
        return open(cache).read() if os.path.exists(cache) else None
    result = node_once(cache, load, build, 'a test cache')
    assert result == 'built'


def test_one_process_of_the_node_builds_while_the_others_wait(tmp_path):
    cache, log = str(tmp_path / 'c' / 'cache.txt'), str(tmp_path / 'builders.txt')
    ctx = multiprocessing.get_context('fork')
    procs = [ctx.Process(target=_racer, args=(cache, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(open(log).read().split()) == 1  # built once; the other three read it


def test_without_a_writable_cache_folder_each_process_builds_its_own(tmp_path):
    blocked = tmp_path / 'file'
    blocked.write_text('')
    assert node_once(str(blocked / 'x' / 'cache'), lambda: None, lambda: 'mine', 'a test cache') == 'mine'


def test_a_cache_folder_without_file_locks_is_said_once_and_each_process_builds(tmp_path, monkeypatch):
    """NFS mounted nolock (ENOLCK), Lustre without flock (ENOSYS): the lock once raised OSError, a traceback before
    training; now each process builds its own, as without a writable folder, after one warning."""
    import errno
    import fcntl
    logged = []

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    monkeypatch.setattr(nodepass, 'print_log', lambda msg, **kw: logged.append(msg))
    for k in range(2):
        assert node_once(str(tmp_path / 'c' / f'x{k}'), lambda: None, lambda: 'built', 'x') == 'built'
    assert len(logged) == 1 and logged[0].startswith(f'the cache folder {tmp_path}/c takes no file locks (No locks '
                                                     f'available: NFS mounted nolock')


def test_the_pool_workers_end_with_the_process_that_started_them(tmp_path):
    """A tool killed outright (SIGTERM from kill or timeout) left its check workers running, orphaned, for
    minutes, then printing BrokenPipeError tracebacks: each worker now dies with its parent."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    pids = tmp_path / 'pids'
    script = textwrap.dedent(f'''
        import os, time
        from xtuner_plugins.data.nodepass import MIN_SLICE, run_slices
        def task(a, b):
            with open({str(pids)!r}, 'a') as f:
                f.write(f'{{os.getpid()}}\\n')
            time.sleep(120)
        run_slices(task, 4 * MIN_SLICE, workers=2)
    ''')
    from tests.train_utils import REPO_ROOT
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO_ROOT)
    try:
        deadline = time.time() + 60
        while not (pids.exists() and len(set(pids.read_text().split())) >= 2):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        workers = [int(p) for p in set(pids.read_text().split())]
        def running(pid):   # (a zombie is dead, waiting for a parent that is gone)
            try:
                return open(f'/proc/{pid}/stat').read().split()[2] != 'Z'
            except FileNotFoundError:
                return False
        deadline = time.time() + 10
        while any(map(running, workers)) and time.time() < deadline:
            time.sleep(0.2)
        alive = [p for p in workers if running(p)]
        assert not alive, f'workers {alive} outlived their parent'
    finally:
        proc.kill()
        for p in set(pids.read_text().split()) if pids.exists() else ():
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_pool_worker_ignores_ctrl_c_and_dies_of_the_pools_sigterm():
    """Ctrl-C reaches every process of the group: each busy worker printed a KeyboardInterrupt traceback under the
    parent's one line. And the pool ends its workers with SIGTERM as it closes: a worker that inherited a tool's
    SIGTERM-as-Ctrl-C handler printed a traceback then, also after a run that succeeded (2 and 3 of 5
    shard_dataset runs)."""
    import signal

    from xtuner_plugins.signals import sigterm_as_interrupt
    with sigterm_as_interrupt():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # the worker, as the pool starts it
            nodepass._end_with(os.getppid())
            os.write(write, repr((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(write)
        assert os.read(read, 200).decode() == repr((signal.SIG_IGN, signal.SIG_DFL))


def test_imap_parts_gives_each_result_in_order_as_it_comes():
    parts = [(0, 3), (3, 4), (4, 9)]
    assert list(nodepass.imap_parts(lambda a, b: (os.getpid(), a, b), parts, 1)) == [
        (os.getpid(), a, b) for a, b in parts]            # one worker: here
    pooled = list(nodepass.imap_parts(lambda a, b: (os.getpid(), a, b), parts, 2))
    assert [(a, b) for _, a, b in pooled] == parts and os.getpid() not in {pid for pid, _, _ in pooled}


def _dies_at_3(a, b):
    if a == 3:
        os.kill(os.getpid(), 9)
    return a


def test_a_killed_worker_is_one_stated_error_not_a_hang():
    """multiprocessing.Pool's imap waited forever for the part a killed worker (the OOM killer) had taken."""
    from xtuner_plugins.errors import Stated
    with pytest.raises(nodepass.WorkerDied, match=r'^checking: one of its 2 processes ended abruptly \(killed: out '
                                                  r'of memory\? see dmesg\)$') as err:
        list(nodepass.imap_parts(_dies_at_3, [(0, 3), (3, 4), (4, 9), (9, 12)], 2, 'checking'))
    assert isinstance(err.value, Stated)
