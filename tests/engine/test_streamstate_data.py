"""A streaming run resumed over data that changed since its checkpoint (engine/streamstate.py): the saved positions
would name other samples (some of the epoch seen twice, others never), so start-up stops saying what changed; the
same data resumes as before."""

import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.online_packing import OnlinePackedDataset
from xtuner_plugins.data.shards import ShardDataset
from xtuner_plugins.data.streaming import stream_collate_fn
from xtuner_plugins.engine import streamstate
from xtuner_plugins.engine.streamstate import StreamStateHook
from xtuner_plugins.errors import Refused

SETTINGS = dict(image_size=28, max_dynamic_patch=4, max_bad_fraction=1)


@pytest.fixture
def data(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / '0.png', size=(56, 28))
    samples = [{'image': '0.png', 'conversations': conv(answer=f'answer {i}')} for i in range(12)]
    return tmp_path, write_jsonl(tmp_path / 'a.jsonl', samples), dict(SETTINGS, tokenizer=tiny_tokenizer)


def packed(path, settings, root):
    ds = InternVLDataset(path, image_folders=str(root / 'i'), cache_dir=str(root / 'cache'), **settings)
    return OnlinePackedDataset(ds, max_tokens=300, max_buffer_size=2, rank=0, world_size=1)


def checkpoint_after(dataset, batches):
    """The checkpoint StreamStateHook saves after ``batches`` batches of ``dataset`` (one rank, no workers)."""
    hook = StreamStateHook()
    loader = DataLoader(dataset, batch_size=1, collate_fn=stream_collate_fn)
    for _, batch in zip(range(batches), loader):
        hook.before_train_iter(None, 0, batch)
    runner = SimpleNamespace(train_loop=SimpleNamespace(dataloader=SimpleNamespace(num_workers=0, dataset=dataset)))
    checkpoint = {}
    hook.before_save_checkpoint(runner, checkpoint)
    return pickle.loads(pickle.dumps(checkpoint))  # as torch.save and torch.load give it back (int keys kept)


def resume(checkpoint, dataset, cfg=None, **options):
    hook = StreamStateHook(**options)
    hook.after_load_checkpoint(None, checkpoint)
    loop = SimpleNamespace(iter=3, dataloader=DataLoader(dataset, batch_size=1, collate_fn=stream_collate_fn))
    hook.before_train(SimpleNamespace(train_loop=loop, cfg=cfg))
    return loop


def test_online_packing_resumed_over_a_file_that_grew_is_refused_saying_what_changed(data, capsys):
    root, path, settings = data
    checkpoint = checkpoint_after(packed(path, settings, root), 3)
    assert checkpoint['stream_state']['data']['sources'][0][2] == 12
    loop = resume(checkpoint, packed(path, settings, root))  # the same data: resumed
    assert next(loop.dataloader_iterator) is None  # MMEngine's replay of a trained batch, answered without drawing
    with open(path, 'a') as f:
        f.write(json.dumps({'image': '0.png', 'conversations': conv(answer='new')}) + '\n')
    grown = packed(path, settings, root)
    with pytest.raises(SystemExit) as stop:
        resume(checkpoint, grown)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1, err
    assert err.startswith(f'train: refused: resume: the data changed since the checkpoint\'s data stream state was '
                          f'saved (the checkpoint\'s against this run\'s: 12 samples before packing against 13; '
                          f'{path}: '), err
    assert 'start a new run from its weights (model.pretrained_pth=CHECKPOINT)' in err
    assert "(StreamStateHook's on_data_change='restart')" in err
    hooks = [dict(type='BadSampleHook'), dict(type=StreamStateHook)]
    with pytest.raises(SystemExit):
        resume(checkpoint, grown, cfg=dict(custom_hooks=hooks))
    assert '(--cfg-options custom_hooks.1.on_data_change=restart)' in capsys.readouterr().err


def test_on_data_change_restart_goes_on_with_the_stream_from_its_beginning(data, monkeypatch):
    """``on_data_change='restart'``: the changed data's stream starts again from its first batch (MMEngine's replay
    of the 3 trained batches still answered without drawing), with a warning; an unknown value is refused."""
    root, path, settings = data
    checkpoint = checkpoint_after(packed(path, settings, root), 3)
    with open(path, 'a') as f:
        f.write(json.dumps({'image': '0.png', 'conversations': conv(answer='new')}) + '\n')
    fresh = iter(DataLoader(packed(path, settings, root), batch_size=1, collate_fn=stream_collate_fn))
    first = [next(fresh)['data']['input_ids'].tolist() for _ in range(4)]
    said = []
    monkeypatch.setattr(streamstate, 'print_log', lambda msg, **kw: said.append(msg))
    loop = resume(checkpoint, packed(path, settings, root), on_data_change='restart')
    assert [next(loop.dataloader_iterator) for _ in range(3)] == [None] * 3
    assert [next(loop.dataloader_iterator)['data']['input_ids'].tolist() for _ in range(4)] == first
    assert "on_data_change='restart': the weights, optimizer and schedule are the checkpoint's" in said[0]
    with pytest.raises(Refused, match=r"on_data_change='go'; use 'stop' or 'restart'"):
        StreamStateHook(on_data_change='go')


def test_shards_resumed_over_a_shard_set_written_again_are_refused(data, capsys):
    root, path, settings = data
    source = InternVLDataset(path, image_folders=str(root / 'i'), cache_dir=str(root / 'cache'), **settings)
    write_shards(source, str(root / 'shards'), samples_per_shard=4, max_shard_bytes=1 << 20)
    stream = lambda: ShardDataset(str(root / 'shards'), settings, rank=0, world_size=1)  # noqa: E731
    checkpoint = checkpoint_after(stream(), 3)
    resume(checkpoint, stream())
    shutil.rmtree(root / 'shards')
    write_shards(source, str(root / 'shards'), samples_per_shard=3, max_shard_bytes=1 << 20)  # 4 shards, not 3
    with pytest.raises(SystemExit):
        resume(checkpoint, stream())
    err = capsys.readouterr().err
    assert 'against this run\'s: shard set of 3 shards, 12 samples' in err and ' against 4, 12, ' in err, err


def test_a_checkpoint_saved_before_the_data_was_recorded_resumes_as_before(data):
    root, path, settings = data
    checkpoint = checkpoint_after(packed(path, settings, root), 3)
    del checkpoint['stream_state']['data']
    with open(path, 'a') as f:
        f.write(json.dumps({'image': '0.png', 'conversations': conv(answer='new')}) + '\n')
    resume(checkpoint, packed(path, settings, root))


def test_a_file_reordered_in_place_and_shards_split_otherwise_are_refused(data, capsys):
    """The same size, count and lines kept: a file whose lines were shuffled in place, and a shard set written
    again as 8 + 4 samples where it was 7 + 5 (the same shards, samples and padded bytes), resumed at the saved
    places over other samples (one read twice, another never). A fingerprint saved without the content digest (an
    earlier version's checkpoint) is compared without it."""
    import random
    root, path, settings = data
    checkpoint = checkpoint_after(packed(path, settings, root), 3)
    with open(path) as f:
        lines = f.readlines()
    random.Random(0).shuffle(lines)
    with open(path, 'w') as f:
        f.writelines(lines)
    with pytest.raises(SystemExit):
        resume(checkpoint, packed(path, settings, root))
    assert 'other contents (lines edited or reordered in place)' in capsys.readouterr().err
    del checkpoint['stream_state']['data']['content']
    resume(checkpoint, packed(path, settings, root))   # as an earlier version compared it

    source = InternVLDataset(path, image_folders=str(root / 'i'), cache_dir=str(root / 'cache'), **settings)
    stream = lambda: ShardDataset(str(root / 'shards'), settings, rank=0, world_size=1)  # noqa: E731
    write_shards(source, str(root / 'shards'), samples_per_shard=7, max_shard_bytes=1 << 20)
    checkpoint = checkpoint_after(stream(), 3)
    shutil.rmtree(root / 'shards')
    write_shards(source, str(root / 'shards'), samples_per_shard=8, max_shard_bytes=1 << 20)
    assert checkpoint['stream_state']['data']['shards'] == \
        streamstate_fingerprint(stream())['shards']   # what was compared before: alike
    with pytest.raises(SystemExit):
        resume(checkpoint, stream())
    assert 'the samples split or ordered otherwise (the shard set written again)' in capsys.readouterr().err


def streamstate_fingerprint(dataset):
    from xtuner_plugins.engine.dataagree import data_fingerprint
    return data_fingerprint(dataset)


def test_shards_written_again_with_another_seed_are_refused(data, capsys):
    """The same samples in each shard count and (tar padding) the same bytes, in another order: the fingerprint
    read only the shards' files, counts and bytes, and the resume went on at the saved places over other samples
    (seven of the epoch twice, seven never). Each shard now records a digest of what it holds."""
    root, path, settings = data
    source = InternVLDataset(path, image_folders=str(root / 'i'), cache_dir=str(root / 'cache'), **settings)
    write_shards(source, str(root / 'shards'), samples_per_shard=4, max_shard_bytes=1 << 20, seed=1)
    stream = lambda: ShardDataset(str(root / 'shards'), settings, rank=0, world_size=1)  # noqa: E731
    checkpoint = checkpoint_after(stream(), 3)
    first = json.loads((root / 'shards' / 'shards.json').read_text())
    shutil.rmtree(root / 'shards')
    write_shards(source, str(root / 'shards'), samples_per_shard=4, max_shard_bytes=1 << 20, seed=2)
    again = json.loads((root / 'shards' / 'shards.json').read_text())
    assert [(s['samples'], s['bytes']) for s in again['shards']] == [(s['samples'], s['bytes']) for s in first['shards']]
    with pytest.raises(SystemExit):
        resume(checkpoint, stream())
    assert 'the samples split or ordered otherwise (the shard set written again)' in capsys.readouterr().err


def test_a_stream_resumed_with_another_seed_is_refused(data, capsys):
    """The stream's seed draws its epochs' order (streaming.epoch_order): changed on resume, the saved positions
    named other samples (five of the epoch twice, five never) and the resume said 'no batch drawn again'."""
    root, path, settings = data

    def stream(seed):
        ds = InternVLDataset(path, image_folders=str(root / 'i'), cache_dir=str(root / 'cache'), **settings)
        return OnlinePackedDataset(ds, max_tokens=300, max_buffer_size=2, rank=0, world_size=1, seed=seed)
    checkpoint = checkpoint_after(stream(0), 3)
    resume(checkpoint, stream(0))
    with pytest.raises(SystemExit):
        resume(checkpoint, stream(7))
    assert "the data stream's seed 0 -> 7: its epochs are drawn in another order" in capsys.readouterr().err
    del checkpoint['stream_state']['order']   # saved before the order was recorded: not compared
    resume(checkpoint, stream(7))
