"""A task of a Slurm step of several that would train a run of its own (``xtuner_plugins/slurm_step.py``), and
``--launcher pytorch`` without torchrun's variables (``engine/slurm.py``): one line and exit code 2, not N runs
into one work folder, nor a ``KeyError: 'RANK'`` traceback.

Measured under a real ``srun -n2`` (slurm-wlm 22.05): ``tools/train.py CONFIG`` without ``--launcher slurm`` trained
the run twice, both tasks writing ``iter_4.pth``, ``iter_8.pth`` and ``last_checkpoint`` of one work folder, exit
code 0; with ``--nproc-per-node 2`` (or ``--deepspeed``, one rank of our launcher) each task started ranks of its own;
with ``--launcher pytorch`` each task ended in MMEngine's ``KeyError: 'RANK'`` traceback. Here the step's variables
are set by hand (what srun gives each task), no cluster needed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.configs.conftest import ROOT
from xtuner_plugins.slurm_step import step_problem, step_tasks

CONFIG = os.path.join(ROOT, 'configs', 'pretrain_mlp.py')
TRAIN = os.path.join(ROOT, 'tools', 'train.py')
# what srun gives task 1 of a step of 2 on one node (SLURM_LOCALID 0 says the line: one a node)
STEP = dict(SLURM_JOB_ID='5801', SLURM_STEP_ID='0', SLURM_PROCID='1', SLURM_LOCALID='0', SLURM_NTASKS='2',
            SLURM_STEP_NUM_TASKS='2', SLURM_NODELIST='localhost', SLURM_STEP_NODELIST='localhost')
NO_TORCHRUN = ('--launcher pytorch needs the variables torchrun gives its ranks (RANK, WORLD_SIZE, MASTER_ADDR, '
               'MASTER_PORT not set)')   # (LOCAL_RANK: XTuner's own argument parser sets it)
TORCHRUN = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_') and k not in TORCHRUN}
    return dict(env, PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', **extra)


def test_which_tasks_would_train_alone():
    assert step_tasks(STEP) == 2 and step_tasks({}) == 0
    batch = {k: v for k, v in STEP.items() if k != 'SLURM_STEP_ID'}   # the batch script: tools/train.py -n N is its own
    assert step_tasks(batch) == 0 and step_problem(batch, 'none') is None
    assert step_problem(dict(STEP, SLURM_STEP_NUM_TASKS='1', SLURM_NTASKS='1'), 'none') is None   # srun -n1
    # a shell of srun --ntasks-per-node=8 --pty bash: one command typed, its own launcher's ranks
    assert step_problem(dict(STEP, SLURM_PTY_PORT='40123'), 'pytorch', local=True) is None
    assert step_problem(STEP, 'slurm') is None and step_problem(STEP, 'pytorch') is None   # torchrun on each node
    said = step_problem(STEP, 'none')
    assert said.startswith('task 1 of the 2 tasks srun started (job 5801, step 0) has no --launcher slurm, so each '
                           'task would train alone: 2 runs into one work folder; give --launcher slurm'), said
    assert 'starts ranks of its own (--nproc-per-node' in step_problem(STEP, 'pytorch', local=True)


def test_our_launcher_in_a_task_of_several_starts_no_rank(tmp_path):
    rank = tmp_path / 'rank.py'
    rank.write_text(f'open({str(tmp_path / "started")!r}, "w").close()\n')
    launch = [sys.executable, '-m', 'xtuner_plugins.cli.local_launch', '--nproc-per-node', '2', str(rank)]
    done = subprocess.run(launch, env=_env(**STEP), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not (tmp_path / 'started').exists(), done.stderr
    assert done.stderr.startswith('local_launch: refused: task 1 of the 2 tasks srun started (job 5801, step 0) '
                                  'starts ranks of its own') and done.stderr.count('\n') == 1, done.stderr
    done = subprocess.run(launch, env=_env(**dict(STEP, SLURM_LOCALID='1')), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == ''   # the node's other tasks: the same exit, no second line


@pytest.mark.slow
@pytest.mark.parametrize('launcher, env, says', [
    ([], STEP, 'task 1 of the 2 tasks srun started (job 5801, step 0) has no --launcher slurm'),
    (['--launcher', 'pytorch'], STEP, f'{NO_TORCHRUN}: under srun, give --launcher slurm'),
    (['--launcher', 'pytorch'], {}, f'{NO_TORCHRUN}: start it with torchrun'),
], ids=['srun-no-launcher', 'srun-launcher-pytorch', 'launcher-pytorch-alone'])
def test_the_train_tool_refuses_in_one_line(tmp_path, launcher, env, says):
    work = tmp_path / 'work'
    done = subprocess.run([sys.executable, TRAIN, CONFIG, '--work-dir', str(work), *launcher], env=_env(**env),
                          capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    lines = [line for line in done.stderr.splitlines() if line.startswith('train: ')]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'train: refused: {says}'), \
        done.stderr[-3000:]
    assert 'Traceback' not in done.stderr and not any(p.name.startswith('iter_') for p in work.glob('*'))


def test_a_start_up_refusal_under_srun_is_said_by_task_0_alone(monkeypatch, capsys):
    """Before the rendezvous of --launcher slurm there is no RANK: every task printed runstart's refusal (measured:
    `srun -n2 ... --launcher slurm` into a folder of another run's checkpoints printed its line twice, once a task;
    16 nodes of 8 print it 128 times)."""
    from xtuner_plugins.engine.runstart import refuse
    from xtuner_plugins.slurm_step import launch_rank
    assert launch_rank({}) == 0 and launch_rank({'SLURM_PROCID': '3'}) == 3
    assert launch_rank({'RANK': '5', 'SLURM_PROCID': '0'}) == 5   # torchrun's ranks under one srun task
    for key in [k for k in os.environ if k.startswith('SLURM_')] + list(TORCHRUN):
        monkeypatch.delenv(key, raising=False)
    for task, said in (('1', ''), ('0', 'train: refused: a reason\n')):
        monkeypatch.setenv('SLURM_PROCID', task)
        with pytest.raises(SystemExit) as stop:
            refuse('a reason')
        assert stop.value.code == 2 and capsys.readouterr().err == said
