"""Tar shards (data/shards.py, written by cli/shard_dataset.py): the same items as the annotation they came from,
disjoint and complete parts across ranks x workers, an exact mid-epoch resume, and check_shards."""

import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.errors import TooManyBadSamplesError
from xtuner_plugins.data.shard_check import check_shards
from xtuner_plugins.data.shards import ShardDataset, read_index, shard_units
from xtuner_plugins.data.streaming import epoch_order, stream_collate_fn
from xtuner_plugins.engine.streamstate import StreamStateHook


@pytest.fixture(scope='module')
def data(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('shards')
    for k in range(4):
        write_image(root / 'i' / f'{k}.png', size=(28 * (k + 1), 28 + 14 * k), seed=k)
    bad = write_image(root / 'i' / 'bad.png', size=(28, 28), seed=9)   # truncated: its header reads, its pixels not
    with open(bad, 'r+b') as f:
        f.truncate(60)
    a = [{'image': f'{i % 4}.png', 'conversations': conv(answer='A' * (1 + i))} for i in range(9)]
    a[3] = {'image': 'gone.png', 'conversations': conv()}  # skipped by the writer, named
    b = [{'image': ['0.png', '2.png'], 'conversations': conv(question='<image>\n<image>\ntwo?', image=False)},
         {'conversations': conv(answer='text only', image=False)}, {'image': 'bad.png', 'conversations': conv()}]
    files = [write_jsonl(root / 'a.jsonl', a), write_jsonl(root / 'b.jsonl', b)]
    settings = dict(tokenizer=tiny_tokenizer, image_size=28, max_dynamic_patch=4, max_bad_fraction=1)
    source = InternVLDataset(files, image_folders=str(root / 'i'), repeat_times=[1, 2], **settings)
    skipped = write_shards(source, str(root / 'out'), samples_per_shard=3, max_shard_bytes=1 << 20, seed=None)
    return SimpleNamespace(root=root, files=files, source=source, skipped=skipped, out=str(root / 'out'),
                           settings=settings)


def shard_ds(data, **kw):
    return ShardDataset(data.out, dict(data.settings), **dict(dict(shuffle=False, rank=0, world_size=1), **kw))


def test_the_shards_hold_the_annotations_samples_and_give_the_same_items(data):
    index = read_index(data.out)
    assert dict(data.skipped) == {'missing_image': 1} and index['skipped'] == {'missing_image': 1}
    assert index['samples'] == len(data.source) - 1 == 14 and [s['samples'] for s in index['shards']] == [3] * 4 + [2]
    src = data.source
    records = [src.record_at(i) for i in range(len(src))]
    bad = {f'{data.files[0]}:4', f'{data.files[1]}:3'}  # the missing image (not sharded), the corrupt one
    expected = [src.load_sample(r) for r in records if src.where(r) not in bad]
    got = [item for _, item in zip(range(len(expected)), shard_ds(data))]
    assert [x['samples'] for x in got] == [x['samples'] for x in expected]
    for x, y in zip(got, expected):
        for key in ('input_ids', 'labels', 'pixel_values', 'image_flags'):
            assert torch.equal(x[key], y[key]), (x['samples'], key)
    assert any(x['skipped'] and x['skipped'][0][1] == 'corrupt_image' for x in got)


@pytest.mark.parametrize('ranks,workers', [(2, 2), (3, 3)])  # 5 shards for 4 units, and for 9 (shared shards)
def test_units_read_disjoint_parts_that_cover_the_shards(data, ranks, workers):
    ds, units = shard_ds(data, shuffle=True), ranks * workers
    seen = Counter()
    for unit in range(units):
        for state, _, record in ds.keyed_records(unit, units, None):
            if state['epoch'] > 0 or state['shard'] >= len(shard_units(5, unit, units)[0]):
                break
            seen[ds.samples.where(record)] += 1
    expected = Counter(data.source.where(data.source.record_at(i)) for i in range(len(data.source)) if i != 3)
    assert seen == expected


def test_resume_mid_epoch_gives_the_uninterrupted_items(data):
    def run(n, start=0, states=None):
        ds = shard_ds(data, shuffle=True)
        if states is not None:
            ds.resume_from(states, consumed=start)
        return [b for _, b in zip(range(n), DataLoader(ds, batch_size=2, num_workers=2, collate_fn=stream_collate_fn))]
    whole = run(11)
    hook = StreamStateHook()
    for b in run(5):
        hook.before_train_iter(None, 0, b)
    resumed = run(6, start=5, states=hook.states)
    assert [b['data']['samples'] for b in resumed] == [b['data']['samples'] for b in whole[5:]]
    assert all(torch.equal(a['data']['input_ids'], b['data']['input_ids']) for a, b in zip(resumed, whole[5:]))
    assert len(ds_samples := [s for b in whole for s in b['data']['samples']]) > 14 and len(set(ds_samples)) < 14


def test_check_shards_reports_as_check_dataset(data):
    report = check_shards(data.out, **{k: v for k, v in data.settings.items() if k != 'max_bad_fraction'})
    a, b = (str(p) for p in data.files)
    assert report['stats'][a]['samples'] == 8 and report['stats'][b]['samples'] == 6
    assert report['stats'][b]['images corrupt image'] == 2 and report['stats'][b]['dropped (corrupt image)'] == 2
    assert [(p.reason, p.source) for p in report['problems']] == [('corrupt_image', f'{b}:3')] * 2
    assert report['stats'][a]['kept'] == 8 and len(report['lengths'][a]) == 8
    assert report['skipped'] == {'missing_image': 1}


def shard_set_copy(data, tmp_path, edit=None, links=False):
    """The shard set copied to ``tmp_path/set`` (its shards as symbolic links to the originals with ``links``),
    ``edit(index)`` changing its ``shards.json`` (or ``edit`` its text)."""
    folder = tmp_path / 'set'
    folder.mkdir()
    index = read_index(data.out)
    for shard in index['shards']:
        source = os.path.join(data.out, shard['file'])
        os.symlink(source, folder / shard['file']) if links else shutil.copy(source, folder / shard['file'])
    if callable(edit):
        edit(index)
    (folder / 'shards.json').write_text(edit if isinstance(edit, str) else json.dumps(index))
    return str(folder)


def outside(data, tmp_path, absolute):
    """Shard 0 named by a path out of the set's folder, where a copy of it lies."""
    (tmp_path / 'elsewhere').mkdir()
    shutil.copy(f'{data.out}/shard-000000.tar', tmp_path / 'elsewhere' / 'x.tar')
    name = str(tmp_path / 'elsewhere' / 'x.tar') if absolute else '../elsewhere/x.tar'
    return lambda index: index['shards'][0].update(file=name)


@pytest.mark.parametrize('case,edit,message', [
    ('no shards', lambda index: index.pop('shards'),
     '"shards" is missing, expected a non-empty list of {"file", "samples", "bytes"}'),
    ('shards a string', lambda index: index.update(shards='shard-000000.tar'),
     '"shards" is a str \'shard-000000.tar\', expected a non-empty list'),
    ('a shard a string', lambda index: index['shards'].__setitem__(1, 'shard-000001.tar'),
     'shards[1] is a str, expected {"file", "samples", "bytes"}'),
    ('samples a string', lambda index: index['shards'][2].update(samples='3'),
     'shards[2] (shard-000002.tar): samples \'3\', bytes'),
    ('no file', lambda index: index['shards'][0].pop('file'), 'shards[0].file is None, expected the name of a tar'),
    ('no sources', lambda index: index.pop('sources'), '"sources" is missing, expected a non-empty list'),
    ('samples not adding up', lambda index: index.update(samples=99), 'samples 99, but its 5 shards hold 14'),
    ('not an object', '[1, 2]',
     'not a JSON object but a list; write the shard set again with tools/shard_dataset.py'),
    ('not JSON', '{"format": "xtuner-plugins-shards/1", "shards": [',
     'not valid JSON (line 1, column 50: Expecting value); write the shard set again'),
])
def test_a_malformed_shards_json_is_one_line_naming_it_and_the_key(data, tmp_path, case, edit, message):
    """A shards.json missing a key or with one of the wrong kind stops start-up in one line naming the file and
    the key (a KeyError or a TypeError before)."""
    folder = shard_set_copy(data, tmp_path, edit)
    with pytest.raises(ValueError) as err:
        read_index(folder)
    assert str(err.value).startswith(f'{folder}/shards.json: {message}'), str(err.value)
    assert str(err.value).endswith('write the shard set again with tools/shard_dataset.py')


@pytest.mark.parametrize('absolute', [False, True], ids=['dotdot', 'absolute'])
def test_a_shard_named_outside_the_folder_is_refused_unread(data, tmp_path, absolute):
    folder = shard_set_copy(data, tmp_path, outside(data, tmp_path, absolute))
    with pytest.raises(ValueError) as err:
        ShardDataset(folder, dict(data.settings, allow_links_outside=True), shuffle=False, rank=0, world_size=1)
    name = f'{tmp_path}/elsewhere/x.tar' if absolute else '../elsewhere/x.tar'
    assert str(err.value) == (f'{folder}/shards.json: shards[0].file {name!r} leads outside the shard set\'s folder '
                              f'{folder} (to {tmp_path}/elsewhere/x.tar): not read; write the shard set again with '
                              f'tools/shard_dataset.py')


def test_a_shard_linked_out_of_the_folder_is_refused_unless_links_are_allowed(data, tmp_path):
    folder = shard_set_copy(data, tmp_path, links=True)
    with pytest.raises(ValueError) as err:
        shard_ds(SimpleNamespace(**dict(vars(data), out=folder)))
    assert str(err.value) == (f'{folder}/shards.json: shards[0].file \'shard-000000.tar\' is a symbolic link to '
                              f'{data.out}/shard-000000.tar, outside the shard set\'s folder {folder}: not read (set '
                              f'the data set\'s allow_links_outside=True to allow it)')
    with pytest.raises(ValueError, match='is a symbolic link to'):
        check_shards(folder, **{k: v for k, v in data.settings.items() if k != 'max_bad_fraction'})
    ds = ShardDataset(folder, dict(data.settings, allow_links_outside=True), shuffle=False, rank=0, world_size=1)
    assert len([item for _, item in zip(range(3), ds)]) == 3  # the data set's opt-in, as for image folders


def broken_json(folder, change):
    """An edit for :func:`shard_set_copy` into ``folder``: its shard 0 written again, the first sample's
    ``KEY.json`` bytes ``change(bytes)``, the shard's size and digests in ``shards.json`` the new ones (only the
    member is wrong)."""
    from webdataset import TarWriter

    from xtuner_plugins.data.shards import read_shard

    def edit(index):
        path = os.path.join(folder, 'shard-000000.tar')
        samples = list(read_shard(path))
        samples[0]['json'] = change(samples[0]['json'])
        os.remove(path)  # the copy (never the original)
        with TarWriter(path, encoder=False) as writer:
            for sample in samples:
                writer.write({k: v for k, v in sample.items() if k == '__key__' or not k.startswith('_')})
        index['shards'][0]['bytes'] = os.path.getsize(path)
        index['shards'][0]['digest'] = records_digest(samples)   # as a writer of that member would record it
        index['shards'][0]['first'] = records_digest(samples[:1])
    return edit


def records_digest(samples):
    """A shard's ``digest`` in ``shards.json``: of its samples' ``KEY.json`` in order (the writer's)."""
    import hashlib
    return hashlib.sha1(b''.join(sample['json'] + b'\n' for sample in samples)).hexdigest()[:16]


def rewrite(**fields):
    """A change of a ``KEY.json``: its ``fields`` set (None: removed)."""
    def change(raw):
        meta = json.loads(raw)
        for key, value in fields.items():
            meta.pop(key) if value is None else meta.update({key: value})
        return json.dumps(meta).encode()
    return change


MEMBERS = "member names (not webdataset's __ fields)"


@pytest.mark.parametrize('case,change,message', [
    ('no images', rewrite(images=None), f'"images" is missing, expected a list of {MEMBERS}'),
    ('images a string', rewrite(images='img0.png'), f'"images" is \'img0.png\', expected a list of {MEMBERS}'),
    # webdataset's own fields are text: read as a path, they opened any local file as an image, frame or video
    ('images a webdataset field', rewrite(images=['__key__']),
     f'"images" is [\'__key__\'], expected a list of {MEMBERS}'),
    ('frames a webdataset field', rewrite(frames=['__url__']),
     f'"frames" is [\'__url__\'], expected a list of {MEMBERS}'),
    ('video a webdataset field', rewrite(video='__key__'), f'"video" is \'__key__\', expected one of the {MEMBERS}'),
    ('source out of range', rewrite(source=2),
     '"source" is 2, expected the number of one of shards.json\'s 2 sources (0..1)'),
    ('line a string', rewrite(line='1'), '"line" is \'1\', expected a line number'),
    ('sample a list', rewrite(sample=[1]), '"sample" is [1], expected an object (the annotation\'s sample)'),
    ('not an object', lambda raw: b'[1, 2]', 'is a JSON list, not an object'),
    ('not JSON', lambda raw: b'{"sample": ', 'is not JSON (Expecting value: line 1 column 12 (char 11))'),
])
def test_a_malformed_sample_json_is_a_bad_sample_named_by_its_shard_and_member(data, tmp_path, case, change,
                                                                               message):
    """A shard sample's KEY.json that is not the writer's is ``bad_shard_json``, named SHARD:KEY and counted as
    any bad sample: training skips it (and stops past max_bad_fraction), check_shards lists it (a KeyError,
    IndexError or JSONDecodeError stopped training before)."""
    folder = shard_set_copy(data, tmp_path, broken_json(tmp_path / 'set', change))
    tar, first = f'{folder}/shard-000000.tar', f'{data.files[0]}:1'
    ds = ShardDataset(folder, dict(data.settings), shuffle=False, rank=0, world_size=1)
    items = [item for _, item in zip(range(11), ds)]  # the 14 samples less this one and the corrupt image twice
    assert items[0]['skipped'] == [(f'{tar}:000000000', 'bad_shard_json')]
    assert first not in [s for x in items for s in x['samples']] and len({s for x in items for s in x['samples']}) == 9
    assert ds.samples.failures == Counter(bad_shard_json=1, corrupt_image=1)
    assert ds.samples.failed[f'{tar}:000000000'] == 'bad_shard_json'
    strict = ShardDataset(folder, dict(data.settings, max_bad_fraction=0), shuffle=False, rank=0, world_size=1)
    with pytest.raises(TooManyBadSamplesError, match=r"\{'bad_shard_json': 1\}"):
        next(iter(strict))
    report = check_shards(folder, **{k: v for k, v in data.settings.items() if k != 'max_bad_fraction'})
    bad = [p for p in report['problems'] if p.reason == 'bad_shard_json']
    assert [str(p) for p in bad] == [f'{tar}:000000000: member 000000000.json {message}: damaged; write the shard set '
                                     f'again with tools/shard_dataset.py [bad_shard_json]']
    assert report['stats'][tar] == {'samples': 1, 'dropped (bad shard json)': 1}
    assert report['stats'][str(data.files[0])]['samples'] == 7


def test_a_bad_image_in_a_shard_is_named_by_its_member(data):
    """An image member that does not decode was named '<12 bytes> ...' in the skip's message: its shard, key and
    member now, as check_shards names it."""
    from xtuner_plugins.data.errors import SampleError
    ds = shard_ds(data)
    said = []
    for (after, _, record) in ds.keyed_records(0, 1, None):
        if after['epoch']:   # one epoch: the stream goes on for ever
            break
        try:
            ds.samples.load_sample(record)
        except SampleError as err:
            said.append((err.reason, str(err)))
    assert [reason for reason, _ in said] == ['corrupt_image'] * 2, said   # b.jsonl's bad.png, repeated twice
    assert f'{data.out}/shard-' in said[0][1] and '.img0.png' in said[0][1] and 'bytes>' not in said[0][1], said


def test_a_state_saved_in_the_first_shard_order_finishes_its_epoch_in_it(data):
    """A checkpoint's stream state from before ``'order'`` (version 1) reads the rest of its epoch's shards in the
    order that epoch began in; the next epoch, and a new state, in today's (``streaming.epoch_order``)."""
    ds = shard_ds(data, shuffle=True, seed=3)
    mine = shard_units(5, 0, 1)[0]
    old, new = epoch_order(5, 3, 0, version=1), epoch_order(5, 3, 0)
    assert [old(p) for p in mine] != [new(p) for p in mine]

    def shards(state):
        read = []
        for after, (epoch, shard, _), _ in ds.keyed_records(0, 1, state):
            if after['epoch'] > 1 or len(read) > 30:
                return read
            if not read or read[-1][:2] != (epoch, shard):
                read.append((epoch, shard, after['order']))
    got = shards({'epoch': 0, 'shard': 1, 'sample': 0})
    assert got == [(0, old(p), 1) for p in mine[1:]] + [(1, epoch_order(5, 3, 1)(p), 2) for p in mine]
    assert shards(None)[:5] == [(0, new(p), 2) for p in mine]
