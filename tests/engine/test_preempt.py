"""A signal saves a checkpoint and stops the run (``xtuner_plugins/engine/preempt.py``), here without Slurm
(``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1``) in one process of the toy config: SIGTERM in the middle of iteration 3, with
two iterations per optimizer step, saves ``iter_4.pth`` (the next optimizer step) and ends with exit code 143 and
one line; tests/test_slurm.py stops two ranks under a real Slurm. A requeued job resumes only a checkpoint it saved
(``resume_requeued``)."""

import json
import os
import signal
import time

import pytest

from tests.train_utils import REPO_ROOT, train_env
from xtuner_plugins.engine.preempt import PREEMPTED_EXIT_CODE, SAVE_ON_SIGNAL_ENV
from xtuner_plugins.launch import TrainJob, train_command, wait_jobs
from xtuner_plugins.outcome import parse_log

GUARDED = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_guarded.py')


@pytest.mark.parametrize('to', ['the rank', 'every process, DataLoader workers too'])
def test_sigterm_saves_at_the_next_optimizer_step_and_stops(tmp_path, to):
    """Slurm signals every process of the job: torch's worker loop ended a DataLoader worker at once, and its rank's
    SIGCHLD handler raised "DataLoader worker ... is killed by signal: Terminated" mid-iteration (nothing saved)."""
    work = str(tmp_path / 'work')
    os.makedirs(work)
    # rank 0 sleeps 5 s in its third forward: the signal comes then; 1000 iterations: it would not end by itself
    options = {'model.pause_at_iter': 3, 'model.pause_how': 'sleep', 'model.pause_s': 5,
               'train_cfg.max_iters': 1000, 'optim_wrapper.accumulative_counts': 2}
    if to != 'the rank':
        options.update({'train_dataloader.num_workers': 2, 'train_dataloader.persistent_workers': True})
    cmd, env = train_command(GUARDED, work, cfg_options=options,
                             script=os.path.join(REPO_ROOT, 'tools', 'train.py'))
    job = TrainJob(cmd, train_env(extra_env=dict(env, **{SAVE_ON_SIGNAL_ENV: '1'})), str(tmp_path / 'out.log'))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and job.poll() is None and (parse_log(job.read_log())[2] or 0) < 2:
            time.sleep(0.1)
        time.sleep(0.5)  # inside the third forward's sleep
        if to == 'the rank':
            os.kill(job.proc.pid, signal.SIGTERM)
        else:   # the job's session: the rank and its workers
            os.killpg(job.proc.pid, signal.SIGTERM)
    finally:
        wait_jobs([job], timeout=120)
    log = job.read_log()
    assert job.proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    saved = os.path.join(work, 'iter_4.pth')
    assert f'train: stopped by SIGTERM at iteration 4: saved {saved}; resume=True in {work} continues from it' in log
    assert os.path.isfile(saved) and open(os.path.join(work, 'last_checkpoint')).read().strip() == saved
    assert parse_log(log)[2] == 4 and 'Traceback' not in log


def test_a_requeued_job_resumes_only_a_checkpoint_it_saved(tmp_path, monkeypatch):
    """A requeued job whose first run saved nothing does not follow the last_checkpoint an earlier job left in the
    work folder (it resumed another run's weights): it starts as its first run did, with a line saying why; once
    it has saved, its next requeue resumes."""
    from types import SimpleNamespace

    from xtuner_plugins.engine import preempt
    work = str(tmp_path)
    pointer = os.path.join(work, 'last_checkpoint')
    with open(pointer, 'w') as f:
        f.write(os.path.join(work, 'iter_50.pth'))  # job 100's
    earlier = time.time() - 3600
    os.utime(pointer, (earlier, earlier))
    logged = []
    monkeypatch.setattr(preempt, 'print_log', lambda line, logger=None: logged.append(line))

    def run(job, count):
        monkeypatch.setenv('SLURM_JOB_ID', job)
        monkeypatch.setenv('SLURM_RESTART_COUNT', str(count))
        runner = SimpleNamespace(work_dir=work, hooks=[], _resume=False, _load_from='start.pth')
        return preempt.resume_requeued(runner), (runner._resume, runner._load_from)

    assert run('200', 0) == (False, (False, 'start.pth')) and logged == []  # job 200's first run: recorded
    assert run('200', 1) == (False, (False, 'start.pth'))  # it saved nothing: job 100's checkpoint stays unused
    assert logged == [f'slurm: job 200 requeued (1x): not resuming from {pointer}: {pointer} is older than this '
                      f'job\'s first run in it ({work}/slurm_job.json), so it was left by an earlier job, not saved '
                      f'by this one; this run starts as the job\'s first run did']
    with open(pointer, 'w') as f:  # job 200 saves
        f.write(os.path.join(work, 'iter_10.pth'))
    assert run('200', 2) == (True, (True, None))
    assert logged[-1] == f'slurm: job 200 requeued (2x): resuming from the last checkpoint of {work} (resume=True)'
    os.utime(pointer, (earlier, earlier))  # job 300, in the same work folder, dies before it trains: no record
    assert run('300', 1) == (False, (False, 'start.pth'))
    assert logged[-1].endswith(f'{pointer}: {work}/slurm_job.json names job 200, so it was left by an earlier job, '
                               f'not saved by this one; this run starts as the job\'s first run did')
    assert json.load(open(os.path.join(work, 'slurm_job.json')))['job'] == '300'
