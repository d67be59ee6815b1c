"""Judging a training run by what it left (``xtuner_plugins/outcome.py``): ``xtuner train`` exits 0 after a
crash, so the log's iterations, tracebacks and guard lines and the checkpoints decide."""

import os

from xtuner_plugins.outcome import TrainOutcome, find_checkpoints, judge, parse_log

LOG = """$ python train.py
11/23 05:23:40 - mmengine - INFO - Iter(train) [1/6]  lr: 5.0e-02  eta: 0:00:05  time: 1.0  loss: 1.7262  grad_norm: 3
11/23 05:23:41 - mmengine - INFO - Iter(train) [2/6]  lr: 5.0e-02  eta: 0:00:04  time: 1.0  loss: nan
11/23 05:23:42 - mmengine - INFO - Iter(train) [ 3/6]  lr: 5.0e-02  base/loss: 9.0  loss: 2.0655
"""


def _outcome(tmp_path, log=LOG, checkpoints=(), returncode=0):
    return TrainOutcome(command=['x'], returncode=returncode, timed_out=False, wall_s=1.0,
                        work_dir=str(tmp_path), log_path='', log=log, checkpoints=list(checkpoints),
                        max_iters=parse_log(log)[1], last_iter=parse_log(log)[2])


def test_parse_log():
    losses, max_iters, last_iter = parse_log(LOG)
    assert max_iters == 6 and last_iter == 3
    assert losses[1] == 1.7262 and losses[3] == 2.0655 and losses[2] != losses[2]  # nan; not base/loss


def test_parse_log_reads_the_consoles_progress_lines():
    """The console's lines (engine/progress.py) give what MMEngine's give; a line that merely mentions an
    iteration does not count."""
    log = ('11/24 00:37:01 - mmengine - INFO - training x: 40 iterations (1 epoch of 40)\n'
           '11/24 00:37:01 - mmengine - INFO - iter 10/40  loss 6.267  lr 1.80e-04  3.3k tokens/s  eta 0:00:27\n'
           '11/24 00:37:18 - mmengine - INFO - iter 20/40  loss nan  lr 1.12e-04\n'
           '11/24 00:37:28 - mmengine - INFO - iter 40/40  loss 6.264  lr 3.24e-07  eta 0:00:00  mem 1.04 GiB\n'
           '11/24 00:37:29 - mmengine - ERROR - rank 1 stopped after iter 50/60 loss 1.0\n')
    losses, max_iters, last_iter = parse_log(log)
    assert (max_iters, last_iter) == (40, 40)
    assert set(losses) == {10, 20, 40} and losses[10] == 6.267 and losses[40] == 6.264 and losses[20] != losses[20]


def test_find_checkpoints(tmp_path):
    for name in ('iter_10.pth', 'iter_2.pth', 'epoch_1.pth', 'iter_3.pth.tmp', 'last_checkpoint'):
        (tmp_path / name).write_text('x')
    (tmp_path / 'iter_20.pth').mkdir()  # an empty DeepSpeed folder is no checkpoint
    (tmp_path / 'iter_12.pth').mkdir()
    (tmp_path / 'iter_12.pth' / 'mp_rank_00_model_states.pt').write_text('x')
    assert [os.path.basename(p) for p in find_checkpoints(str(tmp_path))] == [
        'epoch_1.pth', 'iter_2.pth', 'iter_10.pth', 'iter_12.pth']


def test_judge(tmp_path):
    assert judge(_outcome(tmp_path)) == ['the last iteration logged is 3 of 6', 'no checkpoint saved']
    # the last iteration need not be logged (log interval): its checkpoint proves it ran
    assert judge(_outcome(tmp_path, checkpoints=['w/iter_6.pth'])) == []
    assert judge(_outcome(tmp_path, checkpoints=['w/iter_4.pth'])) == [
        'the last iteration logged is 3 of 6', 'final checkpoint iter_6.pth missing (found [\'iter_4.pth\'])']
    crashed = LOG + 'Traceback (most recent call last):\n  RuntimeError: x\n'
    # tools/train.py's stated cause leads (a full disk at the last save read as 'stopped at iteration 5 of 10')
    full = LOG + '\ntrain: FAILED: WriteFailed: w/iter_6.pth: the disk is full; no partial file was left\n'
    assert judge(_outcome(tmp_path, full, returncode=1))[:2] == [
        'FAILED: WriteFailed: w/iter_6.pth: the disk is full; no partial file was left', 'exit code 1']
    assert judge(_outcome(tmp_path, crashed, ['w/iter_6.pth'])) == [
        'traceback in the log (RuntimeError: x)']  # exit code 0, with the error it ended in
    # a refusal at start-up leads too (a work folder on a full disk: its cause was the log's last line only)
    refused = 'train: refused: --work-dir w: 3 MiB free, under the 16 MiB a run needs to start\n'
    assert judge(_outcome(tmp_path, refused, returncode=2))[:2] == [
        'refused: --work-dir w: 3 MiB free, under the 16 MiB a run needs to start', 'exit code 2']
    full_disk = LOG + ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
                       'OSError: [Errno 28] No space left on device\n--- Logging error ---\n')
    assert judge(_outcome(tmp_path, full_disk, ['w/iter_6.pth'], returncode=1)) == [
        'exit code 1', 'traceback in the log (OSError: [Errno 28] No space left on device)']
    # node 0's agent gone before another's exit barrier: logged with a traceback, the run succeeded
    agent = 'E1123 17:19:40.287000 27300 torch/distributed/elastic/agent/server/api.py:1007] '
    barrier = ''.join(agent + line + '\n' for line in (
        'Error waiting on exit barrier. Elapsed: 0.03 seconds', 'Traceback (most recent call last):',
        '  File "torch/distributed/elastic/utils/store.py", line 201, in barrier',
        'torch.distributed.DistNetworkError: Failed to recv, got 0 bytes.'))
    assert judge(_outcome(tmp_path, LOG + barrier, ['w/iter_6.pth'])) == []
    assert judge(_outcome(tmp_path, LOG + barrier + crashed[len(LOG):], ['w/iter_6.pth'])) == [
        'traceback in the log (RuntimeError: x)']
    assert judge(_outcome(tmp_path, 'torch...ChildFailedError\n', returncode=1), lead=False) == [
        'exit code 1', 'torchrun reported a failed child']
    assert judge(_outcome(tmp_path, '$ torchrun\n'), lead=False) == []  # rank 0 logs, on another node
    assert judge(_outcome(tmp_path, '$ torchrun\n')) == ['no training iteration was logged',
                                                          'no checkpoint saved']
    # the run guards' lines (engine/runlock.py, engine/watchdog.py)
    assert judge(_outcome(tmp_path, 'train: refused: w is in use by another run: pid 1 ...\n', returncode=2),
                 lead=False) == ['refused: w is in use by another run: pid 1 ...', 'exit code 2']
    assert judge(_outcome(tmp_path, '[rank1]: w is in use by another run: pid 1 ...\n', returncode=2),
                 lead=False) == ['exit code 2', 'refused: the work folder is in use by another run']
    stalled = LOG + 'E - train: STALLED: rank 1 (pid 7 on host h, last heard 6 s ago) silent for more than 5 s ...\n'
    assert judge(_outcome(tmp_path, stalled, ['w/iter_6.pth'])) == ['a rank stalled']
