"""The launcher (``xtuner_plugins/launch.py``): commands, killing, port retries, and two nodes on this machine
over loopback (``slow``: each run trains the toy config in fresh subprocesses); tests/test_outcome.py judges logs."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_utils import REPO_ROOT, load_checkpoint_state, run_local_nodes, run_train, train_env
from xtuner_plugins import launch
from xtuner_plugins.launch import job_outcome

TOY_CONFIG = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py')
def test_train_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('MASTER_PORT', '1')
    cmd, env = launch.train_command(TOY_CONFIG, str(tmp_path), cfg_options={'a.b': [1, 2], 'c': None})
    assert cmd == [sys.executable, launch.xtuner_train_script(), TOY_CONFIG, '--work-dir', str(tmp_path),
                   '--cfg-options', 'a.b=[1,2]', 'c=None'] and env == {}
    cmd, env = launch.train_command('tests/engine/toy_configs/toy_regression.py', str(tmp_path), nproc=2,
                                    deepspeed='zero3', nnodes=2, node_rank=1, addr='10.0.0.1', port=29999)
    assert cmd[1:10] == ['-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1', '--nproc_per_node=2',
                         '--master_addr=10.0.0.1', '--master_port=29999', launch.xtuner_train_script(), TOY_CONFIG]
    assert cmd[-4:] == ['--deepspeed', launch.DS_CPU_CONFIGS['zero3'], '--launcher', 'pytorch']
    cmd, env = launch.train_command(TOY_CONFIG, str(tmp_path), nproc=8, nnodes=2, node_rank=1, addr='10.0.0.1',
                                    port=29500, use_cli=True, deepspeed='deepspeed_zero3')
    assert cmd[1:] == ['train', TOY_CONFIG, '--work-dir', str(tmp_path), '--deepspeed', 'deepspeed_zero3']
    assert env == dict(NPROC_PER_NODE=8, NNODES=2, NODE_RANK=1, ADDR='10.0.0.1', PORT=29500)
    full = launch.train_env(2, str(tmp_path), {k: str(v) for k, v in env.items()})
    assert 'RANK' not in full and 'MASTER_PORT' not in full and full['NODE_RANK'] == '1'
    assert full['HF_HOME'] == str(tmp_path / 'huggingface') and full['OMP_NUM_THREADS'] == '1'
    assert full['PYTHONPATH'].split(os.pathsep)[0] == REPO_ROOT


def test_one_node_without_deepspeed_starts_tools_train_without_torchrun(tmp_path):
    cmd, env = launch.train_command(TOY_CONFIG, str(tmp_path), nproc=2, port=29999)
    assert cmd == [sys.executable, launch.TRAIN_TOOL, TOY_CONFIG, '--work-dir', str(tmp_path),
                   '--nproc-per-node=2'] and env == {'MASTER_PORT': '29999'}
    other = os.path.join(REPO_ROOT, 'tools', 'other.py')   # another script: the generic launcher
    cmd, env = launch.train_command(TOY_CONFIG, str(tmp_path), nproc=2, port=29999, script=other)
    assert cmd == [sys.executable, '-m', 'xtuner_plugins.cli.local_launch', '--nproc-per-node=2',
                   '--master-addr=127.0.0.1', '--master-port=29999', other, TOY_CONFIG, '--work-dir',
                   str(tmp_path), '--launcher', 'pytorch'] and env == {}
    assert launch.train_command(TOY_CONFIG, str(tmp_path), nproc=2, launcher='torchrun')[0][1:3] == \
        ['-m', 'torch.distributed.run']
    assert launch.train_command(TOY_CONFIG, str(tmp_path), nproc=2, deepspeed='zero2')[0][1:3] == \
        ['-m', 'torch.distributed.run']


def _gone(pgid, wait=10):
    """No process is left in the group (killed ones may stay zombies until init reaps them)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _job(tmp_path, name, code):
    return launch.TrainJob([sys.executable, '-c', code], train_env(), str(tmp_path / f'{name}.log'))


def test_a_job_runs_in_the_repository_root_unless_told(tmp_path):
    """The web demo's test server and the README's commands run where they are told (relative paths)."""
    cmd = [sys.executable, '-c', 'import os; print(os.getcwd())']
    jobs = [launch.TrainJob(cmd, train_env(), str(tmp_path / 'root.log')),
            launch.TrainJob(cmd, train_env(), str(tmp_path / 'here.log'), cwd=str(tmp_path))]
    launch.wait_jobs(jobs, timeout=60)
    assert [job.read_log().splitlines()[1] for job in jobs] == [REPO_ROOT, str(tmp_path)]


def test_timeout_kills_the_launcher_and_everything_under_it(tmp_path):
    """A launcher whose children hang, one in its own session (as torchrun starts its ranks): all are killed
    at the timeout, none is left running, and the log shows where each one was (a hang's only witness)."""
    sleeper = '[sys.executable, "-c", "import time; time.sleep(600)"]'
    # (b takes no SIGABRT: its stacks are not printed, and it must be killed all the same)
    deaf = ('[sys.executable, "-c", "import signal, time; signal.signal(signal.SIGABRT, signal.SIG_IGN); '
            'time.sleep(600)"]')
    job = _job(tmp_path, 'hang', f'import subprocess, sys, time; a = subprocess.Popen({sleeper}); '
                                 f'b = subprocess.Popen({deaf}, start_new_session=True); '
                                 'print(a.pid, b.pid, flush=True); time.sleep(600)')
    while len(job.read_log().splitlines()) < 2:
        time.sleep(0.1)
    children = [int(p) for p in job.read_log().splitlines()[1].split()]
    launch.wait_jobs([job], timeout=5)
    assert job.timed_out and job.wall_s < 60
    assert _gone(job.proc.pid) and _gone(children[1])  # its process group, and the child in its own session
    log = job.read_log()
    assert job.proc.returncode == -signal.SIGABRT and log.count('File "<string>", line 1 in <module>') == 2, log


def test_a_job_ends_when_what_started_it_is_killed_outright(tmp_path):
    """The demo SIGKILLed (or killed by the OOM killer) left its training running, orphaned; the job now gets
    SIGTERM when its starter dies."""
    log = tmp_path / 'child.log'
    starter = subprocess.Popen([sys.executable, '-c', (
        'import sys, time\n'
        'from xtuner_plugins import launch\n'
        f'job = launch.TrainJob([sys.executable, "-c", "import time; time.sleep(600)"], {{}}, {str(log)!r})\n'
        'print(job.proc.pid, flush=True)\n'
        'time.sleep(600)\n')], stdout=subprocess.PIPE, text=True, env=train_env(), cwd=REPO_ROOT)
    child = int(starter.stdout.readline())
    starter.kill()
    starter.wait()
    assert _gone(child), f'the job {child} still runs after its starter was killed'


def test_a_failed_job_stops_the_others(tmp_path):
    lines = []
    hang = _job(tmp_path, 'hang', 'import time; time.sleep(600)')
    # exits 0 after a traceback, like `xtuner train` after a crash
    crash = launch.TrainJob([sys.executable, '-c', 'import traceback\ntry:\n  1/0\nexcept Exception:\n'
                             '  traceback.print_exc()'], train_env(), str(tmp_path / 'crash.log'), lines.append)
    launch.wait_jobs([hang, crash], timeout=300)
    assert crash.proc.returncode == 0 and hang.proc.returncode == -signal.SIGKILL and hang.wall_s < 60
    assert hang.stopped_because == 'stopped: launcher 1 of 2 failed' and not hang.timed_out
    assert lines[0].startswith('$ ') and 'ZeroDivisionError: division by zero' in lines
    outcome = job_outcome(hang, str(tmp_path), lead=False)
    assert outcome.failed and outcome.failure_reasons[-1] == 'stopped: launcher 1 of 2 failed'


@pytest.mark.slow
def test_port_in_use_is_retried_with_another(tmp_path, monkeypatch):
    import socket
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    busy = taken.getsockname()[1]
    ports = [busy, launch.free_port()]
    monkeypatch.setattr(launch, 'free_port', lambda host='127.0.0.1': ports.pop(0))
    script = tmp_path / 'rank.py'
    # one write(2) per rank: the ranks share the log, and PYTHONUNBUFFERED print() writes word by word
    script.write_text('import os\n'
                      'os.write(1, f"rank {os.environ[\'RANK\']} of {os.environ[\'WORLD_SIZE\']}\\n".encode())\n')
    with taken:
        out = run_train(TOY_CONFIG, str(tmp_path / 'work'), nproc=2, script=str(script), require_checkpoint=False,
                        expect_iters=1, port_retries=1, timeout=200)
    assert not ports, 'the second port was not taken'
    assert f'--master_port={busy}' not in out.command and 'address already in use' not in out.log.lower()
    assert 'rank 0 of 2' in out.log and 'rank 1 of 2' in out.log and out.returncode == 0, out.summary()


# ----------------------------------------------------------------------------------------------------------
# Two nodes x one process on this machine (loopback, gloo), as `NNODES=2 NODE_RANK=r ADDR PORT xtuner train`
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def one_node(tmp_path_factory):
    """The same job on one node: two processes, ZeRO-3."""
    return run_train(TOY_CONFIG, str(tmp_path_factory.mktemp('one_node')), nproc=2, deepspeed='zero3')


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, one_node):
    assert one_node.ok, one_node.summary()
    shared = str(tmp_path / 'shared')  # one work folder on storage both nodes see (here: the same disk)
    node0, node1 = run_local_nodes(TOY_CONFIG, [shared, shared], nproc=1, deepspeed='zero3', use_cli=True,
                                   timeout=400)
    assert node0.ok, node0.summary()
    assert node1.ok, node1.summary()
    assert os.path.basename(node1.command[0]) == 'xtuner' and node0.log_path != node1.log_path
    assert 'GPU number: 2' in node0.full_log()  # one world of two ranks (MMEngine's log file)
    assert set(node0.losses) == set(range(1, 7)), node0.losses
    assert node0.losses == pytest.approx(one_node.losses, rel=1e-6, abs=0)
    # one checkpoint folder with both ranks' parts (rank 0 renamed it once every rank had written)
    assert [os.path.basename(p) for p in node0.checkpoints] == ['iter_6.pth']
    assert not [n for n in os.listdir(shared) if n.endswith('.incomplete')]
    state, expected = load_checkpoint_state(node0.final_checkpoint), load_checkpoint_state(one_node.final_checkpoint)
    assert state.keys() == expected.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_crashed_node_fails_the_run_without_hanging(tmp_path):
    """Node 1 crashes at its second iteration (`xtuner train` exits 0): node 0 is stopped, not left waiting."""
    shared = str(tmp_path / 'shared')
    node0, node1 = run_local_nodes(TOY_CONFIG, [shared, shared], nproc=1, deepspeed='zero3', use_cli=True,
                                   timeout=400, per_node=[{}, {'cfg_options': {'model.crash_at_iter': 2}}])
    assert node1.failed and 'deliberate crash at iteration 2' in node1.log, node1.summary()
    assert node0.failed and not node0.timed_out, node0.summary()
    assert node0.final_checkpoint is None
    assert _gone(node0.pid) and _gone(node1.pid)
