"""Shards that do not divide among the reading units (ranks x DataLoader workers): under ``max_epochs`` each epoch
reads the rank's even share from parts of unequal sizes, leaving samples unread and reading as many twice; start-up
says so with the numbers (data/shards.py's balance_note, from engine/streamstate.py's StreamStateHook)."""

from types import SimpleNamespace

import pytest

from tests.helpers import conv, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.shards import ShardDataset, balance_note
from xtuner_plugins.engine import streamstate
from xtuner_plugins.engine.streamstate import StreamStateHook


@pytest.fixture(scope='module')
def sets(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('balance')
    settings = dict(tokenizer=tiny_tokenizer, image_size=28, max_bad_fraction=1)

    def shard_set(name, shards):
        path = write_jsonl(root / f'{name}.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)}
                                                    for i in range(20 * shards)])
        source = InternVLDataset(path, cache_dir=str(root / 'cache'), **settings)
        write_shards(source, str(root / name), samples_per_shard=20, max_shard_bytes=1 << 30)
        return ShardDataset(str(root / name), settings, rank=0, world_size=8)
    return shard_set('nine', 9), shard_set('eight', 8)


def test_nine_shards_over_eight_units_are_said_with_what_an_epoch_misses(sets):
    nine, eight = sets
    assert sorted(nine.epoch_parts(8)) == [20] * 7 + [40] and sum(nine.epoch_parts(8)) == 180
    note = balance_note(nine, world=8, workers=1)
    assert note == (f'the 9 shards of {nine.folder} do not divide evenly among the 8 reading units (8 ranks x 1 '
                    f'DataLoader workers): their parts hold 20 to 40 samples, an epoch reads 22 a unit, so each epoch '
                    f'leaves about 18 samples unread and reads as many twice; write the shards again with a number of '
                    f'shards that is a multiple of 8 (tools/shard_dataset.py --samples-per-shard), or train for '
                    f'max_iters (an endless stream)')
    assert balance_note(eight, world=8, workers=1) is None and balance_note(eight, world=2, workers=2) is None
    assert balance_note(nine, world=3, workers=1) is None  # 3 shards a unit


def test_the_hook_says_it_under_max_epochs_only(sets, monkeypatch):
    nine, _ = sets
    said = []
    monkeypatch.setattr(streamstate, 'print_log', lambda msg, **kw: said.append(msg))
    monkeypatch.setattr('mmengine.dist.get_world_size', lambda *a: 8)

    def runner(train_cfg):
        loop = SimpleNamespace(dataloader=SimpleNamespace(dataset=nine, num_workers=0))
        return SimpleNamespace(cfg={'train_cfg': train_cfg}, train_loop=loop)
    StreamStateHook().before_run(runner({'max_iters': 100}))
    assert said == []
    StreamStateHook().before_run(runner({'max_epochs': 2}))
    assert len(said) == 1 and said[0].startswith('the 9 shards of ')
