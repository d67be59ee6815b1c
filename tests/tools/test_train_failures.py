"""cli/train_failures.py: the closing line's words for a failed run, read from the errors torch and the collective
backends really raise."""

import os
import re
import signal

import pytest
import torch

from xtuner_plugins.cli.train_failures import failure_message, lost_peer, worker_death
from xtuner_plugins.data.errors import TooManyBadSamplesError


class _BadData(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise TooManyBadSamplesError("2 of 2 samples are bad: {'missing_image': 2}; last: d.jsonl:2: image file not "
                                     "found: x.jpg\nRun tools/check_dataset.py for the full list.")


def test_a_data_loader_worker_error_is_summed_up_by_the_worker_message():
    """torch re-raises a worker's error as "Caught X in DataLoader worker process 0." with the worker's traceback
    below: the summary gives the worker's message (which file, line and reason), not that first line."""
    loader = torch.utils.data.DataLoader(_BadData(), num_workers=1)
    with pytest.raises(TooManyBadSamplesError) as raised:
        next(iter(loader))
    assert str(raised.value).startswith('Caught TooManyBadSamplesError in DataLoader worker process 0')
    assert failure_message(raised.value) == ("2 of 2 samples are bad: {'missing_image': 2}; last: d.jsonl:2: image "
                                             "file not found: x.jpg")
    assert failure_message(ValueError('model.llm: no such folder\nmore')) == 'model.llm: no such folder'
    assert failure_message(RuntimeError()) == ''
    assert worker_death(raised.value) is None   # the worker raised: its own message says why


class _DyingData(torch.utils.data.Dataset):
    """Each item ends the worker that loads it: by ``how`` (a signal's number), or ``os._exit`` of ``-how``."""

    def __init__(self, how):
        self.how = how

    def __len__(self):
        return 4

    def __getitem__(self, index):
        if self.how > 0:
            os.kill(os.getpid(), self.how)
        os._exit(-self.how)


@pytest.mark.parametrize('how,said', [
    (signal.SIGKILL, 'was killed by SIGKILL: most often the out-of-memory killer'),
    (signal.SIGTERM, 'was stopped by SIGTERM from outside the run'),
    (signal.SIGBUS, 'ended with a bus error: most often the shared memory (/dev/shm) is full'),
    (signal.SIGSEGV, 'crashed (Segmentation fault); train_dataloader.num_workers=0 runs the loading in the '
                     'training process'),
    (-3, 'exited with code 3; train_dataloader.num_workers=0')])
def test_a_data_loader_worker_that_died_is_named_with_its_likely_cause(how, said):
    """A worker the out-of-memory killer (SIGKILL) or anything else ended raises torch's RuntimeError in the
    training process, wherever it was: the run ended with that traceback (the model's forward, say) and 'train:
    FAILED: RuntimeError: DataLoader worker (pid 6349) is killed by signal: Killed.', not what it likely means."""
    loader = torch.utils.data.DataLoader(_DyingData(how), num_workers=1)
    with pytest.raises(RuntimeError) as raised:
        for _ in loader:
            pass
    words = worker_death(raised.value)
    assert words is not None and words.startswith('a DataLoader worker (pid ') or words.startswith(
        'DataLoader worker (pid '), (str(raised.value), words)
    assert said in words, (str(raised.value), words)


def test_only_a_dead_workers_error_reads_as_one():
    """Torch's wording where the loader found the worker gone from its queue, and errors that only mention
    workers."""
    assert worker_death(RuntimeError('DataLoader worker (pid(s) 12, 13) exited unexpectedly')) == (
        'DataLoader workers (pids 12, 13) ended without a word; train_dataloader.num_workers=0 runs the loading in '
        'the training process, where its error is shown')
    assert worker_death(RuntimeError('Caught KeyError in DataLoader worker process 0.\nKeyError: 3')) is None
    assert worker_death(ValueError('DataLoader worker (pid 5) is killed by signal: Killed.')) is None


def test_only_a_collectives_error_reads_as_a_lost_rank(monkeypatch):
    """A rank that lost another inside a collective (gloo's or the store's RuntimeError) prints one line; a
    BrokenPipeError of this rank's own (a log or file written to a closed pipe) or a DataLoader worker's was read
    as 'another rank stopped first' and its traceback, the run's cause, left out."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert lost_peer(RuntimeError('[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:5678'))
    assert lost_peer(RuntimeError('Broken pipe'))   # the TCP store's
    assert not lost_peer(BrokenPipeError(32, 'Broken pipe'))
    assert not lost_peer(RuntimeError('Caught BrokenPipeError in DataLoader worker process 0.\nBroken pipe'))
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert not lost_peer(RuntimeError('Connection closed by peer'))


def test_a_source_folder_not_found_names_the_one_the_previous_stage_records(tmp_path):
    """A next stage given only model.pretrained_pth stopped on the config's default vision encoder folder, not
    there, while the checkpoint records the folder it was trained with: the refusal now names it."""
    from xtuner_plugins.cli.train_failures import recorded_source_hint
    from xtuner_plugins.models.lineage import lineage_record
    tower = tmp_path / 'tower'
    tower.mkdir()
    (tower / 'config.json').write_text('{}')
    torch.save({'meta': {'lineage': lineage_record({'vision_encoder': str(tower), 'llm': str(tmp_path / 'gone')})}},
               tmp_path / 'sft.pth')
    argv = ['tools/train.py', 'c.py', '--cfg-options', f'model.pretrained_pth={tmp_path}/sft.pth']
    message = 'model.vision_encoder: vision encoder folder not found: models/InternViT-300M-448px-V2_5'
    assert recorded_source_hint(message, argv) == (
        f' ({tmp_path}/sft.pth, model.pretrained_pth, was trained with model.vision_encoder={tower}: give '
        f'--cfg-options model.vision_encoder={tower})')
    assert recorded_source_hint('model.llm: not found: x', argv) == (   # its recorded folder is gone too
        f' ({tmp_path}/sft.pth, model.pretrained_pth, was trained with model.llm={tmp_path}/gone, not there either: '
        'give --cfg-options model.llm=THE_FOLDER where it is now; its files are compared with the recorded ones)')
    assert recorded_source_hint(message, argv[:2]) == '' == recorded_source_hint('other: x', argv)


def test_a_write_the_disk_refused_names_the_file_the_disk_and_the_resume(tmp_path):
    """A disk that filled between two checkpoints stopped the run in its log handler or TensorBoard's writer: the
    closing line was 'OSError: [Errno 28] No space left on device', naming no file and nothing of the disk (a
    helper's sweep). A checkpoint's own WriteFailed is said whole already; other errors are not this."""
    import errno

    from xtuner_plugins.cli.train_failures import disk_refused
    from xtuner_plugins.engine.checkpointing import WriteFailed
    full = OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'vis_data' / 'scalars.json'))
    line = disk_refused(full, str(tmp_path))
    assert re.fullmatch(rf'No space left on device writing {tmp_path}/vis_data/scalars\.json \(the run writes its '
                        r'log, its scalars and TensorBoard files and its checkpoints under '
                        rf'{tmp_path}: its disk has [0-9.]+ MiB free\); make room, then --cfg-options resume=True '
                        r'continues from the last checkpoint', line), line
    try:   # raised from it (TensorBoard's writer re-raises its thread's error)
        try:
            raise OSError(errno.EFBIG, 'File too large')
        except OSError as inner:
            raise RuntimeError('event writer failed') from inner
    except RuntimeError as outer:
        assert 'File too large (the run writes' in disk_refused(outer, str(tmp_path))
        assert 'and a file-size limit (ulimit -f) is set' in disk_refused(outer, str(tmp_path))
    assert disk_refused(WriteFailed(errno.ENOSPC, 'could not write iter_4.pth'), str(tmp_path)) is None
    assert disk_refused(OSError(errno.ENOENT, 'No such file'), str(tmp_path)) is None
    assert disk_refused(ValueError('x'), str(tmp_path)) is None


def test_a_write_the_disk_refused_in_a_thread_or_a_log_handler_is_one_line(tmp_path):
    """TensorBoard's writer thread on a full disk printed 'Exception in thread Thread-1' and its traceback above the
    closing line, and a log handler '--- Logging error ---' for every record after it (a helper's sweep)."""
    import subprocess
    import sys
    script = '''
import errno, logging, threading
from xtuner_plugins.cli.train_failures import quiet_disk_errors
quiet_disk_errors()
def full():
    raise OSError(errno.ENOSPC, 'No space left on device')
def other():
    raise ValueError('not the disk')
for target in (full, full, other):
    t = threading.Thread(target=target, name=target.__name__)
    t.start(); t.join()
class Full(logging.StreamHandler):
    def emit(self, record):
        try:
            raise OSError(errno.EDQUOT, 'Disk quota exceeded', '/w/run.log')
        except OSError:
            self.handleError(record)
class Broken(logging.StreamHandler):
    def emit(self, record):
        try:
            raise KeyError('a bug')
        except KeyError:
            self.handleError(record)
log = logging.getLogger('t')
log.addHandler(Full()); log.addHandler(Broken())
log.warning('one'); log.warning('two')
'''
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    err = done.stderr
    assert err.count('train: No space left on device (in thread full): the run stops when it next writes through '
                     'it') == 1, err   # once, no traceback
    assert "Exception in thread other" in err and 'ValueError: not the disk' in err   # not the disk: as it was
    assert err.count('train: Disk quota exceeded (the log\'s Full, writing /w/run.log): the lines it logs from here '
                     'are lost') == 1, err
    assert err.count('--- Logging error ---') == 2 and 'KeyError' in err   # the other handler's: as it was
    assert 'OSError' not in err, err


def test_a_lost_rank_is_said_once_a_node():
    """Every rank of a run that lost one printed 'another rank of the run stopped first': 63 such lines of a
    64-rank run over the one that said why. Each node's first rank says it now."""
    from xtuner_plugins.cli.train_failures import lost_peer_line
    lost = RuntimeError('[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:5678')
    assert lost_peer_line(lost, {'RANK': '8', 'LOCAL_RANK': '0'}) == (
        "train: FAILED on rank 8: another rank of the run stopped first (its own line, or its launcher's, says why); "
        "this one then lost it (and so did the node's other ranks): RuntimeError: [gloo/transport/tcp/pair.cc:534] "
        'Connection closed by peer [10.0.0.2]:5678')
    assert lost_peer_line(lost, {'RANK': '9', 'LOCAL_RANK': '1'}) is None
    assert lost_peer_line(lost, {}).startswith('train: FAILED on rank ?: ')   # a launcher that gives neither
