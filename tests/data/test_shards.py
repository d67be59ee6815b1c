"""Tar shards (data/shards.py, written by cli/shard_dataset.py): the same items as the annotation they came from,
disjoint and complete parts across ranks x workers, an exact mid-epoch resume, and check_shards."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.shards import ShardDataset, check_shards, read_index, shard_units
from xtuner_plugins.data.streaming import stream_collate_fn
from xtuner_plugins.engine.streamstate import StreamStateHook


@pytest.fixture(scope='module')
def data(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('shards')
    for k in range(4):
        write_image(root / 'i' / f'{k}.png', size=(28 * (k + 1), 28 + 14 * k), seed=k)
    (root / 'i' / 'bad.png').write_bytes(b'not an image')
    a = [{'image': f'{i % 4}.png', 'conversations': conv(answer='A' * (1 + i))} for i in range(9)]
    a[3] = {'image': 'gone.png', 'conversations': conv()}  # skipped by the writer, named
    b = [{'image': ['0.png', '2.png'], 'conversations': conv(question='<image>\n<image>\ntwo?', image=False)},
         {'conversations': conv(answer='text only', image=False)}, {'image': 'bad.png', 'conversations': conv()}]
    files = [write_jsonl(root / 'a.jsonl', a), write_jsonl(root / 'b.jsonl', b)]
    settings = dict(tokenizer=tiny_tokenizer, image_size=28, max_dynamic_patch=4, max_bad_fraction=1)
    source = InternVLDataset(files, image_folders=str(root / 'i'), repeat_times=[1, 2], **settings)
    skipped = write_shards(source, str(root / 'out'), samples_per_shard=3, max_shard_bytes=1 << 20)
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
