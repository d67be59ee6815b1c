"""A rank waiting at the rendezvous of ``--launcher slurm`` for one that never comes stops with one line
(``xtuner_plugins/engine/rendezvous.py``): measured on a real ``srun -n2`` whose task 1 ended at start-up, task 0 waited
in ``init_process_group`` with no word until srun was killed 5 minutes later (torch's gloo timeout: 30 minutes).
Here one task of a step of two is started alone, with what srun gives it: its peer never comes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.configs.conftest import ROOT
from xtuner_plugins.engine.rendezvous import RENDEZVOUS_ENV, RENDEZVOUS_TIMEOUT_S, rendezvous_timeout
from xtuner_plugins.engine.watchdog import STALL_EXIT_CODE

RANK_0_OF_2 = ("import xtuner_plugins.engine\nfrom mmengine.dist import init_dist\ninit_dist('slurm', backend='gloo')\n"
               "print('rendezvous ended')\n")


def _task_env(port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_') and
           k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    return dict(env, PYTHONPATH=ROOT, SLURM_JOB_ID='77', SLURM_STEP_ID='0', SLURM_PROCID='0', SLURM_LOCALID='0',
                SLURM_NTASKS='2', SLURM_NODELIST='localhost', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), **extra)


def _port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_wait_and_its_bad_values():
    assert rendezvous_timeout({}) == RENDEZVOUS_TIMEOUT_S and rendezvous_timeout({RENDEZVOUS_ENV: '0'}) == 0
    assert rendezvous_timeout({RENDEZVOUS_ENV: ' 90 '}) == 90
    for bad in ('ten', '-1', 'inf', 'nan'):
        with pytest.raises(ValueError, match=f"{RENDEZVOUS_ENV}='{bad}' is no number of seconds"):
            rendezvous_timeout({RENDEZVOUS_ENV: bad})


def test_a_rank_whose_peer_never_comes_stops_in_one_line():
    started = time.monotonic()
    done = subprocess.run([sys.executable, '-c', RANK_0_OF_2], env=_task_env(_port(), **{RENDEZVOUS_ENV: '3'}),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith('train: ')]
    assert done.returncode == STALL_EXIT_CODE and 'rendezvous ended' not in done.stdout, done.stderr[-3000:]
    assert lines == [lines[0]] and lines[0].startswith(
        'train: STALLED at start-up: rank 0 of 2 (task 0 on ') and 'job 77: waited 3 s at the rendezvous' in lines[0]
    assert 'Traceback' not in done.stderr and time.monotonic() - started < 90
    done = subprocess.run([sys.executable, '-c', RANK_0_OF_2], env=_task_env(_port(), **{RENDEZVOUS_ENV: 'x'}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"train: refused: {RENDEZVOUS_ENV}='x' is no number of seconds" in done.stderr


def test_a_rendezvous_that_ends_leaves_the_rank_running(tmp_path):
    """One task alone (srun -n1): the rendezvous ends, the watch with it; the rank goes on past the wait."""
    script = RANK_0_OF_2 + 'import time\ntime.sleep(3)\nprint("still running")\n'
    env = dict(_task_env(_port(), **{RENDEZVOUS_ENV: '1'}), SLURM_NTASKS='1')
    done = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and 'still running' in done.stdout, done.stderr[-3000:]
