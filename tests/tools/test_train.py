"""tools/train.py's closing summary: the reason a run failed, on one line; Ctrl-C: where the run stopped and how
to resume, on one line."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.train_utils import REPO_ROOT, train_env
from xtuner_plugins import launch

from xtuner_plugins.data.index import AnnotationChanged
from xtuner_plugins.errors import Refused

GUARDED = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_guarded.py')
TRAIN_TOOL = os.path.join(REPO_ROOT, 'tools', 'train.py')


@pytest.mark.parametrize('error,rc,first,traceback', [
    (Refused("unknown loss_reduction 'mean'; use one of ('token', 'sample', 'square')"), 2,
     "train: refused: unknown loss_reduction 'mean'; use one of ('token', 'sample', 'square')", False),
    (AnnotationChanged('d.jsonl: changed after its samples were indexed (line 3 is no longer 40 bytes at byte 80)'),
     1, 'train: FAILED: AnnotationChanged: d.jsonl: changed after its samples were indexed', False),
    (ValueError('math domain error'), 1, 'Traceback (most recent call last):', True)])
def test_an_error_that_says_it_whole_is_one_line_without_its_traceback(tmp_path, monkeypatch, capsys, error, rc,
                                                                      first, traceback):
    """A setting or input refused (``errors.Refused``: one line, exit 2) and a failure the message explains whole
    (``errors.Stated``) come without the traceback; any other error keeps it, and the summary points to it."""
    from xtuner.tools import train as xtuner_train

    from xtuner_plugins.cli import train

    def fails():
        raise error
    monkeypatch.setattr(xtuner_train, 'main', fails)
    monkeypatch.setattr(sys, 'argv', ['train.py', GUARDED, '--work-dir', str(tmp_path / 'w')])
    assert train._train() == rc
    err = capsys.readouterr().err.strip()
    assert err.startswith(first) and ('Traceback' in err) == traceback, err
    assert ('the traceback is above' in err) == traceback and (rc == 2) == (len(err.splitlines()) == 1), err


def test_the_resume_command_continues_from_the_checkpoint():
    from xtuner_plugins.cli.train_args import resume_command
    argv = ['tools/train.py', 'configs/x.py', '--work-dir', 'w d', '--cfg-options', 'a=1', 'resume=True',
            '--resume', 'old/iter_2.pth']
    assert resume_command(argv, 'w d/iter_4.pth') == \
        "python tools/train.py configs/x.py --work-dir 'w d' --cfg-options a=1 --resume 'w d/iter_4.pth'"
    assert resume_command(['/venv/bin/xtuner-plugins-train', 'x.py', '--cfg-options', 'resume=True'], None) == \
        'xtuner-plugins-train x.py'


def test_a_resume_stopped_before_its_first_save_is_told_to_resume_again(tmp_path):
    """A resume stopped before it saved anything (its ranks stopped by the launcher when another rank refused the
    checkpoint) was told to run the command without its ``--resume``, which starts over: the progress lost."""
    from xtuner_plugins.cli.train_closing import interrupted_line
    work = str(tmp_path / 'r')
    for given in (['--resume', 'w/iter_6.pth'], ['--resume=w/iter_6.pth']):
        line = interrupted_line(work, ['tools/train.py', 'c.py', '--work-dir', work] + given, 'stopped by SIGTERM')
        assert line.startswith('train: stopped by SIGTERM ') and line.endswith(
            f'; nothing saved in {work}; resume: python tools/train.py c.py --work-dir {work} --resume w/iter_6.pth '
            'continues from the checkpoint it was given'), line
    line = interrupted_line(work, ['tools/train.py', 'c.py', '--work-dir', work], 'stopped by SIGTERM')
    assert line.endswith(f'; last checkpoint none; resume: nothing saved to resume from, python tools/train.py c.py '
                         f'--work-dir {work} starts over'), line



def test_a_run_stopped_between_a_save_and_its_pointer_is_told_the_resume_that_is_taken(tmp_path):
    """Ctrl-C while ``last_checkpoint`` was written after iter_3.pth (its temporary file being synced): the line
    said 'last checkpoint WORK/iter_2.pth; resume: ... --resume WORK/iter_2.pth', the pointer's, and that command
    was refused ('this work folder holds later checkpoints (iter_3.pth)'). It names iter_3.pth now, and with the
    pointer at the newest (or none in the folder) the line is as before."""
    from xtuner_plugins.cli.train_closing import interrupted_line
    work = tmp_path / 'w'
    work.mkdir()
    for name in ('iter_2.pth', 'iter_3.pth'):
        (work / name).write_text('x')
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    argv = ['tools/train.py', 'c.py', '--work-dir', str(work)]
    line = interrupted_line(str(work), argv)
    assert f'; last checkpoint {work / "iter_3.pth"}; resume: ' in line and line.endswith(
        f'--resume {work / "iter_3.pth"}'), line
    (work / 'last_checkpoint').unlink()
    assert interrupted_line(str(work), argv).endswith(f'--resume {work / "iter_3.pth"}')
    (work / 'last_checkpoint').write_text(str(work / 'iter_3.pth'))
    assert interrupted_line(str(work), argv).endswith(f'--resume {work / "iter_3.pth"}')

def interrupted_run(tmp_path, options, ready, sig=signal.SIGINT, group=True, extra_args=(), signals=1,
                    worker=False):
    """The toy run with ``options``, ``sig`` to its process group (SIGINT: as Ctrl-C in a terminal), to its
    process alone (``group=False``: ``kill PID``, ``timeout``), or to one of its DataLoader workers (``worker``),
    3 s after ``ready(work)`` holds: ``(cmd, env, work, exit code, log)``."""
    work = str(tmp_path / 'work')
    cmd, env = launch.train_command(GUARDED, work, script=TRAIN_TOOL, cfg_options=options, extra_args=extra_args)
    os.makedirs(work)
    job = launch.TrainJob(cmd, train_env(extra_env=env), str(tmp_path / 'interrupted.log'))
    try:
        deadline = time.time() + 240
        while not ready(work):
            assert job.poll() is None and time.time() < deadline, job.read_log()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # into the paused iteration
        if worker:   # (the training's children are its DataLoader workers)
            children = subprocess.run(['pgrep', '-P', str(job.proc.pid)], capture_output=True, text=True).stdout
            os.kill(int(children.split()[0]), sig)
        for _ in range(0 if worker else signals):   # (a second one 20 ms after the first: two Ctrl-C, kill twice)
            (os.killpg if group else os.kill)(job.proc.pid, sig)
            time.sleep(0.02)
        try:
            code = job.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:   # where it hung: each process's stacks (TrainJob.kill), then the log
            job.kill('still running 60 s after the signal', stacks=True)
            pytest.fail(f'still running 60 s after the signal; the log:\n{job.read_log()[-8000:]}')
    finally:
        job.kill('test over')
        job.close()
    return cmd, env, work, code, job.read_log()


def pointing_at(checkpoint):
    """``ready(work)`` for :func:`interrupted_run`: the work folder's ``last_checkpoint`` names ``checkpoint``."""
    def saved(work):
        pointer = os.path.join(work, 'last_checkpoint')
        return os.path.isfile(pointer) and open(pointer).read().strip() == checkpoint
    return saved


@pytest.mark.slow
@pytest.mark.parametrize('sig,group,code,how', [
    (signal.SIGINT, True, 130, 'interrupted'),
    (signal.SIGTERM, True, 143, 'stopped by SIGTERM'),    # systemd, kill -- -PGID: the data workers get it too
    (signal.SIGTERM, False, 143, 'stopped by SIGTERM')])  # kill PID, timeout
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, sig, group, code, how):
    """SIGINT to the training's process group, as Ctrl-C in a terminal, while the toy run sleeps in iteration 5
    (iteration 4's checkpoint saved): one line, exit code 130, no traceback; the command it gives resumes. SIGTERM
    outside Slurm (no checkpoint saved on it) ended the run at once without a word: the same line, exit code 143."""
    checkpoint = str(tmp_path / 'work' / 'iter_4.pth')
    saved = pointing_at(checkpoint)
    cmd, env, work, ended, log = interrupted_run(tmp_path, {
        'model.pause_at_iter': 5, 'model.pause_how': 'sleep', 'default_hooks.checkpoint.interval': 2,
        'train_dataloader.num_workers': 2}, saved, sig, group)
    lines = [line for line in log.splitlines() if line.strip()]
    resume = shlex.join(['python', *cmd[1:], '--resume', checkpoint])
    assert ended == code and 'Traceback' not in log, log[-3000:]
    assert lines[-1] == f'train: {how} at iteration 5; last checkpoint {checkpoint}; resume: {resume}', \
        log[-3000:]
    if sig == signal.SIGTERM:
        return   # (the resume is the same as Ctrl-C's, tried once below)
    resumed = subprocess.run([sys.executable, *shlex.split(resume)[1:]], env=train_env(extra_env=env), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and f'resumed from {checkpoint}' in out and 'Iter(train) [6/6]' in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_two_ranks_with_data_workers_says_where_the_run_stopped_once(tmp_path):
    """``--nproc-per-node 2`` with DataLoader workers, SIGTERM to the launcher while rank 0 sleeps in iteration 5:
    the launcher passes it to each rank's process group, so the workers end too. torch's SIGCHLD handler raised
    "DataLoader worker ... is killed by signal" inside the stop's handling, and the run ended with
    ``train: stopped by SIGTERM before training started; nothing saved`` from every rank (5 times of 5), after
    rank 0's right line or in its place. Now the one line of rank 0, exit code 143."""
    checkpoint = str(tmp_path / 'work' / 'iter_4.pth')
    saved = pointing_at(checkpoint)
    _, _, _, ended, log = interrupted_run(tmp_path, {
        'model.pause_at_iter': 5, 'model.pause_how': 'sleep', 'default_hooks.checkpoint.interval': 2,
        'train_dataloader.num_workers': 2}, saved, signal.SIGTERM, group=False,
        extra_args=['--nproc-per-node', '2'])
    said = [line for line in log.splitlines() if line.startswith('train: ')]
    assert ended == 143 and 'Traceback' not in log, log[-3000:]
    assert len(said) == 1 and said[0].startswith(
        f'train: stopped by SIGTERM at iteration 5; last checkpoint {checkpoint}; resume: python '), log[-3000:]
    assert '--nproc-per-node 2' in said[0], said


@pytest.mark.slow
@pytest.mark.parametrize('sig,code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_does_not_cut_the_stop_short(tmp_path, sig, code):
    """Two signals 20 ms apart (a second Ctrl-C, kill twice) with DataLoader workers: the second one, taken by the
    default handler again or raised inside the stop's own handling, ended the run by the signal (-15) after the
    line, left its lock, printed a KeyboardInterrupt traceback from an exit handler, or a second, contradictory line
    ('interrupted before training started'). Now it is noted and the stop goes on: one line, the lock released."""
    from xtuner_plugins.engine.lockfile import LOCK_NAME
    _, _, work, ended, log = interrupted_run(tmp_path, {
        'model.pause_at_iter': 5, 'model.pause_how': 'sleep', 'default_hooks.checkpoint.interval': 2,
        'train_dataloader.num_workers': 2}, lambda work: os.path.isfile(os.path.join(work, 'iter_4.pth')), sig,
        signals=2)
    said = [line for line in log.splitlines() if line.startswith('train: ')]
    assert ended == code and 'Traceback' not in log and 'Exception ignored' not in log, log[-3000:]
    assert len(said) == 1 and ' at iteration 5; last checkpoint ' in said[0], log[-3000:]
    assert not os.path.exists(os.path.join(work, LOCK_NAME))


@pytest.mark.slow
def test_a_data_loader_worker_killed_by_the_oom_killer_ends_the_run_with_one_line(tmp_path):
    """SIGKILL, the out-of-memory killer's signal, to a DataLoader worker while the toy run sleeps in iteration 5:
    torch raises its RuntimeError wherever the training process was (here, the model's forward). The run ended with
    that traceback and 'train: FAILED: RuntimeError: DataLoader worker (pid N) is killed by signal: Killed.'; now
    one line that names the likely cause and what needs less memory, exit code 1, and the checkpoint to resume."""
    checkpoint = str(tmp_path / 'work' / 'iter_4.pth')
    _, _, _, ended, log = interrupted_run(tmp_path, {
        'model.pause_at_iter': 5, 'model.pause_how': 'sleep', 'default_hooks.checkpoint.interval': 2,
        'train_dataloader.num_workers': 2, 'train_dataloader.persistent_workers': True}, pointing_at(checkpoint),
        signal.SIGKILL, worker=True)
    said = [line for line in log.splitlines() if line.startswith('train: ')]
    assert ended == 1 and 'Traceback' not in log, log[-3000:]
    assert len(said) == 1 and re.match(r'train: FAILED: a DataLoader worker \(pid \d+\) was killed by SIGKILL: most '
                                       r'often the out-of-memory killer', said[0]), log[-3000:]
    assert log.rstrip().endswith(f'--cfg-options resume=True continues from {checkpoint}'), log[-3000:]


def test_help_lists_this_tools_options_and_deepspeeds_names_before_anything_loads():
    """``--help`` is this tool's: ``--nproc-per-node`` and the DeepSpeed names it takes, which are the names
    XTuner's train script resolves; printed before torch or MMEngine load (no log line before it)."""
    from xtuner.configs import cfgs_name_path
    done = subprocess.run([sys.executable, '-X', 'importtime', TRAIN_TOOL, 'configs/finetune_lora.py', '--help'],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=train_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('usage: python tools/train.py CONFIG'), done.stdout[:200]
    assert '--nproc-per-node N' in done.stdout and '--cfg-options resume=True' in done.stdout
    names = set(re.findall(r'deepspeed_zero\w+', done.stdout))
    assert names and names <= set(cfgs_name_path), names - set(cfgs_name_path)
    imported = {line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not {'torch', 'mmengine', 'xtuner'} & imported, imported & {'torch', 'mmengine', 'xtuner'}


@pytest.mark.slow
def test_ctrl_c_inside_backward_ends_130_not_a_segfault_and_releases_the_run(tmp_path):
    """A Ctrl-C inside ``backward()``, in an activation-checkpointed recompute (the CPU's LLM layers): autograd
    nodes left in the engine's thread-local queue were destroyed after Python's teardown and took a dead
    interpreter's GIL: exit -11 (139 from a shell) after the right line, 4 times of 4. 130 now, the run's lock
    released (the atexit handlers run before the process ends)."""
    from xtuner_plugins.engine.lockfile import LOCK_NAME
    _, _, work, code, log = interrupted_run(tmp_path, {
        'model.pause_at_iter': 3, 'model.pause_how': 'backward', 'default_hooks.checkpoint.interval': 2},
        lambda work: os.path.isfile(os.path.join(work, 'last_checkpoint')))
    assert code == 130, (code, log[-3000:])
    assert log.strip().splitlines()[-1].startswith('train: interrupted at iteration 3; last checkpoint '), log[-3000:]
    assert not os.path.exists(os.path.join(work, LOCK_NAME))
