"""Every rank reads the same data (engine/dataagree.py): ranks whose data sets differ (a node's own older copy of the
data) are stopped at start-up in one line, not left to split different data or to hang at an epoch's end."""

import os
import shutil

from types import SimpleNamespace

import pytest

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.engine import dataagree
from xtuner_plugins.engine.checks import ModelDataCheckHook
from xtuner_plugins.engine.dataagree import check_ranks_agree, data_fingerprint, disagreement


def dataset(tmp_path, path, tokenizer, folder='i', bad=0.01):
    ds = InternVLDataset(str(path), image_folders=str(tmp_path / folder), tokenizer=tokenizer, image_size=28,
                         max_dynamic_patch=4, cache_dir=str(tmp_path / 'cache'), max_bad_fraction=bad)
    ds.length_array  # noqa: B018  (the sampler computes the lengths before the check runs)
    return ds


@pytest.fixture
def files(tmp_path):
    write_image(tmp_path / 'i' / '0.png', size=(56, 28))
    samples = [{'image': '0.png', 'conversations': conv(answer=f'a{i}')} for i in range(40)]
    os.makedirs(tmp_path / 'node0')
    os.makedirs(tmp_path / 'node1')
    return (write_jsonl(tmp_path / 'node0' / 'a.jsonl', samples),
            write_jsonl(tmp_path / 'node1' / 'a.jsonl', samples[:30]), samples)


def test_ranks_reading_copies_that_differ_are_named_with_their_hosts_and_counts(tmp_path, files, tiny_tokenizer):
    full, short, _ = files
    prints = [('node-a', data_fingerprint(dataset(tmp_path, full, tiny_tokenizer))),
              ('node-a', data_fingerprint(dataset(tmp_path, full, tiny_tokenizer))),
              ('node-b', data_fingerprint(dataset(tmp_path, short, tiny_tokenizer)))]
    assert disagreement(prints[:2]) is None
    said = disagreement(prints)
    assert said.startswith('the ranks do not read the same training data: rank 0 (on node-a) against rank 2 (on '
                           'node-b): 40 items against 30; ')
    assert f'{full}: {os.path.getsize(full)} bytes, 40 samples kept against {os.path.getsize(short)} bytes, 30 ' \
           f'samples kept (1 of 3 ranks differ from rank 0)' in said


def test_the_same_data_under_another_path_agrees_and_other_images_do_not(tmp_path, files, tiny_tokenizer):
    full, _, samples = files
    copy = shutil.copy(full, tmp_path / 'node1' / 'copy.jsonl')
    first = data_fingerprint(dataset(tmp_path, full, tiny_tokenizer))
    assert disagreement([('a', first), ('b', data_fingerprint(dataset(tmp_path, copy, tiny_tokenizer)))]) is None
    write_image(tmp_path / 'j' / '0.png', size=(280, 28))  # node b's image folder: the same names, other images
    other = data_fingerprint(dataset(tmp_path, copy, tiny_tokenizer, folder='j'))
    assert 'the same samples, other lengths (their images differ' in disagreement([('a', first), ('b', other)])


def test_a_sample_refused_on_one_node_only_is_named(tmp_path, files, tiny_tokenizer):
    """Copies of one size and count, another sample refused in each (its turns swapped: bad_conversation)."""
    *_, samples = files
    copies = []
    for k, bad in enumerate((5, 6)):
        edited = [dict(s) for s in samples]
        edited[bad]['conversations'] = edited[bad]['conversations'][::-1]
        copies.append(write_jsonl(tmp_path / f'node{k}' / 'b.jsonl', edited))
    a, b = (data_fingerprint(dataset(tmp_path, p, tiny_tokenizer, bad=1)) for p in copies)
    assert os.path.getsize(copies[0]) == os.path.getsize(copies[1]) and a['items'] == b['items'] == 39
    assert f'{copies[0]}: the same size and count, other lines kept (a sample refused on one, not the other)' in \
        disagreement([('a', a), ('b', b)])


def test_every_rank_stops_with_one_line_on_rank_0(tmp_path, files, tiny_tokenizer, monkeypatch, capsys):
    from mmengine import dist
    full, short, _ = files
    theirs = data_fingerprint(dataset(tmp_path, short, tiny_tokenizer))
    monkeypatch.setattr(dist, 'get_world_size', lambda *a: 2)
    monkeypatch.setattr(dist, 'all_gather_object', lambda mine: [mine, ('node-b', theirs)])
    monkeypatch.setenv('RANK', '0')
    mine = dataset(tmp_path, full, tiny_tokenizer)
    runner = SimpleNamespace(model=None, _train_loop=SimpleNamespace(dataloader=SimpleNamespace(dataset=mine)))
    with pytest.raises(SystemExit) as stop:
        ModelDataCheckHook().before_run(runner)  # in every stage config's custom_hooks
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('train: refused: the ranks do not read the same training data')
    monkeypatch.setattr(dist, 'all_gather_object', lambda mine: [mine, mine])
    check_ranks_agree(mine)  # agreeing ranks go on


def test_shard_sets_compare_their_samples_shards_and_bytes():
    a = dict(items=10, shards=[4, 20, 4000])
    b = dict(items=10, shards=[5, 25, 5000])
    assert 'shard set of 4 shards, 20 samples, 4000 bytes against 5, 25, 5000' in disagreement([('x', a), ('y', b)])
    assert dataagree.disagreement([('x', a), ('y', dict(a))]) is None


def test_a_stream_whose_ranks_read_shares_of_different_sizes_agrees(tmp_path, files, tiny_tokenizer):
    from xtuner_plugins.data.online_packing import OnlinePackedDataset
    full, *_ = files
    with open(full, 'a') as f:
        f.write(open(full).readline())  # 41 samples: rank 0 streams 21, rank 1 20
    ranks = [OnlinePackedDataset(dataset(tmp_path, full, tiny_tokenizer), max_tokens=512, rank=r, world_size=2)
             for r in (0, 1)]
    assert [len(r) for r in ranks] == [21, 20]
    assert disagreement([('a', data_fingerprint(ranks[0])), ('a', data_fingerprint(ranks[1]))]) is None
