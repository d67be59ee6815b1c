"""Online packing (data/online_packing.py): packs from each reading unit's stream, disjoint and complete parts,
and an exact resume through StreamStateHook (engine/streamstate.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.online_packing import OnlinePackedDataset
from xtuner_plugins.data.streaming import epoch_order, stream_collate_fn, unit_part
from xtuner_plugins.engine.streamstate import StreamStateHook


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('online')
    for k in range(3):
        write_image(root / 'i' / f'{k}.png', size=(28 * (k + 1), 28), seed=k)
    samples = [{'image': f'{i % 3}.png', 'conversations': conv(answer='A' * (1 + i % 5))} for i in range(22)]
    samples += [{'conversations': conv(answer='text only', image=False)},
                {'image': 'gone.png', 'conversations': conv()}]
    return InternVLDataset(write_jsonl(root / 'd.jsonl', samples), image_folders=str(root / 'i'),
                           tokenizer=tiny_tokenizer, image_size=28, max_bad_fraction=1)


def packer(ds, **kw):
    return OnlinePackedDataset(ds, **dict(dict(max_tokens=450, max_tiles=8, max_buffer_size=3, seed=1), **kw))


def lines(batch):
    return tuple(batch['data']['samples'])


def test_parts_are_disjoint_and_complete():
    n, units = 23, 6
    order = epoch_order(n, seed=3, epoch=1)
    parts = [[order(p) for p in unit_part(n, u, units)] for u in range(units)]
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert epoch_order(n, 3, 1)(5) == order(5) and [epoch_order(n, 3, 2)(p) for p in range(n)] != \
        [order(p) for p in range(n)]


def test_ranks_and_workers_read_disjoint_parts_that_cover_the_data(dataset):
    """2 ranks x 2 workers, one sample per pack (max_tokens=1): each unit's first epoch is its own part, and the
    four parts hold every good sample once (the one with a missing image is skipped and counted)."""
    firsts = []
    for rank in range(2):
        loader = DataLoader(packer(dataset, rank=rank, world_size=2, max_tokens=1), batch_size=None, num_workers=2)
        items = [item for _, item in zip(range(16), loader)]
        for unit in (2 * rank, 2 * rank + 1):
            mine = [x for x in items if x['stream_state'][0] == unit]
            size = len(unit_part(len(dataset), unit, 4)) - sum(len(x['skipped']) for x in mine[:6])
            assert all(len(x['seq_lens']) == 1 for x in mine)
            firsts += [s for x in mine[:size] for s in x['samples']]
    gone = dataset.where(dataset.record_at(len(dataset) - 1))  # the last sample's image is missing
    assert sorted(firsts) == sorted({dataset.where(dataset.record_at(i)) for i in range(len(dataset))} - {gone})


def test_packs_keep_the_budgets(dataset):
    for _, item in zip(range(10), packer(dataset, rank=0, world_size=1)):
        assert len(item['seq_lens']) == 1 or (int(item['seq_lens'].sum()) <= 450 and item['num_tiles'] <= 8)
        assert int(item['seq_lens'].sum()) == item['input_ids'].shape[0] == item['position_ids'].shape[0]


def run(ds_factory, n, start=0, states=None, workers=2):
    ds = ds_factory()
    if states is not None:
        ds.resume_from(states, consumed=start)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=stream_collate_fn)
    return [b for _, b in zip(range(n), loader)]


def test_resume_mid_epoch_gives_the_uninterrupted_packs(dataset):
    """Stop after 5 batches (an odd number: the resumed workers rotate), resume from the hook's saved state: the
    next batches are the uninterrupted run's, item for item."""
    make = lambda: packer(dataset)  # noqa: E731
    whole = run(make, 12)
    hook = StreamStateHook()
    for b in run(make, 5):
        hook.before_train_iter(None, 0, b)
    checkpoint = {}
    loop = SimpleNamespace(dataloader=SimpleNamespace(num_workers=2, dataset=make()), iter=5)
    hook.after_train_iter(SimpleNamespace(train_loop=loop), 4)  # every rank's states, gathered (one rank here)
    hook.before_save_checkpoint(SimpleNamespace(train_loop=loop), checkpoint)
    assert checkpoint['stream_state']['workers'] == 2 and set(checkpoint['stream_state']['units']) == {0, 1}
    resumed = run(make, 7, start=5, states=checkpoint['stream_state']['units'])
    assert [lines(b) for b in resumed] == [lines(b) for b in whole[5:]]
    for a, b in zip(resumed, whole[5:]):
        assert torch.equal(a['data']['input_ids'], b['data']['input_ids'])
        assert torch.equal(a['data']['pixel_values'], b['data']['pixel_values'])
    assert len({s for b in whole for s in lines(b)}) > 12  # the run crosses into a second epoch


def test_max_epochs_is_refused_with_one_line(dataset, capsys):
    ds = packer(dataset, rank=1, world_size=2)
    assert len(ds) == len(dataset) // 2  # the samples rank 1 reads: an upper bound of its packs
    runner = SimpleNamespace(cfg={'train_cfg': {'max_epochs': 1}}, train_loop=SimpleNamespace(
        dataloader=SimpleNamespace(dataset=ds, num_workers=0)))
    with pytest.raises(SystemExit):
        StreamStateHook().before_run(runner)
    assert 'give the training length as max_iters=N' in capsys.readouterr().err
    runner.cfg['train_cfg'] = {'max_iters': 5}
    StreamStateHook().before_run(runner)


def test_a_resume_restarts_persistent_workers_with_the_saved_state(dataset):
    """The hook's restart of a loop's DataLoader (persistent workers, started before the checkpoint was loaded):
    MMEngine's replay of the 3 trained batches draws nothing, the next batches are the uninterrupted run's."""
    from mmengine.runner.loops import _InfiniteDataloaderIterator

    from xtuner_plugins.engine.streamstate import restart_loader
    whole = run(lambda: packer(dataset), 6)
    hook = StreamStateHook()
    for b in run(lambda: packer(dataset), 3):
        hook.before_train_iter(None, 0, b)
    loader = DataLoader(packer(dataset), batch_size=2, num_workers=2, collate_fn=stream_collate_fn,
                        persistent_workers=True)
    loop = SimpleNamespace(dataloader_iterator=_InfiniteDataloaderIterator(loader))
    next(loop.dataloader_iterator)  # workers started, from the data set's start
    loader.dataset.resume_from(hook.states, consumed=3)
    restart_loader(loop, loader, 3)
    assert [next(loop.dataloader_iterator) for _ in range(3)] == [None] * 3
    assert [lines(next(loop.dataloader_iterator)) for _ in range(3)] == [lines(b) for b in whole[3:]]


@pytest.fixture(scope='module')
def shards(dataset, tiny_tokenizer, tmp_path_factory):
    """The data set as 5 tar shards (the sample with a missing image is left out by the writer)."""
    from xtuner_plugins.cli.shard_dataset import write_shards
    out = str(tmp_path_factory.mktemp('online_shards') / 'out')
    assert write_shards(dataset, out, samples_per_shard=5, max_shard_bytes=1 << 20) == {'missing_image': 1}
    return out


def shard_packer(shards, tiny_tokenizer, **kw):
    from xtuner_plugins.data.shards import ShardDataset
    stream = ShardDataset(shards, dict(tokenizer=tiny_tokenizer, image_size=28, max_bad_fraction=1), seed=2,
                          rank=kw.get('rank', 0), world_size=kw.get('world_size', 1))
    return packer(stream, **kw)


def test_packs_over_shards_cover_the_shards_once_per_epoch(dataset, shards, tiny_tokenizer):
    """2 ranks x 2 workers over 5 shards, one sample per pack: the units' first-epoch packs are every sharded
    sample once."""
    seen = []
    for rank in range(2):
        loader = DataLoader(shard_packer(shards, tiny_tokenizer, rank=rank, world_size=2, max_tokens=1),
                            batch_size=None, num_workers=2)
        for _, item in zip(range(24), loader):
            if item['stream_state'][1]['epoch'] == 0:  # one sample per pack: the epoch it was read in
                seen += item['samples']
    gone = dataset.where(dataset.record_at(len(dataset) - 1))
    assert sorted(seen) == sorted(dataset.where(dataset.record_at(i)) for i in range(len(dataset) - 1))
    assert gone not in seen


def test_packs_over_shards_resume_mid_epoch_with_their_buffer(shards, tiny_tokenizer):
    """Stop after 5 batches with packs held in the buffers; the resumed units load them again from their shards
    and give the uninterrupted run's packs, item for item."""
    make = lambda: shard_packer(shards, tiny_tokenizer)  # noqa: E731
    whole = run(make, 12)
    hook = StreamStateHook()
    for b in run(make, 5):
        hook.before_train_iter(None, 0, b)
    assert any(state['buffer'] for state in hook.states.values())  # the resume has buffered samples to reload
    assert all(set(state) == {'epoch', 'shard', 'sample', 'order', 'buffer'} for state in hook.states.values())
    resumed = run(make, 7, start=5, states=hook.states)
    assert [lines(b) for b in resumed] == [lines(b) for b in whole[5:]]
    for a, b in zip(resumed, whole[5:]):
        assert torch.equal(a['data']['input_ids'], b['data']['input_ids'])
        assert torch.equal(a['data']['pixel_values'], b['data']['pixel_values'])
    assert len({s for b in whole for s in lines(b)}) > 12


def test_built_from_a_config_it_computes_no_lengths(tmp_path, tiny_tokenizer, monkeypatch):
    """Online packing never reads global lengths: the data set it builds from a config skips them in the start-up
    check's pass (what the length-grouped sampler and offline packing need), and nothing computes them later."""
    from xtuner_plugins.data import lengths
    write_image(tmp_path / 'i' / '0.png', size=(28, 28), seed=0)
    path = write_jsonl(tmp_path / 'd.jsonl', [{'image': '0.png', 'conversations': conv()}] * 4)
    monkeypatch.setattr(lengths, '_write_lengths', lambda *a, **k: pytest.fail('lengths computed'))
    packed = packer(dict(type=InternVLDataset, data_files=str(path), image_folders=str(tmp_path / 'i'),
                         tokenizer=tiny_tokenizer, image_size=28, cache_dir=str(tmp_path / 'cache')))
    assert packed.dataset.lengths_with_check is False
    assert len(next(iter(packed))['seq_lens']) == 3                           # it packs: 3 of 148 tokens in 450
