"""The run lock's takeover (``engine/lockfile.py``): two runs taking over the same stale lock at once, only one
gets it; a run in another PID namespace (another container sharing the hostname) is not taken for gone by its pid,
its flock says whether it lives (a forked child of the run does not keep it); a lock of an earlier boot is gone.
tests/engine/test_runguard.py has the rest."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.train_utils import train_env
from xtuner_plugins.engine import lockfile, runlock
from xtuner_plugins.engine.lockfile import LOCK_NAME, RunLock, RunLockError

HOST = socket.gethostname()
OTHER_NS = 'pid:[1]'  # no process's namespace


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    return gone.pid


def write_record(path, **record):
    """The lock's record written over in place (the same file: a holder's flock stays)."""
    record = dict(dict(host=HOST, started='2024-01-02 03:04:05', command='train.py cfg'), **record)
    with open(path, 'r+' if os.path.exists(path) else 'w', encoding='utf-8') as f:
        f.truncate(0)
        json.dump(record, f)
    return record


@pytest.fixture
def logged(monkeypatch):
    lines = []
    for module in (lockfile, runlock):   # the takeover's line and the config dump's
        monkeypatch.setattr(module, 'print_log', lambda msg, logger=None, level=20: lines.append(msg))
    return lines


def test_two_runs_taking_over_one_stale_lock_at_once_one_gets_it(tmp_path, monkeypatch, logged):
    """B has checked that the lock is stale and is about to remove it when A does the same: before, A removed it
    and took the lock, then B removed A's lock and took it too (both ran in one work folder)."""
    path = str(tmp_path / LOCK_NAME)
    write_record(path, pid=dead_pid(), process_start=1.0)
    monkeypatch.setattr(lockfile, 'TAKEOVER_WAIT_S', 5.0)
    b_removing, a_done = threading.Event(), threading.Event()
    unlink = os.unlink

    def paused_unlink(target, *args, **kw):
        if target == path and threading.current_thread().name == 'B' and not b_removing.is_set():
            b_removing.set()
            a_done.wait(timeout=1.0)  # A goes through meanwhile (or waits on B's flock of the stale file)
        return unlink(target, *args, **kw)

    monkeypatch.setattr(os, 'unlink', paused_unlink)
    locks, outcome = {}, {}

    def take(name):
        locks[name] = RunLock(str(tmp_path), command=name)
        try:
            locks[name].acquire()
            outcome[name] = 'held'
        except RunLockError as exc:
            outcome[name] = str(exc)
        finally:
            if name == 'A':
                a_done.set()

    b = threading.Thread(target=take, args=('B',), name='B')
    b.start()
    assert b_removing.wait(timeout=30)
    a = threading.Thread(target=take, args=('A',), name='A')
    a.start()
    a.join(30)
    b.join(30)
    try:
        assert outcome['B'] == 'held' and outcome['A'].startswith(f'{tmp_path} is in use by another run: pid '), outcome
        assert json.load(open(path))['command'] == 'B'
        assert len(logged) == 1 and 'taking over the lock of a run that is gone' in logged[0]
    finally:
        for lock in locks.values():
            lock.release()
    assert not os.path.exists(path)


def test_a_run_in_another_pid_namespace_is_not_gone_for_a_pid_unseen_here(tmp_path, logged):
    """A lock of this host whose pid is another namespace's (another container sharing the hostname): without a
    flock it cannot be checked, and is refused, not taken over because no process here has that pid."""
    path = str(tmp_path / LOCK_NAME)
    write_record(path, pid=dead_pid(), process_start=1.0, boot_id=lockfile._boot_id(), pid_ns=OTHER_NS)
    with pytest.raises(RunLockError) as refused:
        RunLock(str(tmp_path)).acquire()
    assert str(refused.value) == (
        f'{tmp_path} is in use by another run: pid {json.load(open(path))["pid"]} on host {HOST}, started '
        f'2024-01-02 03:04:05 (train.py cfg) (in another PID namespace: another container on this host, whose pid '
        f'cannot be checked from here); wait for it to end or choose another --work-dir (delete {path} only if '
        f'that run is over)')
    assert logged == []


def test_a_runs_flock_says_whether_it_lives_wherever_its_pid_is(tmp_path, logged):
    """A live run holds its lock file's flock: refused though its pid (made another namespace's here) is unseen;
    once it is killed the flock is free and the lock is taken over (a container restarted)."""
    code = ('import sys, time; from xtuner_plugins.engine.lockfile import RunLock; RunLock(sys.argv[1]).acquire(); '
            'print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], env=train_env(), stdout=subprocess.PIPE,
                              text=True)
    path = str(tmp_path / LOCK_NAME)
    try:
        assert any(line.strip() == 'held' for line in holder.stdout)  # after the package's start-up lines
        record = json.load(open(path))
        assert record['flock'] is True and record['boot_id'] == lockfile._boot_id()
        write_record(path, **dict(record, pid=dead_pid(), pid_ns=OTHER_NS))  # as another container's run
        with pytest.raises(RunLockError, match='is in use by another run: .*another container on this host\\);'):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(tmp_path), command='mine')
    lock.acquire()
    try:
        assert json.load(open(path))['command'] == 'mine' and 'taking over the lock of a run that is gone' in logged[0]
    finally:
        lock.release()


def test_a_lock_of_an_earlier_boot_is_gone(tmp_path, logged):
    """This host restarted since: whatever lives here now under that pid is not that run."""
    path = str(tmp_path / LOCK_NAME)
    write_record(path, pid=os.getppid(), process_start=lockfile._process_start(os.getppid()),
                 boot_id='00000000-0000-0000-0000-000000000000', pid_ns=lockfile._pid_namespace())
    lock = RunLock(str(tmp_path), command='mine')
    lock.acquire()
    try:
        assert json.load(open(path))['command'] == 'mine' and len(logged) == 1
    finally:
        lock.release()


def test_a_dead_runs_forked_child_does_not_keep_its_lock(tmp_path, logged):
    """A DataLoader worker forked by the run inherits the lock file: it closes its copy, so the flock ends with the
    run (the worker living on a while after it would otherwise keep the run alive for the takeover)."""
    code = ('import os, sys, time; from xtuner_plugins.engine.lockfile import RunLock; RunLock(sys.argv[1]).acquire()\n'
            'child = os.fork()\n'
            'if child == 0:\n    time.sleep(120)\n    os._exit(0)\n'
            'print("held", child, flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], env=train_env(), stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        child = int(next(line for line in holder.stdout if line.startswith('held ')).split()[1])
        holder.kill()
        holder.wait()
        lock = RunLock(str(tmp_path), command='mine')
        lock.acquire()
        lock.release()
        assert 'taking over the lock of a run that is gone' in logged[0]
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, 9)


def test_a_work_folder_that_is_the_configs_own_keeps_the_config_file(tmp_path, logged):
    """``tools/train.py exp/cfg.py --work-dir exp``: before, MMEngine's copy of the config (WORK_DIR/cfg.py)
    replaced the config file itself, comments and ``_base_`` gone, with its flattened text."""
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.engine.runlock import config_file_in_work_dir
    config = tmp_path / 'exp' / 'cfg.py'
    config.parent.mkdir()
    config.write_text("_base_ = ['./base.py']  # mine\n")
    dumped = []

    def dump(runner):
        dumped.append(runner.work_dir)
        (tmp_path / runner.work_dir / 'cfg.py').write_text('flattened = 1\n')

    for work_dir in (config.parent, tmp_path / 'other', tmp_path / 'link'):
        work_dir.mkdir(exist_ok=True) if work_dir.name != 'link' else work_dir.symlink_to(config.parent)
        runner = SimpleNamespace(_hooks=[], cfg=SimpleNamespace(filename=str(config)), work_dir=str(work_dir),
                                 timestamp='T')
        Runner.dump_config(runner, _original=dump)
    assert dumped == [str(tmp_path / 'other')] and config.read_text() == "_base_ = ['./base.py']  # mine\n"
    assert logged[0] == (f'the config is not copied into the work folder: {config} is the config file itself '
                         '(--work-dir is its folder), which the copy would replace with its flattened text; the '
                         f"run's full config is in {config.parent}/T/vis_data/config.py and in every checkpoint")
    assert config_file_in_work_dir(None, str(tmp_path)) is False


def test_a_work_folder_holding_files_of_the_same_names_keeps_them(tmp_path, logged):
    """``--work-dir`` the data folder (or ``.``): the run replaced the user's own ``pretrain_mlp.py`` with its copy
    of the config and their ``data_manifest.json`` with its manifest. An earlier run's copy and manifest are still
    replaced; anything else is left, said in the log."""
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.engine.badsamples import read_manifest
    config = tmp_path / 'configs' / 'pretrain_mlp.py'
    config.parent.mkdir()
    config.write_text('from x import y\n')
    dumped = []
    for k, (text, replaced) in enumerate((('# my notes\n', False), ('from mmengine import read_base\n', False),
                                          ("model = dict(type='a.B')\ntrain_cfg = dict(max_iters=4)\n", True))):
        work = tmp_path / f'w{k}'
        work.mkdir()
        (work / 'pretrain_mlp.py').write_text(text)
        runner = SimpleNamespace(_hooks=[], cfg=SimpleNamespace(filename=str(config)), work_dir=str(work),
                                 timestamp='T')
        Runner.dump_config(runner, _original=lambda r: dumped.append(r.work_dir))
        assert (str(work) in dumped) == replaced, text
    assert logged[0] == (f'the config is not copied into the work folder: {tmp_path}/w0/pretrain_mlp.py is there and '
                         "is no earlier copy of a run's config (a file of the folder given as --work-dir), which the "
                         f"copy would replace; the run's full config is in {tmp_path}/w0/T/vis_data/config.py and in "
                         'every checkpoint') and len(logged) == 2
    assert read_manifest(str(tmp_path / 'none.json')) is None
    (tmp_path / 'm.json').write_text('{"mine": true}')
    assert read_manifest(str(tmp_path / 'm.json')) is False
    (tmp_path / 'm.json').write_text('{"sources": []}')   # (an earlier version's: no total_used)
    assert read_manifest(str(tmp_path / 'm.json')) == {'sources': []}


def test_a_requeued_slurm_jobs_earlier_run_is_gone_on_any_node(tmp_path, logged, monkeypatch):
    """A Slurm job killed before it could release its lock, then requeued onto another node: its own earlier run's
    lock (host node07) refused it as 'in use by another run'. The same job at a higher SLURM_RESTART_COUNT takes
    it over; another job's lock on another node is still not taken."""
    path = str(tmp_path / LOCK_NAME)
    monkeypatch.setenv('SLURM_JOB_ID', '777')
    monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
    write_record(path, host='node07', pid=4242, slurm_job='777', slurm_restart=0)
    lock = RunLock(str(tmp_path), command='requeued')
    lock.acquire()
    try:
        record = json.load(open(path))
        assert (record['command'], record['slurm_job'], record['slurm_restart']) == ('requeued', '777', 1)
    finally:
        lock.release()
    write_record(path, host='node07', pid=4242, slurm_job='778', slurm_restart=0)
    with pytest.raises(RunLockError, match='pid 4242 on host node07'):
        RunLock(str(tmp_path), command='other job').acquire()
    monkeypatch.setenv('SLURM_RESTART_COUNT', '0')
    write_record(path, host='node07', pid=4242, slurm_job='777', slurm_restart=0)   # the same run: not gone
    with pytest.raises(RunLockError):
        RunLock(str(tmp_path), command='same restart').acquire()


def test_two_runs_whose_checkpoints_go_to_one_folder_are_not_let_run_at_once(tmp_path):
    """Runs in a/run and c/run with one default_hooks.checkpoint.out_dir save to out/run (MMEngine's
    out_dir/<the work folder's name>): the second, started while the first lived, wrote over its checkpoints and
    rotated them out, exit 0. It is refused; its own work folder's lock is let go; after the first ends it runs."""
    from types import SimpleNamespace

    from xtuner_plugins.engine.runlock import RunLockHook
    hooks = dict(checkpoint=dict(out_dir=str(tmp_path / 'out')))
    first, second = (SimpleNamespace(work_dir=str(tmp_path / d / 'run'), cfg=dict(default_hooks=hooks))
                     for d in 'ac')
    held, refused = RunLockHook(), RunLockHook()
    held.acquire(first)
    assert not held.refused and (tmp_path / 'out' / 'run' / LOCK_NAME).exists()
    refused.acquire(second)
    assert refused.refused.startswith("the checkpoint folder (default_hooks.checkpoint.out_dir/<work folder's "
                                      f"name>): {tmp_path / 'out' / 'run'} is in use by another run: pid {os.getpid()}")
    assert refused.lock is None and not (tmp_path / 'c' / 'run' / LOCK_NAME).exists()
    held.after_run(first)
    assert not (tmp_path / 'out' / 'run' / LOCK_NAME).exists() and not (tmp_path / 'a' / 'run' / LOCK_NAME).exists()
    again = RunLockHook()
    again.acquire(second)
    assert not again.refused and again.out_lock is not None
    again.after_run(second)
    alone = RunLockHook()   # no out_dir: the work folder is the checkpoint folder, one lock
    alone.acquire(SimpleNamespace(work_dir=str(tmp_path / 'b'), cfg=dict(default_hooks=dict(checkpoint=dict()))))
    assert alone.lock is not None and alone.out_lock is None
    alone.after_run(None)


def test_a_lock_that_cannot_be_removed_at_the_end_is_one_line(tmp_path, logged, monkeypatch, capsys):
    """A work folder gone read-only during the run: after the run's own one-line error, the lock's release at exit
    raised an 'Exception ignored in atexit' traceback (OSError: [Errno 30] Read-only file system)."""
    import errno
    lock = RunLock(str(tmp_path))
    lock.acquire()

    def read_only(path):
        raise OSError(errno.EROFS, 'Read-only file system', path)
    monkeypatch.setattr(lockfile.os, 'unlink', read_only)
    lock.release()
    assert capsys.readouterr().err == (f'{tmp_path}/{LOCK_NAME}: not removed (Read-only file system); the next run '
                                       'in this folder on this host takes it over\n')
    assert not lock.held
