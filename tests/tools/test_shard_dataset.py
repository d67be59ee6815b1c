"""tools/shard_dataset.py (cli/shard_dataset.py): annotations (jsonl, json list, InternVL meta) and their images into
WebDataset tar shards; counted, named skips; nothing written over."""

import json
import os
import tarfile

import pytest

from tests.helpers import conv, write_image, write_jsonl, write_video
from xtuner_plugins.cli.shard_dataset import main
from xtuner_plugins.data.shards import read_index


def files(tmp_path):
    write_image(tmp_path / 'i' / 'a.png', size=(40, 30))
    jsonl = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'a.png', 'conversations': conv()},
                                               {'image': 'gone.png', 'conversations': conv()},
                                               {'conversations': conv(image=False)}])
    listed = tmp_path / 'b.json'
    listed.write_text(json.dumps([{'image': 'a.png', 'conversations': conv(answer='B')}]))
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'m': {'root': str(tmp_path / 'i'), 'annotation': str(listed), 'repeat_time': 2}}))
    return jsonl, str(listed), str(meta)


def test_writes_shards_and_names_each_skip(tmp_path, capsys):
    jsonl, listed, meta = files(tmp_path)
    out = tmp_path / 'shards'
    code = main(['--data', jsonl, meta, '--image-folder', str(tmp_path / 'i'), str(tmp_path / 'i'), '--out', str(out),
                 '--samples-per-shard', '2', '--keep-order'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f'{jsonl}:2: missing_image: image file not found: {tmp_path}/i/gone.png' in printed
    assert f'wrote 4 samples in 2 shards to {out}; skipped 1 ({{\'missing_image\': 1}})' in printed
    index = read_index(str(out))
    assert [s['samples'] for s in index['shards']] == [2, 2] and index['skipped'] == {'missing_image': 1}
    assert [s['annotation'] for s in index['sources']] == [jsonl, listed]  # the meta file's entry, repeated twice
    with tarfile.open(out / 'shard-000000.tar') as tar:
        assert tar.getnames() == ['000000000.img0.png', '000000000.json', '000000002.json']
        first = json.loads(tar.extractfile('000000000.json').read())
    assert first['line'] == 1 and first['images'] == ['img0.png'] and first['sample']['image'] == 'a.png'
    assert (out / 'shard-000000.tar').stat().st_size > 0 and index['order'] == {'shuffled': False}


def shard_sources(out):
    """Each shard's samples' sources, in the order they were written."""
    index = read_index(str(out))
    found = []
    for shard in index['shards']:
        with tarfile.open(out / shard['file']) as tar:
            found.append([json.loads(tar.extractfile(m).read())['source'] for m in tar.getmembers()
                          if m.name.endswith('.json')])
    return index, found


def test_samples_are_written_shuffled_unless_the_order_is_kept(tmp_path, capsys):
    """Two files of 30 samples each, one after the other: in the files' order every shard holds one file's samples
    (training reads a shard's samples in turn: batches of one source); shuffled (the default, seed 0) every shard
    mixes both, the same seed writes the same order and another seed another."""
    data = [str(write_jsonl(tmp_path / f'{name}.jsonl', [{'conversations': conv(answer=f'{name}{i}', image=False)}
                                                         for i in range(30)])) for name in 'ab']
    runs = {}
    for name, extra in [('kept', ['--keep-order']), ('shuffled', []), ('again', ['--seed', '0']),
                        ('other', ['--seed', '1'])]:
        assert main(['--data', *data, '--out', str(tmp_path / name), '--samples-per-shard', '10', *extra]) == 0
        runs[name] = shard_sources(tmp_path / name)
    index, kept = runs['kept']
    assert kept == [[0] * 10] * 3 + [[1] * 10] * 3
    index, shuffled = runs['shuffled']
    assert index['order'] == {'shuffled': True, 'seed': 0} and index['samples'] == 60
    assert all(set(shard) == {0, 1} for shard in shuffled) and sorted(sum(shuffled, [])) == sorted(sum(kept, []))
    assert runs['again'][1] == shuffled and runs['other'][1] != shuffled
    with tarfile.open(tmp_path / 'shuffled' / 'shard-000000.tar') as tar:   # a sample keeps its file and line
        first = json.loads(tar.extractfile(tar.getmembers()[0]).read())
    assert first['sample']['conversations'][1]['value'] == f'{"ab"[first["source"]]}{first["line"] - 1}'


def test_refuses_a_folder_that_holds_anything(tmp_path, capsys):
    jsonl, _, _ = files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code = main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and 'not empty' in err and 'nothing is written over' in err, err
    assert sorted(os.listdir(tmp_path)) == before
    assert main(['--data', jsonl, '--out', jsonl]) == 2 and 'a file, not a folder' in capsys.readouterr().err


def test_no_image_found_is_refused_in_one_line(tmp_path, capsys):
    only = write_jsonl(tmp_path / 'c.jsonl', [{'image': 'gone.png', 'conversations': conv()}])
    os.makedirs(tmp_path / 'i')
    assert main(['--data', only, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('shard_dataset: error: ') and only in err and err.count('\n') == 1, err
    assert not os.path.exists(tmp_path / 'o')


def test_an_out_that_cannot_be_a_folder_is_one_line_before_the_data_is_checked(tmp_path, capsys, monkeypatch):
    jsonl, _, _ = files(tmp_path)
    os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
    monkeypatch.setattr('xtuner_plugins.data.dataset.InternVLDataset.__init__',
                        lambda *a, **k: pytest.fail('the data was checked before --out was found unusable'))
    assert main(['--data', jsonl, '--out', str(tmp_path / 'dangling')]) == 2
    err = capsys.readouterr().err
    assert err == (f'shard_dataset: error: --out {tmp_path}/dangling is a symbolic link to {tmp_path}/nowhere, which '
                   'does not exist: give the folder itself, or make the link\'s target first\n')
    assert main(['--data', jsonl, '--out', str(tmp_path / 'dangling' / 'sub')]) == 2   # ('No such file' before)
    assert capsys.readouterr().err.startswith(f'shard_dataset: error: --out {tmp_path}/dangling/sub lies under '
                                              f'{tmp_path}/dangling, a symbolic link to {tmp_path}/nowhere')
    assert main(['--data', jsonl, '--out', f'{jsonl}/shards']) == 2
    assert capsys.readouterr().err == f'shard_dataset: error: --out {jsonl}/shards: cannot be made a folder: Not a ' \
                                      f'directory\n'


def test_an_out_folder_left_by_a_run_that_did_not_finish_says_so(tmp_path, capsys):
    """Shards without shards.json (an interrupted run): refused as any full folder, saying what it holds."""
    jsonl, _, _ = files(tmp_path)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'shard-000000.tar').write_bytes(b'')
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert ('not empty (1 entries: the shards of a run that did not finish, no shards.json; remove the folder to '
            'write them again)') in err and err.count('\n') == 1, err


def test_a_second_run_into_the_folder_another_writes_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    """Two runs started at once into one folder both find it empty: the first to mark it writes, the other is
    refused (it once wrote the same shard-000000.tar through its own descriptor, mixing both runs' bytes)."""
    from xtuner_plugins.cli import shard_dataset
    jsonl, _, _ = files(tmp_path)
    out = tmp_path / 'out'
    args = ['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]
    real_check = shard_dataset.out_problem
    calls = []

    def the_other_run_marks_it_after_this_check(folder):
        calls.append(folder)
        if len(calls) > 1:
            return real_check(folder)
        os.makedirs(out)
        (out / shard_dataset.WRITING).write_text(json.dumps(dict(pid=4242, host='node-7', started=0)))
        (out / 'shard-000000.tar').write_bytes(b'the other run\'s bytes')
        return ''   # this run found the folder empty a moment before
    monkeypatch.setattr(shard_dataset, 'out_problem', the_other_run_marks_it_after_this_check)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'shard_dataset: error: --out {out}: another shard_dataset run is writing into it (pid 4242 '
                          f'on node-7, since ') and err.count('\n') == 1, err
    assert (out / 'shard-000000.tar').read_bytes() == b'the other run\'s bytes'  # not written over
    monkeypatch.setattr(shard_dataset, 'out_problem', real_check)
    assert main(args) == 2 and 'or was stopped before it finished (1 entries beside' in capsys.readouterr().err


def test_a_finished_run_leaves_no_mark_and_a_failed_one_no_folder(tmp_path, capsys):
    jsonl, _, _ = files(tmp_path)
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'out')]) == 0
    assert sorted(os.listdir(tmp_path / 'out')) == ['shard-000000.tar', 'shards.json']
    only = write_jsonl(tmp_path / 'c.jsonl', [{'image': 'gone.png', 'conversations': conv()}])
    assert main(['--data', only, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'o')]) == 2
    assert not os.path.exists(tmp_path / 'o')


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_no_shard_set(tmp_path, capsys, monkeypatch):
    import errno

    from xtuner_plugins.cli.shard_entries import Shard
    jsonl, _, _ = files(tmp_path)
    out = tmp_path / 'out'
    real = Shard.write

    def fills_up(self, sample):   # as tarfile's write to a full disk raises it: no file name
        if self.samples:
            raise OSError(errno.ENOSPC, 'No space left on device')
        real(self, sample)
    monkeypatch.setattr(Shard, 'write', fills_up)
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f'shard_dataset: error: writing into {out} failed: No space left on device '
                   f'({out}/shard-part000000000.tar.part); what was written there is no shard set (no shards.json): '
                   f'remove the folder, then write it again\n'), err
    assert 'shards.json' not in os.listdir(out)


def test_no_sample_to_write_leaves_no_folder_it_made(tmp_path, capsys):
    """Every sample skipped: exit 1, and the empty --out folder the tool made was left behind."""
    (tmp_path / 'i').mkdir()
    for name in ('a.png', 'b.png'):   # found at start-up, skipped when read
        (tmp_path / 'i' / name).write_bytes(b'not an image at all')
    data = write_jsonl(tmp_path / 'd.jsonl', [{'image': name, 'conversations': conv()} for name in ('a.png', 'b.png')])
    assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'o')]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "no sample to write: 2 skipped ({'corrupt_image': 2})"
    assert not os.path.exists(tmp_path / 'o')


def test_an_image_changed_after_the_start_up_check_is_a_counted_skip(tmp_path, capsys):
    """The start-up check is cached: an image made a link out of the image folder since the last run passed it,
    and the check at write time raised out of the loop (a traceback), leaving the folder marked as another run's.
    Now a counted skip; an error of any other kind is one line and takes the mark away."""
    jsonl, _, _ = files(tmp_path)
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'first')]) == 0
    outside = tmp_path / 'outside'
    outside.mkdir()
    write_image(outside / 'x.png', size=(40, 30))
    os.remove(tmp_path / 'i' / 'a.png')
    os.symlink(outside / 'x.png', tmp_path / 'i' / 'a.png')
    capsys.readouterr()
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'second')]) == 0
    printed = capsys.readouterr().out
    assert f'{jsonl}:1: unsafe_image_path: ' in printed and 'skipped 2' in printed, printed
    assert sorted(os.listdir(tmp_path / 'second')) == ['shard-000000.tar', 'shards.json']


def test_an_unexpected_error_while_writing_is_one_line_and_leaves_no_mark(tmp_path, capsys, monkeypatch):
    from xtuner_plugins.cli import shard_dataset, shard_entries
    jsonl, _, _ = files(tmp_path)
    out = tmp_path / 'out'

    def breaks(self, sample):
        raise RuntimeError('tar writer broke')
    monkeypatch.setattr(shard_entries.Shard, 'write', breaks)
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]) == 1
    assert capsys.readouterr().err == ('shard_dataset: error: failed: RuntimeError: tar writer broke (before any '
                                       'shard was written); nothing was written\n')
    assert not out.exists()   # the folder it made, with nothing in it
    out.mkdir()   # a folder given: left, without the mark
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]) == 1
    assert os.listdir(out) == []
    capsys.readouterr()
    real = shard_entries.Shard.close

    def breaks_later(self):   # once a shard is there: the set is not one
        real(self)
        raise RuntimeError('tar writer broke')
    monkeypatch.undo()
    monkeypatch.setattr(shard_entries.Shard, 'close', breaks_later)
    out = tmp_path / 'later'
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out), '--workers', '1']) == 1
    assert capsys.readouterr().err == (
        f'shard_dataset: error: writing into {out} failed: RuntimeError: tar writer broke; what was written there '
        'is no shard set (no shards.json): remove the folder, then write it again\n')
    assert shard_dataset.WRITING not in os.listdir(out)


def test_a_full_disk_at_the_mark_is_one_line_and_a_retry_is_not_refused(tmp_path, capsys, monkeypatch):
    """With no byte free the mark's write failed: a traceback, and the empty mark it left refused the same
    command once space was freed ('another shard_dataset run is writing into it')."""
    import errno

    from xtuner_plugins.cli import shard_dataset
    jsonl, _, _ = files(tmp_path)
    out = tmp_path / 'out'
    args = ['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]
    real = os.fdopen

    def full(fd, *a, **k):
        f = real(fd, *a, **k)
        f.write = lambda *_: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space left on device'))
        return f
    monkeypatch.setattr(shard_dataset.os, 'fdopen', full)
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and 'Traceback' not in err and err.strip().splitlines()[-1].endswith(
        f'--out {out}: cannot be written: No space left on device'), err
    monkeypatch.undo()
    assert main(args) == 0, capsys.readouterr().err
    assert 'shards.json' in os.listdir(out)


def test_an_image_that_cannot_be_read_is_a_corrupt_image_skip_as_training_names_it(tmp_path, capsys, monkeypatch):
    """An image there but unreadable (no read permission: faked, as root reads anything) is ``corrupt_image``, as
    training, check_dataset and eval call it, not ``missing_image``, which sent the user looking for the file."""
    import builtins

    from xtuner_plugins.cli import shard_entries
    jsonl, _, _ = files(tmp_path)

    def closed(path, *args, **kwargs):
        if str(path).endswith('a.png'):
            raise PermissionError(13, 'Permission denied', str(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(shard_entries, 'open', closed, raising=False)
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'out')]) == 0
    printed = capsys.readouterr().out
    assert (f"{jsonl}:1: corrupt_image: image file cannot be read: [Errno 13] Permission denied: "
            f"'{tmp_path}/i/a.png'") in printed, printed
    assert "'corrupt_image': 1" in printed and "'missing_image': 1" in printed, printed


@pytest.mark.parametrize('when', ['writing', 'checking'])
def test_sigterm_is_stopped_as_ctrl_c_is_and_leaves_no_mark(tmp_path, capsys, monkeypatch, when):
    """SIGTERM (kill, timeout, Slurm) ended the tool at once, with no word, its 'another run is writing' mark and
    partial shards left: now as Ctrl-C, exit code 143, the mark taken away (and a folder it made, when nothing
    was written yet)."""
    import signal
    import time

    from xtuner_plugins.cli import shard_dataset
    from xtuner_plugins.data import dataset
    jsonl, _, _ = files(tmp_path)
    before = signal.getsignal(signal.SIGTERM)   # (pytest-xdist's worker has a handler of its own)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises here
    monkeypatch.setattr(*((shard_dataset, 'write_shards') if when == 'writing' else (dataset, 'InternVLDataset')),
                        terminated)
    out = tmp_path / 'out'
    assert main(['--data', jsonl, '--image-folder', str(tmp_path / 'i'), '--out', str(out)]) == 143
    err = capsys.readouterr().err
    if when == 'writing':
        assert 'stopped before any shard was written; nothing was written' in err, err
        assert not out.exists()
    else:
        assert 'stopped while checking the data; nothing was written' in err and not out.exists(), err
    assert signal.getsignal(signal.SIGTERM) is before


def spread_set(tmp_path, n=30):
    """``n`` samples, every fourth naming an image that is not there."""
    write_image(tmp_path / 'i' / 'a.png', size=(40, 30))
    return write_jsonl(tmp_path / 'many.jsonl', [
        {'image': 'gone.png' if i % 4 == 3 else 'a.png', 'conversations': conv(answer=f'answer {i}')}
        for i in range(n)])


def test_a_file_that_is_not_an_image_is_never_packed(tmp_path, capsys):
    """A downloaded annotation file may name any file the user can read as an image (an absolute path, read as
    written as InternVL reads it): the shards held /etc/passwd and a key file whole, bytes a user then shares, where
    training and check_dataset skip them as corrupt images. Each image is now read as training reads it (its
    header) before it is packed; so is a video."""
    secret = tmp_path / 'secret'
    secret.mkdir()
    (secret / 'id_rsa').write_text('SECRET-TOKEN not an image\n')
    (secret / 'clip.mp4').write_text('SECRET-TOKEN not a video\n')
    write_image(tmp_path / 'd' / 'a.png', size=(40, 30))
    # a folder of frames holding a file that is not one (macOS's AppleDouble ._NAME beside each file it copies)
    write_video(tmp_path / 'd' / 'frames', [10 * i for i in range(4)])
    (tmp_path / 'd' / 'frames' / '._0001.png').write_bytes(b'SECRET-TOKEN \x00\x05\x16\x07' * 64)
    jsonl = write_jsonl(tmp_path / 'd' / 'a.jsonl', [
        {'image': str(secret / 'id_rsa'), 'conversations': conv()}, {'image': 'a.png', 'conversations': conv()},
        {'video': str(secret / 'clip.mp4'), 'conversations': conv('<video>\nq', image=False)},
        {'video': 'frames', 'conversations': conv('<video>\nq', image=False)}])
    out = tmp_path / 'shards'
    assert main(['--data', jsonl, '--out', str(out), '--keep-order']) == 0
    printed = capsys.readouterr().out
    assert f'{jsonl}:1: corrupt_image: cannot read image header of {secret}/id_rsa' in printed, printed
    assert f'{jsonl}:3: corrupt_video: ' in printed, printed
    assert f"{jsonl}:4: corrupt_image: cannot read image header of {tmp_path}/d/frames/._0001.png" in printed, printed
    assert 'skipped 3' in printed, printed
    packed = [content for shard in sorted(out.glob('*.tar')) for _, _, content in tar_contents(shard)]
    assert len(packed) == 2 and not any(b'SECRET-TOKEN' in content for content in packed)


def tar_contents(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.size, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_any_number_of_workers_writes_the_same_full_shards(tmp_path, capsys, monkeypatch):
    """Every core writes: the samples are checked in parts, by processes of a pool, then the kept ones cut into
    shards that each process writes. 1 and 3 workers write the same shards, sample for sample, and every shard but
    the last is full although a quarter of the samples are skipped (a shard per part of the order would be short
    of its part's skips)."""
    from xtuner_plugins.cli import shard_dataset
    monkeypatch.setattr(shard_dataset, 'CHECK_PART', 7)   # several parts checked (the pool forks: it inherits this)
    pids = tmp_path / 'pids'
    real = shard_dataset.shard_sample

    def noted(ds, i, read=True):
        with open(pids, 'a') as f:
            f.write(f'{os.getpid()}\n')
        return real(ds, i, read)
    monkeypatch.setattr(shard_dataset, 'shard_sample', noted)
    data = spread_set(tmp_path)
    indexes = {}
    for workers in (1, 3):
        pids.write_text('')
        out = tmp_path / f'out{workers}'
        assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(out), '--samples-per-shard',
                     '4', '--workers', str(workers)]) == 0
        printed = capsys.readouterr().out
        assert printed.count('missing_image: image file not found') == 7 and "skipped 7 ({'missing_image': 7})" in \
            printed, printed
        indexes[workers] = read_index(str(out))
        seen = set(pids.read_text().split())   # the pools of the check and of the writing (started as needed)
        assert seen == {str(os.getpid())} if workers == 1 else (len(seen) >= 2 and str(os.getpid()) not in seen)
        assert sorted(os.listdir(out)) == [f'shard-{k:06d}.tar' for k in range(6)] + ['shards.json']
    assert [s['samples'] for s in indexes[1]['shards']] == [4, 4, 4, 4, 4, 3]
    assert indexes[1]['shards'] == indexes[3]['shards'] and indexes[1]['samples'] == 23
    for k in range(6):
        assert tar_contents(tmp_path / 'out1' / f'shard-{k:06d}.tar') == \
            tar_contents(tmp_path / 'out3' / f'shard-{k:06d}.tar')


def test_the_members_carry_no_pax_header(tmp_path, capsys):
    """webdataset's writer timed each member with a float, which tarfile writes as a PAX header of its own: two
    more 512-byte blocks a file (1.5% of a set of 130 KB images) and a quarter of the writing time."""
    data = spread_set(tmp_path, 4)
    out = tmp_path / 'out'
    assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(out), '--workers', '1']) == 0
    with tarfile.open(out / 'shard-000000.tar') as tar:
        members = tar.getmembers()
    assert len(members) == 6 and all(m.pax_headers == {} for m in members)
    assert len({m.mtime for m in members}) == 1 and isinstance(members[0].mtime, int)
    blocks = sum(1 + (m.size + 511) // 512 for m in members)   # a header and the data's blocks, each
    assert (out / 'shard-000000.tar').stat().st_size == max(10240, -(-(blocks + 2) * 512 // 10240) * 10240)


def busy_run(tmp_path):
    """``shard_dataset --workers 2`` in its own process group, each sample slowed to 50 ms, the check's parts on
    the pool too; returned once both workers are busy, with the file of the pids that took samples."""
    import subprocess
    import sys
    import textwrap
    import time

    from tests.train_utils import REPO_ROOT
    data = spread_set(tmp_path, 200)
    started = tmp_path / 'started'
    script = textwrap.dedent(f'''
        import os, sys, time
        from xtuner_plugins.cli import shard_dataset
        real = shard_dataset.shard_sample
        def slow(ds, i, read=True):
            with open({str(started)!r}, 'a') as f:
                f.write(f'{{os.getpid()}}\\n')
            time.sleep(0.05)
            return real(ds, i, read)
        shard_dataset.shard_sample = slow
        shard_dataset.CHECK_PART = 20
        sys.exit(shard_dataset.main(['--data', {data!r}, '--image-folder', {str(tmp_path / 'i')!r}, '--out',
                                     {str(tmp_path / 'out')!r}, '--workers', '2', '--samples-per-shard', '10']))
    ''')
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (started.exists() and len(set(started.read_text().split())) >= 2):   # both workers busy
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc, started


def test_ctrl_c_with_workers_is_the_one_line_and_leaves_no_process(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the tool says its one line, exit 130, and its pool's
    workers are gone. (Each busy worker could print a KeyboardInterrupt traceback under that line, depending on
    which process the signal woke first: tests/data/test_nodepass.py shows the worker ignores SIGINT.)"""
    import signal
    import time

    proc, started = busy_run(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert 'Traceback' not in err and err.endswith(
        'shard_dataset: error: stopped before any shard was written; nothing was '
        'written\n'), err
    assert not (tmp_path / 'out').exists()
    workers = {int(pid) for pid in started.read_text().split()}
    assert len(workers) == 2 and proc.pid not in workers
    time.sleep(0.5)
    for pid in workers:
        assert not os.path.exists(f'/proc/{pid}') or open(f'/proc/{pid}/stat').read().split()[2] == 'Z', pid


def test_shards_the_byte_limit_closes_are_planned_over_the_whole_order(tmp_path, capsys):
    """The byte limit is met as one writer meets it: shards were cut at each part of ``--samples-per-shard`` too,
    so a limit that closes shards at 6 samples of 10 gave 6, 4, 6, 4, ... (the sizes are summed in the check)."""
    from xtuner_plugins.cli.shard_dataset import plan_shards
    import numpy as np
    assert plan_shards(np.array([5, 5, 5, 5, 5, 5, 5]), 10, 12) == [(0, 3), (3, 6), (6, 7)]
    assert plan_shards(np.array([5, 5, 5, 5, 5]), 2, 10 ** 9) == [(0, 2), (2, 4), (4, 5)]
    assert plan_shards(np.array([50, 1, 1]), 10, 12) == [(0, 1), (1, 3)]   # a sample past the limit: alone
    assert plan_shards(np.zeros(0, dtype=np.int64), 10, 12) == []
    data = spread_set(tmp_path, 40)
    per_sample = None
    for workers in (1, 2):
        out = tmp_path / f'out{workers}'
        assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(out), '--samples-per-shard',
                     '10', '--max-shard-bytes', '1', '--workers', str(workers)]) == 0
        index = read_index(str(out))
        assert [s['samples'] for s in index['shards']] == [1] * 30   # every sample past 1 byte: one a shard
        per_sample = index['shards'][0]['bytes']
    capsys.readouterr()
    limit = 6 * (per_sample - 1024) // 5   # about six samples' data a shard
    counts = {}
    for workers in (1, 3):
        out = tmp_path / f'limited{workers}'
        assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(out), '--samples-per-shard',
                     '10', '--max-shard-bytes', str(limit), '--workers', str(workers)]) == 0
        counts[workers] = [s['samples'] for s in read_index(str(out))['shards']]
    assert counts[1] == counts[3] and len(set(counts[1][:-1])) == 1 and 1 < counts[1][0] < 10, counts


def test_a_worker_that_dies_ends_the_run_in_one_line(tmp_path):
    """A pool worker killed (the OOM killer) left ``Pool.imap`` waiting forever for its part: the tool hung."""
    import signal
    import subprocess

    proc, started = busy_run(tmp_path)
    os.kill(int(started.read_text().split()[0]), signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError('the tool hung after one of its workers was killed')
    assert proc.returncode == 1, err
    assert err == ('shard_dataset: error: failed: checking the samples: one of its 2 processes ended abruptly '
                   '(killed: out of memory? see dmesg) (before any shard was written); nothing was written\n'), err


def test_a_shard_closed_after_an_error_prints_nothing_when_collected(tmp_path):
    """A full disk: the tar stream and its file, left to the garbage collector, each printed ``Exception ignored
    ... No space left on device`` under the tool's one line (once a worker)."""
    import errno
    import gc
    import sys

    from xtuner_plugins.cli import shard_entries
    unraisable = []
    before, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        shards = shard_entries.Shard(str(tmp_path), 'x.tar.part', 0)
        shards.write({'__key__': 'k', 'json': b'{}', 'img0.png': b'x' * 100})
        raw = shards.writer.own_fileobj

        def full(*args):
            raise OSError(errno.ENOSPC, 'No space left on device')
        raw.write = raw.flush = full
        shards.abort()
        del shards, raw
        gc.collect()
    finally:
        sys.unraisablehook = before
    assert unraisable == []


def test_show_below_zero_is_refused_and_workers_past_the_cores_said(tmp_path, capsys):
    from xtuner_plugins.data.nodepass import default_workers
    data = spread_set(tmp_path, 4)
    assert main(['--data', data, '--out', str(tmp_path / 'o'), '--show', '-1']) == 2
    assert capsys.readouterr().err.endswith('--show -1: give 0 (every problem) or more\n')
    many = default_workers() + 1
    assert main(['--data', data, '--image-folder', str(tmp_path / 'i'), '--out', str(tmp_path / 'o'), '--workers',
                 str(many)]) == 0
    assert f'--workers {many} is more than the {default_workers()} cores this process may use' in \
        capsys.readouterr().err
