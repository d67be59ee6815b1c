"""A signal saves a checkpoint and stops the run (``xtuner_plugins/engine/preempt.py``), here without Slurm
(``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1``) in one process of the toy config: SIGTERM in the middle of iteration 3, with
two iterations per optimizer step, saves ``iter_4.pth`` (the next optimizer step) and ends with exit code 143 and
one line; tests/test_slurm.py stops two ranks under a real Slurm."""

import os
import signal
import time

from tests.train_utils import REPO_ROOT, train_env
from xtuner_plugins.engine.preempt import PREEMPTED_EXIT_CODE, SAVE_ON_SIGNAL_ENV
from xtuner_plugins.launch import TrainJob, train_command, wait_jobs
from xtuner_plugins.outcome import parse_log

GUARDED = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_guarded.py')


def test_sigterm_saves_at_the_next_optimizer_step_and_stops(tmp_path):
    work = str(tmp_path / 'work')
    os.makedirs(work)
    # rank 0 sleeps 5 s in its third forward: the signal comes then; 1000 iterations: it would not end by itself
    options = {'model.pause_at_iter': 3, 'model.pause_how': 'sleep', 'model.pause_s': 5,
               'train_cfg.max_iters': 1000, 'optim_wrapper.accumulative_counts': 2}
    cmd, env = train_command(GUARDED, work, cfg_options=options,
                             script=os.path.join(REPO_ROOT, 'tools', 'train.py'))
    job = TrainJob(cmd, train_env(extra_env=dict(env, **{SAVE_ON_SIGNAL_ENV: '1'})), str(tmp_path / 'out.log'))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and job.poll() is None and (parse_log(job.read_log())[2] or 0) < 2:
            time.sleep(0.1)
        time.sleep(0.5)  # inside the third forward's sleep
        os.kill(job.proc.pid, signal.SIGTERM)
    finally:
        wait_jobs([job], timeout=120)
    log = job.read_log()
    assert job.proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    saved = os.path.join(work, 'iter_4.pth')
    assert f'train: stopped by SIGTERM at iteration 4: saved {saved}; resume=True in {work} continues from it' in log
    assert os.path.isfile(saved) and open(os.path.join(work, 'last_checkpoint')).read().strip() == saved
    assert parse_log(log)[2] == 4 and 'Traceback' not in log
