"""Training under Slurm (``xtuner_plugins/engine/slurm.py``, ``engine/preempt.py``), on a real one: Debian's slurm-wlm
(``make slurm``), one node with 2 CPUs, configured and started by this module's fixture (``tests/slurm/cluster.py``)
and stopped after; skipped, saying why, only where it cannot be started.

* ``srun -n2 xtuner train CFG --launcher slurm`` trains the tiny models on both ranks, on the job's own port;
* a task SIGKILLed mid-run makes ``srun --kill-on-bad-exit=1`` fail, and the last complete checkpoint stays;
* ``sbatch --requeue`` (DeepSpeed ZeRO-2, ``tools/train.py``) resumes from it (``--resume PATH``); ``scontrol
  requeue`` (SIGTERM to every task, as preemption and scancel) makes the ranks save the iteration under way and
  stop, and the job's next run (``SLURM_RESTART_COUNT=1``) resumes from that newer checkpoint by itself and
  finishes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import signal
import sys

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import tiny_workspace
from tests.slurm.cluster import Unavailable, start_cluster, wait_for
from tests.train_utils import load_checkpoint_state, train_env
from xtuner_plugins.engine import slurm
from xtuner_plugins.engine import preempt
from xtuner_plugins.launch import DS_CPU_CONFIGS, TrainJob, job_outcome, wait_jobs

CONFIG = os.path.join(ROOT, 'configs', 'pretrain_mlp.py')
SLOW_CONFIG = os.path.join(ROOT, 'tests', 'slurm', 'slow_pretrain_mlp.py')  # 0.3 s more per iteration
EXAMPLES = [os.path.join(ROOT, 'tools', 'slurm', name)
            for name in ('train_1node_8gpus.sbatch', 'train_2nodes_8gpus.sbatch')]
EXAMPLE = EXAMPLES[0]


# ----------------------------------------------------------------------------------------------------------
# Without a cluster: what is read from Slurm's environment
# ----------------------------------------------------------------------------------------------------------
def test_port_from_the_job_id_and_tasks_per_node():
    assert slurm.job_port({'SLURM_JOB_ID': '1234567'}) == 24567
    assert slurm.job_port({'SLURM_JOB_ID': '41'}) != slurm.job_port({'SLURM_JOB_ID': '42'})
    assert slurm.job_port({}) is None
    from xtuner_plugins.slurm_step import expand_counts
    assert expand_counts('2(x3),1') == [2, 2, 2, 1] and expand_counts('bad') == []
    assert slurm.tasks_on_node({'SLURM_TASKS_PER_NODE': '8(x2)', 'SLURM_NODEID': '1'}) == 8
    assert slurm.tasks_on_node({'SLURM_STEP_TASKS_PER_NODE': '4,2', 'SLURM_TASKS_PER_NODE': '8(x2)',
                                'SLURM_NODEID': '1'}) == 2


def test_tasks_that_do_not_match_the_gpus_are_refused_in_one_line():
    env = {'SLURM_STEP_TASKS_PER_NODE': '8', 'SLURM_NODEID': '0', 'CUDA_VISIBLE_DEVICES': '3',
           'SLURMD_NODENAME': 'gpu7'}
    problem = slurm.gpu_problem(env, gpus=1)  # --gpus-per-task=1: each task sees its own GPU only
    assert problem.startswith('Slurm runs 8 tasks on gpu7 but each sees 1 GPU (CUDA_VISIBLE_DEVICES=3)')
    assert '--ntasks-per-node=N with --gpus-per-node=N' in problem and '\n' not in problem
    assert slurm.gpu_problem(env, gpus=8) is None and slurm.gpu_problem({}, gpus=0) is None


def test_launcher_slurm_outside_a_step_is_refused(monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith('SLURM_')] + ['MASTER_PORT', 'MASTER_ADDR']:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as stop:
        slurm.prepare_slurm_env()
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith('train: refused: --launcher slurm needs the environment of a Slurm task')
    # the batch script of a job of 16 tasks runs the command itself, not through srun: it would wait forever
    monkeypatch.setenv('SLURM_JOB_ID', '77')
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '16')
    monkeypatch.setenv('SLURM_NODELIST', 'node[1-2]')
    with pytest.raises(SystemExit):
        slurm.prepare_slurm_env()
    err = capsys.readouterr().err
    assert 'runs in the batch script of job 77 itself, one process for 16 tasks' in err and err.count('\n') == 1
    # a rank past the task count (an environment set by hand) waited for its peers forever
    for procid, ntasks in (('2', '1'), ('0', '0'), ('x', '2')):
        monkeypatch.setenv('SLURM_PROCID', procid)
        monkeypatch.setenv('SLURM_NTASKS', ntasks)
        monkeypatch.setenv('SLURM_STEP_ID', '0')
        with pytest.raises(SystemExit):
            slurm.prepare_slurm_env()
        err = capsys.readouterr().err
        assert f"SLURM_PROCID='{procid}' is no rank of SLURM_NTASKS='{ntasks}' tasks" in err and err.count('\n') == 1


@pytest.mark.parametrize('node_list, first', [('node[01-03,7]', 'node01'), ('gpu-a[001-002],cpu7', 'gpu-a001'),
                                              ('rack[1-2]-n[01-02]', 'rack1-n01'), ('gpu-a7,cpu1', 'gpu-a7'),
                                              ('n[1-2]-ib', 'n1-ib'), ('h7.example.org', 'h7.example.org')])
def test_without_scontrol_the_master_is_the_node_lists_first_host(monkeypatch, node_list, first):
    """Containers (Apptainer, Pyxis) often lack scontrol: the first host is read from the list as scontrol reads it
    (this once refused the run: 'No such file or directory: scontrol')."""
    monkeypatch.setenv('PATH', '/nonexistent')
    assert slurm.master_addr(node_list) == first
    with pytest.raises(ValueError, match=r"no scontrol here \(a container\?\) and the node list 'a\[1-2' is not one"):
        slurm.master_addr('a[1-2')


def test_a_loopback_master_addr_on_a_step_of_several_nodes_is_refused(monkeypatch, capsys):
    """MASTER_ADDR=localhost from a shell profile: the other node's ranks would wait for a master on their own host."""
    for key in [k for k in os.environ if k.startswith('SLURM_')] + ['MASTER_PORT', 'MASTER_ADDR']:
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(SLURM_JOB_ID='77', SLURM_PROCID='9', SLURM_NTASKS='16', SLURM_STEP_ID='0',
                           SLURM_NODELIST='node[01-02]', SLURM_STEP_NUM_NODES='2', MASTER_ADDR='localhost').items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        slurm.prepare_slurm_env()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1, err
    assert err.startswith('train: refused: MASTER_ADDR=localhost is in the environment (from the shell or the batch '
                          'script?) but this step runs on 2 nodes (node[01-02]): the ranks of the other nodes would '
                          'wait for a master on their own host'), err
    monkeypatch.setenv('SLURM_STEP_NUM_NODES', '1')  # one node: localhost is its own
    slurm.prepare_slurm_env()
    assert os.environ['MASTER_ADDR'] == 'localhost' and os.environ['MASTER_PORT'] == str(slurm.job_port(os.environ))


def test_a_port_in_use_on_rank_0s_node_is_refused_in_one_line(monkeypatch, capsys):
    """Jobs 30042 and 40042 on one node both take port 20042: the second's rank 0 says so (torch failed there with a
    traceback, and its other ranks could reach the first job's rendezvous)."""
    import socket
    for key in [k for k in os.environ if k.startswith('SLURM_')] + ['MASTER_PORT', 'MASTER_ADDR']:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        for key, value in dict(SLURM_PROCID='0', SLURM_NTASKS='2', SLURM_STEP_ID='0', SLURM_NODELIST='node1',
                               SLURMD_NODENAME='node1', MASTER_ADDR='node1', MASTER_PORT=str(port)).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as stop:
            slurm.prepare_slurm_env()
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count('\n') == 1, err
        assert err.startswith(f'train: refused: port {port} is in use on node1, where rank 0 hosts the rendezvous'), err
        assert 'export MASTER_PORT to a free port' in err
        monkeypatch.setenv('SLURM_PROCID', '1')  # another rank does not bind it: not checked there
        slurm.prepare_slurm_env()
        assert slurm.master_port_problem(dict(SLURM_PROCID='0', SLURM_JOB_ID='30042'), port, derived=True) \
            .startswith(f'port {port} (from job id 30042: 20000 + id % 10000; jobs whose ids differ by a multiple')
    monkeypatch.setenv('SLURM_PROCID', '0')
    slurm.prepare_slurm_env()  # free again
    monkeypatch.setenv('MASTER_PORT', '29500x')  # a typo: one line on every rank, not int()'s traceback
    for rank in ('0', '1'):
        monkeypatch.setenv('SLURM_PROCID', rank)
        with pytest.raises(SystemExit):
            slurm.prepare_slurm_env()
        assert capsys.readouterr().err == ('train: refused: MASTER_PORT=29500x is not a port (a whole number from 1 '
                                           'to 65535)\n')


def test_the_resume_command_of_an_interrupted_task_is_srun(monkeypatch):
    from xtuner_plugins.cli.train_args import resume_command
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('WORLD_SIZE', '16')  # set by MMEngine's slurm launcher; LOCAL_WORLD_SIZE is not
    argv = ['tools/train.py', 'c.py', '--launcher', 'slurm', '--work-dir', 'w']
    assert resume_command(argv, 'w/iter_4.pth') == \
        'srun <your srun options> python tools/train.py c.py --launcher slurm --work-dir w --resume w/iter_4.pth'


def test_save_on_signal_is_wanted_under_slurm_or_when_asked():
    assert preempt.wanted({'SLURM_JOB_ID': '3'}) and not preempt.wanted({})
    assert preempt.wanted({preempt.SAVE_ON_SIGNAL_ENV: '1'})
    assert not preempt.wanted({'SLURM_JOB_ID': '3', preempt.SAVE_ON_SIGNAL_ENV: '0'})
    assert preempt.requeued({'SLURM_RESTART_COUNT': '2'}) == 2 and preempt.requeued({}) == 0


@pytest.mark.parametrize('script', EXAMPLES, ids=os.path.basename)
def test_example_scripts_say_how_to_run_them_and_parse(script):
    with open(script, encoding='utf-8') as f:
        lines = f.read().splitlines()
    name = os.path.relpath(script, ROOT)
    assert lines[0] == '#!/bin/bash' and f'#   sbatch {name} CONFIG [tools/train.py options]' in lines[:8]
    options = [line for line in lines if line.startswith('#SBATCH ')]
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith('#'))
    assert all(lines.index(line) < first_command for line in options)  # sbatch reads them up to the first command
    nodes = 2 if '2nodes' in name else 1
    for option in (f'--nodes={nodes}', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=gpu', '--requeue',
                   '--signal=B:USR1@180'):
        assert f'#SBATCH {option}' in options, option
    assert any(line.startswith('#SBATCH --cpus-per-task=') for line in options)
    assert subprocess.run(['bash', '-n', script]).returncode == 0


# ----------------------------------------------------------------------------------------------------------
# A real Slurm
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    try:
        started = start_cluster(str(tmp_path_factory.mktemp('slurm')))
    except Unavailable as exc:
        pytest.skip(f'no Slurm cluster: {exc}')
    yield started
    started.stop()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp('tiny'))


def options(tiny, repeat, interval):
    # 2 processes x 1 sample per iteration: `repeat` x 2 samples give `repeat` iterations
    opts = tiny_options(tiny, tiny['mixed'], repeat=repeat, batch_size=1)
    opts.update({'default_hooks.checkpoint.interval': interval, 'default_hooks.checkpoint.max_keep_ckpts': -1,
                 'default_hooks.logger.interval': 1})
    return [f'{k}={v}' for k, v in opts.items()]


def srun(cluster, log, *command):
    """``srun -n2 --kill-on-bad-exit=1 COMMAND`` in its own session (a training subprocess's environment), its
    output in ``log``."""
    return TrainJob(['srun', '-n2', '--kill-on-bad-exit=1', *command], train_env(2, extra_env=cluster.env), log)


@pytest.mark.slow
def test_srun_trains_on_both_ranks_with_the_jobs_port(cluster, tiny, tmp_path):
    """``xtuner train CFG --launcher slurm`` under ``srun -n2``: MMEngine's slurm launcher, gloo, DDP."""
    work = str(tmp_path / 'work')
    os.makedirs(work)
    job = srun(cluster, os.path.join(work, 'train_output.log'), os.path.join(os.path.dirname(sys.executable), 'xtuner'),
               'train', CONFIG, '--launcher', 'slurm', '--work-dir', work, '--cfg-options', *options(tiny, 4, 4))
    wait_jobs([job], timeout=240)
    out = job_outcome(job, work, expect_iters=4)
    assert out.ok, out.summary()
    ranks = re.findall(r'slurm: rank (\d) of 2 \(task \d on localhost\), master localhost:(\d+), job (\d+)', out.log)
    assert sorted(r for r, _, _ in ranks) == ['0', '1'], out.log[-3000:]
    port, job_id = ranks[0][1], ranks[0][2]
    assert int(port) == slurm.job_port({'SLURM_JOB_ID': job_id})
    assert os.path.basename(out.checkpoints[-1]) == 'iter_4.pth'


def _rank_pid(work: str, rank: int):
    """The pid of ``rank`` from its heartbeat (engine/watchdog.py), once it is there."""
    try:
        with open(os.path.join(work, 'heartbeats', f'rank_{rank}.json'), encoding='utf-8') as f:
            return int(json.load(f)['pid'])
    except (OSError, ValueError, KeyError):
        return None


def _pointer(work: str) -> str:
    try:
        with open(os.path.join(work, 'last_checkpoint'), encoding='utf-8') as f:
            return os.path.basename(f.read().strip())
    except OSError:
        return ''


def _iteration(name: str) -> int:
    m = re.fullmatch(r'iter_(\d+)\.pth', name)
    return int(m.group(1)) if m else 0


@pytest.mark.slow
def test_killed_task_then_requeued_job_resume_and_finish(cluster, tiny, tmp_path):
    work = str(tmp_path / 'work')
    os.makedirs(work)
    opts = options(tiny, 24, 4)

    # 1. rank 1 SIGKILLed once iter_4 is saved: srun fails, iter_4 stays whole
    job = srun(cluster, os.path.join(work, 'killed.log'), sys.executable, os.path.join(ROOT, 'tools', 'train.py'),
               SLOW_CONFIG, '--launcher', 'slurm', '--work-dir', work, '--deepspeed', DS_CPU_CONFIGS['zero2'],
               '--cfg-options', *opts)
    try:
        assert wait_for(lambda: job.poll() is not None or _iteration(_pointer(work)) >= 4, 200), job.read_log()[-3000:]
        pid = _rank_pid(work, 1)
        assert pid, job.read_log()[-3000:]
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: job.poll() is not None, 60)
    finally:
        wait_jobs([job], timeout=5)
    assert job.proc.returncode != 0, job.read_log()[-3000:]
    kept = _pointer(work)
    assert _iteration(kept) >= 4 and load_checkpoint_state(os.path.join(work, kept)), kept

    # 2. tools/slurm/train_1node_8gpus.sbatch, made to fit this node by sbatch's options, resumes from it (--resume
    # PATH); USR1 to the batch script (as --signal=B:USR1@180 near the time limit) requeues the job: SIGTERM to
    # every task, the ranks save the iteration under way and stop; the job's next run resumes from that newer
    # checkpoint by itself (not from the --resume PATH of its command) and finishes
    output = str(tmp_path / 'job.out')
    env = train_env(2, extra_env={'WORK_DIR': work, 'PYTHON': sys.executable})  # sbatch passes it on to the tasks
    submitted = cluster.run('sbatch', '--parsable', '-o', output, '--chdir', ROOT, '-p', 'debug', '--ntasks-per-node=2',
                            '--gpus-per-node=0', '--cpus-per-task=1', EXAMPLE, SLOW_CONFIG,
                            '--deepspeed', DS_CPU_CONFIGS['zero2'], '--resume', os.path.join(work, kept),
                            '--cfg-options', *opts, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        resumed_at = _iteration(kept)
        assert wait_for(lambda: _iteration(_pointer(work)) > resumed_at, 200), _read(output)[-3000:]
        signalled = cluster.run('scancel', '--signal=USR1', '--batch', job_id)
        assert signalled.returncode == 0, signalled.stderr
        assert wait_for(lambda: cluster.job(job_id).get('JobState') in ('COMPLETED', 'FAILED', 'CANCELLED'), 240,
                        interval=1), _read(output)[-3000:]
    finally:
        cluster.run('scancel', job_id)
    log, state = _read(output), cluster.job(job_id)
    assert state.get('JobState') == 'COMPLETED' and state.get('Restarts') == '1', (state, log[-3000:])
    first, _, second = log.partition(f'job {job_id}, run 1,')
    assert f'job {job_id}: time limit near, requeued' in first, first[-3000:]
    assert f'resumed epoch: 0, iter: {resumed_at}' in first and 'Auto resumed' not in first, first[-3000:]
    stopped = re.search(r'train: stopped by SIGTERM at iteration (\d+): saved (\S+); resume=True', first)
    assert stopped, first[-4000:]
    at, saved = int(stopped.group(1)), stopped.group(2)
    assert at > resumed_at and os.path.basename(saved) == f'iter_{at}.pth' and os.path.isdir(saved)
    assert f'requeued (1x): resuming from the last checkpoint of {work}' in second, second[-3000:]
    assert f'Auto resumed from the latest checkpoint {saved}' in second and f'resumed epoch: 0, iter: {at}' in second
    assert os.path.isdir(os.path.join(work, 'iter_24.pth')) and _pointer(work) == 'iter_24.pth'


def _read(path: str) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError:
        return ''
