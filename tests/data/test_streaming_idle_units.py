"""A reading unit (a rank's DataLoader worker) with nothing it can use: fewer samples than units, or a part made only
of bad samples, waited for its next sample for ever at 100% CPU (a shard set of one sample and 2 workers; online
packing of one sample raised a worker's traceback at the first step). Start-up refuses the first in one line
(``streaming.empty_units``, from ``StreamStateHook``); a unit that reads a whole epoch without a sample it can use
stops with a stated error (``streaming.DryWatch``, ``NothingToRead``)."""

import signal
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from tests.helpers import conv, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.online_packing import OnlinePackedDataset
from xtuner_plugins.data.shards import ShardDataset
from xtuner_plugins.data.streaming import NothingToRead, empty_units
from xtuner_plugins.engine.streamstate import StreamStateHook


@contextmanager
def within(seconds):
    """Fails the test where the code under it would spin for ever."""
    def stop(*_):
        raise AssertionError(f'still reading after {seconds} s: a unit with nothing to read spins')
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope='module')
def data(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('idle')
    settings = dict(tokenizer=tiny_tokenizer, image_size=28, cache_dir=str(root / 'cache'))
    one = write_jsonl(root / 'one.jsonl', [{'conversations': conv('q', 'a', image=False)}])
    # a short sample (137 tokens), then one that 300 tokens cut (617; truncation='drop': a bad sample when read so)
    two = write_jsonl(root / 'two.jsonl', [{'conversations': conv('q', 'a', image=False)},
                                           {'conversations': conv('q', 'a long answer ' * 80, image=False)}])
    for name, path in (('one', one), ('two', two)):
        write_shards(InternVLDataset(path, **settings), str(root / name), samples_per_shard=20,
                     max_shard_bytes=1 << 30)
    return dict(root=root, settings=settings, one=one)


def runner(dataset, workers):
    loop = SimpleNamespace(dataloader=SimpleNamespace(dataset=dataset, num_workers=workers))
    return SimpleNamespace(cfg={'train_cfg': {'max_iters': 10}}, train_loop=loop)


def test_fewer_samples_than_reading_units_is_refused_at_start_up(data, capsys):
    shards = ShardDataset(str(data['root'] / 'one'), data['settings'], rank=0, world_size=1)
    folder = shards.folder
    assert shards.unit_parts(2) == [1, 0] and empty_units(shards, 1, 1, 'x') is None
    with pytest.raises(SystemExit) as stop:
        StreamStateHook().before_run(runner(shards, 2))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f'train: refused: the shard set {folder} holds 1 samples for 2 reading units (1 ranks x 2 DataLoader '
        f'workers): 1 of them would read none and wait for one for ever; set train_dataloader.num_workers=0 (each '
        f'rank reads itself), or give more samples or more shards (tools/shard_dataset.py --samples-per-shard)')
    StreamStateHook().before_run(runner(shards, 0))   # one unit: it reads the sample
    # online packing, of a shard set or of an annotation file's samples
    packed = OnlinePackedDataset(InternVLDataset(data['one'], **data['settings']), rank=0, world_size=1)
    with pytest.raises(SystemExit):
        StreamStateHook().before_run(runner(packed, 3))
    assert 'train: refused: the data set holds 1 samples for 3 reading units' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        StreamStateHook().before_run(runner(OnlinePackedDataset(shards, rank=0, world_size=1), 2))
    assert f'the shard set {folder} holds 1 samples' in capsys.readouterr().err


def test_a_unit_that_a_later_epoch_leaves_without_a_sample_is_refused_at_start_up(data, capsys):
    """9 samples in shards of 4, 4 and 1 for 4 reading units: two units share the shard at the first position. The
    first epoch's order (seed 0) gives them one of 4 samples, and start-up let the run go; the third gave them the
    shard of one sample, and unit 3 stopped the run there (NothingToRead). Each epoch orders the shards anew: the
    smallest shard a unit may be given is what start-up looks at now."""
    path = write_jsonl(data['root'] / 'nine.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)}
                                                     for i in range(9)])
    folder = str(data['root'] / 'nine')
    write_shards(InternVLDataset(path, **data['settings']), folder, samples_per_shard=4, max_shard_bytes=1 << 30)
    shards = ShardDataset(folder, data['settings'], seed=0, rank=0, world_size=4)
    assert shards.expected == [4, 4, 1] and min(shards.epoch_parts(4)) > 0
    with within(30), pytest.raises(NothingToRead, match='reading unit 3 of 4'):
        for _ in shards.keyed_records(3, 4, None):
            pass
    assert shards.unit_parts(4) == [1, 1, 1, 0] and min(shards.unit_parts(3)) > 0
    with pytest.raises(SystemExit):
        StreamStateHook().before_run(runner(shards, 1))
    assert capsys.readouterr().err.strip() == (
        f'train: refused: the shard set {folder} holds 9 samples for 4 reading units (4 ranks x 1 DataLoader '
        f'workers): 1 of them would read none in an epoch whose order of the shards gives them a shard of fewer '
        f'samples than the units sharing it (each epoch orders the shards anew; the first gives each unit some) and '
        f'wait for one for ever; use fewer ranks, or give more samples or more shards (tools/shard_dataset.py '
        f'--samples-per-shard)')
    packed = OnlinePackedDataset(shards, rank=0, world_size=4)
    with pytest.raises(SystemExit):
        StreamStateHook().before_run(runner(packed, 1))
    assert 'holds 9 samples for 4 reading units' in capsys.readouterr().err


def test_a_unit_of_a_shard_set_given_no_sample_stops_where_it_spun(data):
    """Where no hook checked first (a data set built outside a run): the unit's first epoch gives it nothing."""
    shards = ShardDataset(str(data['root'] / 'one'), data['settings'], rank=0, world_size=1)
    with within(20), pytest.raises(NothingToRead, match=r'reading unit 1 of 2 .* has no sample of its 1 shards'):
        next(shards.keyed_records(1, 2, None))
    assert next(shards.keyed_records(0, 2, None))[1] == (0, 0, 0)


@pytest.mark.parametrize('packed', [False, True])
def test_a_unit_whose_every_sample_is_bad_stops_naming_the_last(data, packed):
    """Unit 1 of 2 reads the second sample only, bad as cut at 300 tokens: each bad sample is counted once, so within
    max_bad_fraction it was read again and again for ever."""
    settings = dict(data['settings'], max_length=300, truncation='drop', max_bad_fraction=1)
    shards = ShardDataset(str(data['root'] / 'two'), settings, rank=0, world_size=1)
    stream = OnlinePackedDataset(shards, max_tokens=64, rank=0, world_size=1) if packed else shards
    with within(30), pytest.raises(NothingToRead, match=r'^reading unit 1 of 2 \(ranks x DataLoader workers\) read '
                                                        r'a whole epoch of its part of the data and every sample was '
                                                        r'bad \(the last: .*two.jsonl:2: truncated\)'):
        next(iter(stream.stream(1, 2, None)))
    assert next(iter(stream.stream(0, 2, None)))[1]['input_ids'] is not None   # the other unit reads its sample
