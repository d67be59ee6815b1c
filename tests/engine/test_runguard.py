"""One run per work folder (``engine/runlock.py``) and a stalled rank that stops the run (``engine/watchdog.py``):
the lock in this process, and real toy trainings (``slow``): two runs in one folder, a takeover after a kill,
and two processes on gloo of which one is SIGSTOPped."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.train_utils import REPO_ROOT, run_train, train_env
from xtuner_plugins import launch
from xtuner_plugins.outcome import parse_log
from xtuner_plugins.engine.lockfile import LOCK_NAME, RunLock, RunLockError, _process_start
from xtuner_plugins.engine.watchdog import HEARTBEAT_DIR, diagnose_stall

GUARDED = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_guarded.py')
HOST = socket.gethostname()


def _write_lock(work_dir, **record):
    os.makedirs(work_dir, exist_ok=True)
    record = dict(dict(host=HOST, started='2024-01-02 03:04:05', command='train.py cfg'), **record)
    with open(os.path.join(work_dir, LOCK_NAME), 'w', encoding='utf-8') as f:
        json.dump(record, f)
    return record


def _lock_record(work_dir):
    with open(os.path.join(work_dir, LOCK_NAME), encoding='utf-8') as f:
        return json.load(f)


def test_a_live_run_keeps_its_lock(tmp_path):
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        record = _write_lock(str(tmp_path), pid=live.pid, process_start=_process_start(live.pid))
        with pytest.raises(RunLockError) as refused:
            RunLock(str(tmp_path)).acquire()
        assert str(refused.value) == (
            f'{tmp_path} is in use by another run: pid {live.pid} on host {HOST}, started 2024-01-02 03:04:05 '
            f'(train.py cfg); wait for it to end or choose another --work-dir (delete {tmp_path / LOCK_NAME} only '
            'if that run is over)')
        assert _lock_record(str(tmp_path)) == record
        # another host's lock cannot be checked from here: refused, whatever its pid
        record = _write_lock(str(tmp_path), pid=live.pid, host='node-elsewhere')
        with pytest.raises(RunLockError, match='pid .* on host node-elsewhere'):
            RunLock(str(tmp_path)).acquire()
    finally:
        live.kill()
        live.wait()


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    from xtuner_plugins.engine import lockfile
    logged = []
    monkeypatch.setattr(lockfile, 'print_log', lambda msg, logger=None, level=20: logged.append((level, msg)))
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    _write_lock(str(tmp_path), pid=gone.pid, process_start=1.0)
    lock = RunLock(str(tmp_path), command='mine')
    lock.acquire()
    assert logged == [(30, f'{tmp_path / LOCK_NAME}: taking over the lock of a run that is gone (pid {gone.pid} '
                           f'on host {HOST}, started 2024-01-02 03:04:05 (train.py cfg)); its checkpoints stay as '
                           'they are')]
    mine = _lock_record(str(tmp_path))
    assert mine['pid'] == os.getpid() and mine['host'] == HOST and mine['command'] == 'mine'
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a pid now used by another process (its start time differs) is a dead run's too
    _write_lock(str(tmp_path), pid=os.getppid(), process_start=1.0)
    lock.acquire()
    assert _lock_record(str(tmp_path))['pid'] == os.getpid()
    lock.release()


def test_the_lock_is_released_when_the_process_fails(tmp_path):
    code = ('import sys; from xtuner_plugins.engine.lockfile import RunLock; RunLock(sys.argv[1]).acquire(); '
            'print("held", flush=True); raise RuntimeError("training failed")')
    done = subprocess.run([sys.executable, '-c', code, str(tmp_path)], env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and 'held' in done.stdout and 'training failed' in done.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_diagnose_stall_names_the_silent_rank_and_each_ranks_iteration():
    now = 1000.0
    beats = {0: dict(iter=7, alive=999.5, pid=11, host='a'), 1: dict(iter=6, alive=960.0, pid=12, host='b')}
    message, silent = diagnose_stall(0, 3, beats, now, 30)
    assert silent == [1]  # rank 2 has no file here (another node): not judged
    assert message == ('train: STALLED: rank 1 (pid 12 on host b, last heard 40 s ago) silent for more than 30 s '
                       '(stall_timeout): stopped or frozen; seen by rank 0; last iteration finished: rank 0: 7, '
                       'rank 1: 6, rank 2: no heartbeat here; stopping the run')
    beats[1]['alive'] = 995.0  # computing a long step, or waiting like rank 0: its thread still beats
    assert diagnose_stall(0, 2, beats, now, 30) == ('', [])
    beats[1].update(alive=900.0, done=True)  # finished its training: silent on purpose
    assert diagnose_stall(0, 2, beats, now, 30) == ('', [])
    assert diagnose_stall(1, 2, {0: dict(iter=7, alive=900.0)}, now, 30)[1] == [0]


def _files(work_dir):
    """Name -> (bytes, modification time) of the files directly in ``work_dir``."""
    found = {}
    for name in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, name)
        if os.path.isfile(path):
            with open(path, 'rb') as f:
                found[name] = (f.read(), os.stat(path).st_mtime_ns)
    return found


@pytest.mark.slow
def test_a_second_run_in_a_busy_work_dir_is_refused_and_a_killed_runs_lock_taken_over(tmp_path):
    work = str(tmp_path / 'work')
    # the first run saves iter_2.pth, logs iteration 3 and sleeps in iteration 4: still running, quiet
    cmd, env = launch.train_command(GUARDED, work, cfg_options={
        'model.pause_at_iter': 4, 'model.pause_how': 'sleep', 'default_hooks.checkpoint.interval': 2})
    os.makedirs(work)
    first = launch.TrainJob(cmd, train_env(extra_env=env), str(tmp_path / 'first.log'))
    try:
        deadline = time.time() + 240
        while not ((parse_log(first.read_log())[2] or 0) >= 3
                   and os.path.exists(os.path.join(work, 'last_checkpoint'))):
            assert first.poll() is None and time.time() < deadline, first.read_log()[-3000:]
            time.sleep(0.5)
        time.sleep(1)
        before = _files(work)
        assert {'iter_2.pth', 'last_checkpoint', LOCK_NAME, 'toy_guarded.py'} <= set(before)
        second = run_train(GUARDED, work, timeout=240, require_checkpoint=False)
        refused = [line for line in second.log.splitlines() if line.startswith('train: refused: ')]
        assert refused == [f'train: refused: {os.path.abspath(work)} is in use by another run: pid {first.proc.pid} '
                           f'on host {HOST}, started {_lock_record(work)["started"]} ({" ".join(cmd)}); wait for '
                           f'it to end or choose another --work-dir (delete {os.path.join(work, LOCK_NAME)} only if '
                           'that run is over)'], second.summary()
        assert second.returncode == 2 and not second.timed_out and 'Traceback' not in second.log, second.summary()
        assert second.failure_reasons[0].startswith(f'refused: {os.path.abspath(work)} is in use by another run: pid '
                                                    f'{first.proc.pid} '), second.failure_reasons
        after = _files(work)
        del after['train_output.log']  # the second run's output (run_train writes it there)
        assert after == before  # checkpoints, last_checkpoint, the config dump, the lock: untouched
        assert first.poll() is None
    finally:
        first.kill('test over')  # SIGKILL: its lock stays behind
        first.close()
    # resuming in the folder of the killed run: its lock is taken over, the run ends well and releases it
    third = run_train(GUARDED, work, cfg_options={'resume': True}, timeout=240)
    assert third.ok, third.summary()
    assert f'taking over the lock of a run that is gone (pid {first.proc.pid} on host {HOST}' in third.log
    assert min(third.losses) == 3 and not os.path.exists(os.path.join(work, LOCK_NAME))


@pytest.mark.slow
def test_a_stopped_rank_stops_the_run_within_the_stall_timeout(tmp_path):
    """Rank 1 SIGSTOPs itself in its third iteration; rank 0 waits in the gradient all-reduce, which gloo would
    let it do for 30 minutes. With a 5 s stall timeout the run ends at once after, naming rank 1."""
    work = str(tmp_path / 'work')
    options = {'model.pause_at_iter': 3, 'model.pause_rank': 1, 'model.pause_how': 'stop',
               'default_hooks.stall_watchdog.timeout': 5}
    beat1 = os.path.join(work, HEARTBEAT_DIR, 'rank_1.json')
    try:
        out = run_train(GUARDED, work, nproc=2, cfg_options=options, timeout=150, require_checkpoint=False)
        ended = time.time()
        assert os.path.exists(beat1), out.summary()
        with open(beat1, encoding='utf-8') as f:
            stopped = json.load(f)
        left = _process_start(stopped['pid'])  # gone: killed by rank 0's watchdog
    finally:  # never leave the stopped rank behind, even when the run was not stopped
        if os.path.exists(beat1):
            with open(beat1, encoding='utf-8') as f:
                pid = json.load(f)['pid']
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    assert not out.timed_out and out.returncode != 0, out.summary()
    # the stall timeout and a loaded machine's margin (gloo alone would wait 30 minutes): a loaded CI machine read 29 s
    assert ended - stopped['alive'] < 5 + 40, out.summary()
    stalled = [line for line in out.log.splitlines() if 'train: STALLED: ' in line]
    assert stalled, out.summary()
    assert stalled[0].endswith(
        f'train: STALLED: rank 1 (pid {stopped["pid"]} on host {HOST}, last heard '
        + stalled[0].split('last heard ')[1].split(' s ago')[0] + ' s ago) silent for more than 5 s (stall_timeout): '
        'stopped or frozen; seen by rank 0; last iteration finished: rank 0: 2, rank 1: 2; stopping the run'), stalled[0]
    assert 'a rank stalled' in out.failure_reasons
    assert left is None, 'the stopped rank was left behind'
    assert not os.path.exists(os.path.join(work, LOCK_NAME))


@pytest.mark.slow
def test_a_slow_step_stops_nothing(tmp_path):
    """Rank 1 takes 8 s over its third step with a 2 s stall timeout: it is slow, not stopped (its heartbeat thread
    goes on), so the run ends well; a rule on the time between iterations would have stopped it."""
    options = {'model.pause_at_iter': 3, 'model.pause_rank': 1, 'model.pause_how': 'sleep', 'model.pause_s': 8,
               'default_hooks.stall_watchdog.timeout': 2}
    out = run_train(GUARDED, str(tmp_path / 'work'), nproc=2, cfg_options=options, timeout=150)
    assert out.ok and out.returncode == 0, out.summary()
    assert 'STALLED' not in out.log


def test_a_heartbeat_the_disk_cannot_take_stops_no_rank(tmp_path, monkeypatch):
    """A full disk under the work folder stopped every rank's heartbeat: the watchdog read it as 'STALLED: rank 0
    ... stopped or frozen' and SIGKILLed a healthy rank, with no word of the disk (a helper's sweep). A rank that
    cannot write its own heartbeat says why, once, and takes no rank for stalled until it writes again."""
    import errno
    import time as clock

    from xtuner_plugins.engine import watchdog
    logs = []
    monkeypatch.setattr(watchdog, 'print_log', lambda msg, **kw: logs.append(msg))
    hook = watchdog.StallWatchdogHook(timeout=1)
    hook.work_dir, hook.world_size = str(tmp_path), 2
    os.makedirs(tmp_path / 'heartbeats')
    hook.path = str(tmp_path / 'heartbeats' / 'rank_0.json')
    hook.state = dict(run='r', rank=0, world_size=2, pid=os.getpid(), host='h', iter=3, done=False)
    with open(tmp_path / 'heartbeats' / 'rank_1.json', 'w') as f:   # rank 1's, its last before the disk filled
        json.dump(dict(run='r', rank=1, pid=1, host='other', iter=3, done=False, alive=clock.time() - 60), f)
    real_open, stopped = open, []

    def full(path, *args, **kwargs):
        if str(path).endswith('.tmp'):
            real_open(path, *args, **kwargs).close()   # made, then the write fails
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(watchdog, 'open', full, raising=False)
    monkeypatch.setattr(hook, '_stop_run', lambda message, silent, beats: stopped.append(message))
    watcher = threading.Thread(target=hook._watch)
    watcher.start()
    clock.sleep(1.5)
    hook._stop.set()
    watcher.join()
    assert stopped == [] and os.listdir(tmp_path / 'heartbeats') == ['rank_1.json']
    assert logs == [f"{tmp_path}/heartbeats: this rank's heartbeat cannot be written (No space left on device): "
                    'until it can, no rank is taken for stalled by its silence (the disk is full? the next '
                    'checkpoint needs room too)']
    monkeypatch.setattr(watchdog, 'open', real_open, raising=False)   # room again: rank 1's silence is seen
    hook._stop.clear()
    hook._watch()
    assert logs[-1] == f'{tmp_path}/heartbeats: heartbeats written again; the stall watchdog watches again'
    assert stopped and stopped[0].startswith('train: STALLED: rank 1 (pid 1 on host other')
