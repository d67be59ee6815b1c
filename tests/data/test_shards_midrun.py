"""Shards that change under a running stream (data/shard_index.py's read_shard): a shard removed, or written over
by another shard job, after start-up checked it, stops the stream in one line naming it (a ``Stated`` error,
printed without a traceback), never read as if it were the shard ``shards.json`` describes."""

import os
import re
import shutil

import pytest

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.shards import ShardDataset
from xtuner_plugins.errors import Stated


@pytest.fixture
def shards(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / '0.png', size=(56, 28))
    samples = [{'image': '0.png', 'conversations': conv(answer=f'answer {i}')} for i in range(6)]
    settings = dict(tokenizer=tiny_tokenizer, image_size=28, max_dynamic_patch=4, max_bad_fraction=1)
    source = InternVLDataset(write_jsonl(tmp_path / 'a.jsonl', samples), image_folders=str(tmp_path / 'i'),
                             cache_dir=str(tmp_path / 'cache'), **settings)
    write_shards(source, str(tmp_path / 'out'), samples_per_shard=2, max_shard_bytes=1 << 20)
    more = InternVLDataset(write_jsonl(tmp_path / 'b.jsonl', samples * 2), image_folders=str(tmp_path / 'i'),
                           cache_dir=str(tmp_path / 'cache'), **settings)
    write_shards(more, str(tmp_path / 'other'), samples_per_shard=3, max_shard_bytes=1 << 20)
    return ShardDataset(str(tmp_path / 'out'), settings, shuffle=False, rank=0, world_size=1), tmp_path


def take(ds, n):
    stream = iter(ds)
    return [next(stream)['samples'][0] for _ in range(n)]


def test_a_shard_removed_after_start_up_is_one_line(shards):
    ds, root = shards
    assert len(take(ds, 6)) == 6
    os.remove(root / 'out' / 'shard-000001.tar')
    with pytest.raises(Stated) as err:
        take(ds, 6)
    assert str(err.value) == (f'{root}/out/shard-000001.tar: no longer there: removed or renamed after the run '
                              f'started (its shards.json lists it); write the shard set again with '
                              f'tools/shard_dataset.py, or put it back')


def test_a_shard_written_over_by_another_shard_job_is_not_read_as_the_one_listed(shards):
    """Another job's shard-000001.tar (3 samples, not 2) in its place: its samples would be read as this set's."""
    ds, root = shards
    listed = os.path.getsize(root / 'out' / 'shard-000001.tar')
    shutil.copy(root / 'other' / 'shard-000001.tar', root / 'out' / 'shard-000001.tar')
    with pytest.raises(Stated) as err:
        take(ds, 6)
    now = os.path.getsize(root / 'out' / 'shard-000001.tar')
    assert str(err.value) == (f'{root}/out/shard-000001.tar: {now} bytes, shards.json says {listed}: written over '
                              f'or cut after the run started (another shard job writing into this folder?); write '
                              f'the shard set again with tools/shard_dataset.py, into a new folder')


def test_a_shard_cut_while_read_is_a_stated_error(shards):
    ds, root = shards
    path = root / 'out' / 'shard-000002.tar'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    ds.sizes[2] = None  # as an older shards.json without sizes, cut before start-up: the tar's own end says it
    ds.stamps[2] = None
    with pytest.raises(Stated, match=r'shard-000002.tar: (the tar cannot be read after its \d samples .*|the tar ends '
                                     r'after \d of its 2 samples: truncated|a member \S+ claims \d+ bytes from byte '
                                     r'\d+, past the end of the shard)'):
        take(ds, 6)


def test_a_set_of_many_shards_is_checked_with_two_file_system_calls_a_shard(tmp_path, monkeypatch):
    """Start-up checks every shard on every rank: with 100,000 shards on Lustre each call counts (it took ~8
    calls a shard: realpath's lstat of every folder above it, commonpath, isfile, getsize; 7.8 s here for 100k)."""
    import json

    from xtuner_plugins.data import shard_index
    names = [f'shard-{k:06d}.tar' for k in range(50)]
    for name in names:
        (tmp_path / name).write_bytes(b'x' * 10)
    (tmp_path / 'shards.json').write_text(json.dumps(dict(
        format=shard_index.FORMAT, samples=50, skipped={}, sources=[dict(annotation='/a.jsonl')],
        shards=[dict(file=name, samples=1, bytes=10) for name in names])))
    calls = []
    for name in ('stat', 'lstat'):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    assert shard_index.read_index(str(tmp_path))['samples'] == 50
    assert len(calls) <= 2 * 50 + 10, len(calls)


def same_size_other_shard(ds, root):
    """The same samples sharded with another seed: every shard of the same bytes, other samples in each; the
    listed and the other shard-000001.tar's entries."""
    import json
    source = InternVLDataset(str(root / 'a.jsonl'), image_folders=str(root / 'i'), cache_dir=str(root / 'cache'),
                             tokenizer=ds.samples.tokenizer, image_size=28, max_dynamic_patch=4)
    write_shards(source, str(root / 'seed1'), samples_per_shard=2, max_shard_bytes=1 << 20, seed=1)
    listed = json.loads((root / 'out' / 'shards.json').read_text())['shards'][1]
    other = json.loads((root / 'seed1' / 'shards.json').read_text())['shards'][1]
    assert other['bytes'] == listed['bytes'] and other['digest'] != listed['digest']
    return listed, other


@pytest.mark.parametrize('recorded', ['first', 'digest only'])
def test_a_shard_of_the_same_size_put_in_its_place_before_start_up_is_refused_at_its_first_sample(shards, recorded):
    """Sizes alone were compared: its samples were read as the listed ones (some twice, others never), by training
    and check_dataset alike. The digest of its first sample's record (``first``) is compared before any of its
    samples is used; a set written before it was recorded, by the digest of all, once the shard is read through
    (a helper's sweep: 25 iterations trained on a foreign shard first)."""
    import json

    from xtuner_plugins.data.shard_check import check_shards
    ds, root = shards
    listed, other = same_size_other_shard(ds, root)
    shutil.copy(root / 'seed1' / 'shard-000001.tar', root / 'out' / 'shard-000001.tar')
    if recorded == 'first':
        said = (rf"^{root}/out/shard-000001.tar: its first sample is not the one shards.json records \(its digest "
                rf"{other['first']}, recorded {listed['first']}\): another shard of the same size put in its place")
    else:
        index = json.loads((root / 'out' / 'shards.json').read_text())
        for shard in index['shards']:
            del shard['first']
        (root / 'out' / 'shards.json').write_text(json.dumps(index))
        said = (rf"^{root}/out/shard-000001.tar: its samples are not the ones shards.json records \(their digest "
                rf"{other['digest']}, recorded {listed['digest']}\): another shard of the same size put in its place")
    started = ShardDataset(str(root / 'out'), dict(tokenizer=ds.samples.tokenizer, image_size=28,
                                                   max_dynamic_patch=4, max_bad_fraction=1), shuffle=False, rank=0,
                           world_size=1)
    stream, given = iter(started), []
    with pytest.raises(Stated, match=said):
        while True:
            given.append(next(stream)['samples'][0])
    assert len(given) == (2 if recorded == 'first' else 4)   # shard 0's two; then shard 1's too, read through
    with pytest.raises(Stated, match=said):
        check_shards(str(root / 'out'))


@pytest.mark.parametrize('how', ['written over', 'another file put in its place'])
def test_a_shard_of_the_same_size_put_in_its_place_after_start_up_is_refused_before_its_first_sample(shards, how):
    """After start-up (another shard job writing into the folder): met only at the shard's end, its samples
    trained on by then; now the stream stops as the shard is opened, before any of its samples, whether the file
    was written over (``cp``: the same inode, a new modification time) or another renamed over it (``mv``)."""
    ds, root = shards
    same_size_other_shard(ds, root)
    path = root / 'out' / 'shard-000001.tar'
    if how == 'written over':
        shutil.copy(root / 'seed1' / 'shard-000001.tar', path)
    else:
        shutil.copy2(root / 'seed1' / 'shard-000001.tar', root / 'out' / 'new.tmp')
        os.replace(root / 'out' / 'new.tmp', path)
    stream, given = iter(ds), []
    with pytest.raises(Stated) as err:
        for _ in range(6):
            given.append(next(stream)['samples'][0])
    assert len(given) == 2   # shard-000000's, none of shard-000001's
    assert re.fullmatch(rf'{root}/out/shard-000001.tar: {how} after the run started, at the same size \(\d+ bytes; '
                        r'modified \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\): its samples may not be the ones '
                        r'shards.json lists \(another shard job writing into this folder\?\); write the shard set '
                        r'again with tools/shard_dataset.py, into a new folder, or start the run again if the shard '
                        r'is the same', str(err.value)), str(err.value)
    ds.sizes[1] = None   # an older shards.json, without sizes: the same
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(Stated, match=rf'^{root}/out/shard-000001.tar: (written over|another file put in its place) '
                                     rf'after the run started, \d+ bytes, \d+ when it started \(cut or grown; '):
        take(ds, 6)


def edit_index(root, edit):
    import json
    path = root / 'out' / 'shards.json'
    index = json.loads(path.read_text())
    edit(index)
    index['samples'] = sum(s['samples'] for s in index['shards'])
    path.write_text(json.dumps(index))


def test_a_shard_listed_twice_is_refused(shards):
    """The list's total raised to match: each of its samples was read twice, the set counted 8 samples for 6."""
    ds, root = shards
    edit_index(root, lambda index: index['shards'].append(dict(index['shards'][0])))
    with pytest.raises(ValueError, match=r"shards\[3\].file 'shard-000000.tar' is listed before, as shards\[0\]: its "
                                         r"samples would be read twice"):
        ShardDataset(str(root / 'out'), dict(tokenizer=ds.samples.tokenizer, image_size=28))


def test_a_shard_holding_more_samples_than_listed_is_one_line(shards):
    """shards.json says 1 sample where the tar holds 2: the count (and the split among reading units) was off."""
    ds, root = shards
    edit_index(root, lambda index: index['shards'][0].update(samples=1))
    ds = ShardDataset(str(root / 'out'), dict(tokenizer=ds.samples.tokenizer, image_size=28), shuffle=False,
                      rank=0, world_size=1)
    with pytest.raises(Stated, match=r'shard-000000.tar: the tar holds more than the 1 samples shards.json says'):
        take(ds, 6)


def test_a_tar_read_error_is_said_in_words():
    """webdataset adds the stream and the URL to an error's args: the line showed the tuple
    ``(('unexpected end of data', <_io.BufferedReader name=...>, 'PATH'))``."""
    import io
    import tarfile

    from xtuner_plugins.data.shard_index import _reason
    stream = io.BufferedReader(io.BytesIO(b''))
    assert _reason(tarfile.ReadError('unexpected end of data', stream, '/s/shard-000000.tar')) == \
        'unexpected end of data'
    assert _reason(ValueError('bad header @ /s/shard-000000.tar')) == 'bad header'
    assert _reason(EOFError()) == 'EOFError'


@pytest.mark.parametrize('sparse', [True, False])
def test_a_member_that_would_expand_in_memory_is_refused_before_it_is_read(tmp_path, sparse):
    """A shard's member is read whole: a GNU sparse member of a 10 KB tar claiming 1.2 GB took 3 GB of memory (a
    shard set from elsewhere, its shards.json written to match), and so would a compressed tar, which the writer
    never makes. Each is refused, naming the shard and the member, before anything is read."""
    import gzip
    import subprocess
    import tracemalloc

    from xtuner_plugins.data.shard_index import ShardDamaged, read_shard
    src, tar = tmp_path / 'src', tmp_path / 'shard-000000.tar'
    src.mkdir()
    (src / '000000000.json').write_text('{}')
    with open(src / '000000000.img0.jpg', 'wb') as f:
        f.truncate(300 << 20)   # 300 MB of holes
    subprocess.run(['tar', '--sparse', '--format=gnu', '-cf', str(tar), '000000000.json', '000000000.img0.jpg'],
                   cwd=src, check=True)
    if not sparse:   # the same members, not sparse, compressed: 300 MB of zeros in a few hundred KB
        subprocess.run(['tar', '--format=gnu', '-cf', str(tmp_path / 'plain.tar'), '000000000.json',
                        '000000000.img0.jpg'], cwd=src, check=True)
        with open(tmp_path / 'plain.tar', 'rb') as f, gzip.open(tar, 'wb') as out:
            shutil.copyfileobj(f, out)
    size = os.path.getsize(tar)
    assert size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ShardDamaged) as said:
            list(read_shard(str(tar), size=size))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak   # nothing expanded
    if sparse:
        assert str(said.value) == (f"{tar}: a sparse member '000000000.img0.jpg' claims {300 << 20} bytes, and the "
                                   f'shard holds {size}: not what the writer makes (read whole, it would expand in '
                                   'memory); write the shard set again with tools/shard_dataset.py')
    else:
        assert str(said.value).startswith(f'{tar}: the tar cannot be read after its 0 samples ('), said.value


def _tar(path, members):
    """A tar of ``members`` (name, bytes), as a shard of them; its size."""
    import io
    import tarfile
    with tarfile.open(path, 'w') as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def test_a_member_named_as_a_path_or_claiming_bytes_past_the_end_is_named_for_what_it_is(tmp_path):
    """A member ``../000000000.img0.jpg`` was read as a sample of key ``../000000000`` (its other members renamed
    alike: trained without a word), or, alone, refused as 'no ../x.json (the sample's annotation) in the shard'; a
    member whose header claims bytes past the shard's end was 'cannot be read ... (unexpected end of data)', naming
    no member (or, claiming more than the whole shard, 'it would expand in memory', which it would not)."""
    from xtuner_plugins.data.shard_index import ShardDamaged, read_shard
    shard = tmp_path / 'shard-000000.tar'
    size = _tar(shard, [('000000000.json', b'{}'), ('../000000000.img0.jpg', b'x' * 10)])
    with pytest.raises(ShardDamaged) as said:
        list(read_shard(str(shard), size=size))
    assert str(said.value) == (f"{shard}: a member named '../000000000.img0.jpg', a path: the writer names each "
                               'member KEY.FIELD at the top of the tar (000000042.json, 000000042.img0.jpg); the '
                               'shard is not read past it; write the shard set again with tools/shard_dataset.py')
    size = _tar(shard, [('000000000.json', b'{}'), ('000000000.img0.jpg', b'x' * 3000)])
    raw = bytearray(shard.read_bytes())
    import tarfile
    with tarfile.open(shard) as tar:
        member = tar.getmember('000000000.img0.jpg')
    for claim in (size - member.offset_data + 1, 10 * size):   # a byte past the end of the shard; past the shard
        header = tarfile.TarInfo(member.name)
        header.size, header.mtime, header.mode = claim, member.mtime, member.mode
        raw[member.offset:member.offset_data] = header.tobuf()
        shard.write_bytes(raw)
        with pytest.raises(ShardDamaged) as said:
            list(read_shard(str(shard), size=size))
        assert str(said.value) == (f"{shard}: a member '000000000.img0.jpg' claims {claim} bytes from byte "
                                   f'{member.offset_data}, past the end of the shard ({size} bytes): its header is '
                                   'damaged, or the shard was cut after it was written; write the shard set again '
                                   'with tools/shard_dataset.py'), said.value
