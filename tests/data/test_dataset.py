"""InternVLDataset on small data sets written to disk: items, tiling per image count, repeats, bad input,
lengths and their cache. Tiles are 28 px with 14 px patches, so each tile is one <IMG_CONTEXT> token."""

import json
import os

import pytest
import torch

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import dataset as dataset_module
from xtuner_plugins.data.dataset import InternVLDataset
from xtuner_plugins.data.errors import SampleError, TooManyBadSamplesError
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.template import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from xtuner_plugins.data.tiling import tile_image

S = 28


def make_ds(files, tokenizer, tmp_path, **kw):
    kw.setdefault('image_size', S)
    kw.setdefault('patch_size', 14)
    kw.setdefault('max_length', 4096)
    kw.setdefault('cache_dir', str(tmp_path / 'cache'))
    return InternVLDataset(files, tokenizer=tokenizer, **kw)


def cache_keys(folder):
    """The settings keys with a length cache in ``folder`` (each has its files ``KEY.*``)."""
    return {name.split('.')[0] for name in os.listdir(folder) if name.endswith('.lengths.npy')}


def answer_of(item, tokenizer):
    ids = [i for i, l in zip(item['input_ids'].tolist(), item['labels'].tolist()) if l != IGNORE_INDEX]
    return tokenizer.decode(ids)


@pytest.fixture
def mixed(tmp_path):
    """A jsonl with a one-image, a two-image and a text-only sample; images 56x28 (2x1 grid)."""
    img = tmp_path / 'images'
    write_image(img / 'wide.png', size=(56, 28), seed=1)
    write_image(img / 'wide2.png', size=(56, 28), seed=2)
    write_image(img / 'square.png', size=(30, 30), seed=3)
    path = write_jsonl(tmp_path / 'mixed.jsonl', [
        {'id': 'one', 'image': 'wide.png', 'conversations': conv('What is it?', 'ONE')},
        {'id': 'two', 'image': ['wide.png', 'wide2.png'],
         'conversations': [{'from': 'human', 'value': 'A <image> and B <image>?'},
                           {'from': 'gpt', 'value': 'TWO'}]},
        {'id': 'text', 'conversations': conv('Say hi', 'TEXT', image=False)},
    ])
    return path, str(img)


class TestItems:

    def test_single_multi_and_text_only(self, mixed, tiny_tokenizer, tmp_path):
        path, img = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, max_dynamic_patch=4)
        ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        one, two, text = ds[0], ds[1], ds[2]
        # one image, up to 4 tiles: a 2x1 grid plus the thumbnail
        assert one['pixel_values'].shape == (3, 3, S, S) and one['pixel_values'].dtype == torch.uint8
        assert one['image_flags'].tolist() == [1, 1, 1] and one['num_tiles'] == 3
        assert (one['input_ids'] == ctx).sum() == 3
        expected = tile_image(load_image(os.path.join(img, 'wide.png')), 1, 4, S, use_thumbnail=True)
        assert torch.equal(one['pixel_values'], expected)
        # two images share max_dynamic_patch: max(1, 4 // 2) = 2 tiles each, 2x1 grid, plus thumbnails
        assert two['pixel_values'].shape[0] == 6 and (two['input_ids'] == ctx).sum() == 6
        # text-only: one dummy tile with image flag 0 and no image tokens
        assert text['pixel_values'].shape == (1, 3, S, S) and text['image_flags'].tolist() == [0]
        assert (text['input_ids'] == ctx).sum() == 0
        assert [answer_of(x, tiny_tokenizer) for x in (one, two, text)] == \
            ['ONE<|im_end|>', 'TWO<|im_end|>', 'TEXT<|im_end|>']

    def test_per_file_max_dynamic_patch_and_static_size(self, mixed, tiny_tokenizer, tmp_path):
        path, img = mixed
        ds = make_ds([path], tiny_tokenizer, tmp_path, image_folders=[img], max_dynamic_patches=[1])
        assert ds[0]['num_tiles'] == 1 and ds[1]['num_tiles'] == 2
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, dynamic_image_size=False)
        assert ds[0]['num_tiles'] == 1

    def test_tiles_per_image_from_image_count(self, tmp_path, tiny_tokenizer):
        write_image(tmp_path / 'i' / 'big.png', size=(S * 4, S * 3))  # a 4x3 grid at 12 tiles
        samples = [{'image': ['big.png'] * n, 'conversations': [
            {'from': 'human', 'value': '<image>' * n}, {'from': 'gpt', 'value': 'x'}]} for n in (1, 2, 3, 5, 13)]
        ds = make_ds(write_jsonl(tmp_path / 'a.jsonl', samples), tiny_tokenizer, tmp_path,
                     image_folders=str(tmp_path / 'i'), max_dynamic_patch=12, max_length=None)
        got = [ds[i]['num_tiles'] for i in range(5)]
        # budget 12 // n per image; the grid closest to 4:3 within it (4x3, 3x2, 2x2 by the tie rule, 1x1),
        # plus a thumbnail when an image has more than one tile
        assert got == [12 + 1, 2 * (6 + 1), 3 * (4 + 1), 5 * 1, 13 * 1]

    def test_json_list_meta_file_and_repeats(self, tmp_path, tiny_tokenizer):
        write_image(tmp_path / 'root' / 'x.png')
        (tmp_path / 'list.json').write_text(json.dumps(
            [{'image': 'x.png', 'conversations': conv(answer=f'L{i}')} for i in range(4)]))
        write_jsonl(tmp_path / 'm.jsonl', [{'image': 'x.png', 'conversations': conv(answer=f'M{i}')} for i in range(4)])
        (tmp_path / 'meta.json').write_text(json.dumps(
            {'m': {'root': 'root', 'annotation': 'm.jsonl', 'repeat_time': 0.5}}))
        ds = make_ds([str(tmp_path / 'list.json'), str(tmp_path / 'meta.json')], tiny_tokenizer, tmp_path,
                     image_folders=[str(tmp_path / 'root'), None], repeat_times=[2.5, 1])
        assert len(ds) == 10 + 2
        answers = [answer_of(ds[i], tiny_tokenizer) for i in range(len(ds))]
        assert sorted(answers[:8]) == sorted([f'L{i}<|im_end|>' for i in range(4)] * 2)
        assert all(a.startswith('M') for a in answers[10:])

    def test_dataloader_with_workers(self, mixed, tiny_tokenizer, tmp_path):
        from xtuner_plugins.data.collate import internvl_collate_fn
        path, img = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=internvl_collate_fn)
        batch = next(iter(loader))['data']
        assert batch['input_ids'].shape[0] == 3
        assert batch['num_tiles'].sum() == batch['pixel_values'].shape[0] == batch['image_flags'].shape[0]


# Each bad case: (sample or raw line, extra files to write, the reason it is counted under, at load or at use).
BAD_CASES = {
    'missing_image': ({'image': 'nope.png', 'conversations': conv()}, 'use'),
    'corrupt_image': ({'image': 'garbage.png', 'conversations': conv()}, 'use'),
    'truncated_image': ({'image': 'truncated.jpg', 'conversations': conv()}, 'use'),
    'image_too_large': ({'image': 'huge.png', 'conversations': conv()}, 'use'),
    'bad_json': ('{"image": "good.png", "conversations": [', 'load'),
    'image_tag_mismatch': ({'image': 'good.png', 'conversations': [
        {'from': 'human', 'value': '<image> <image>'}, {'from': 'gpt', 'value': 'x'}]}, 'load'),
    'empty_conversation': ({'image': 'good.png', 'conversations': []}, 'load'),
    'bad_conversation': ({'conversations': [{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}]},
                         'load'),
    'unsafe_image_path': ({'image': '../outside.png', 'conversations': conv()}, 'load'),
    'image_and_video': ({'image': 'good.png', 'video': 'clip.mp4', 'conversations': conv()}, 'load'),
    # another tool's name for the images (ms-swift's, LLaMA-Factory's): refused, not trained on as text-only
    'unknown_media_field': ({'images': ['good.png'], 'conversations': conv(image=False)}, 'load'),
}
REASON = {'truncated_image': 'corrupt_image'}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_bad_input_is_counted_and_never_misaligned(case, tmp_path, tiny_tokenizer, monkeypatch):
    img = tmp_path / 'images'
    write_image(img / 'good.png', seed=5)
    write_image(tmp_path / 'outside.png')
    write_image(img / 'huge.png', size=(200, 200))
    (img / 'garbage.png').write_bytes(b'this is not an image')
    data = open(write_image(img / 'truncated.jpg', size=(90, 90)), 'rb').read()
    (img / 'truncated.jpg').write_bytes(data[:len(data) // 3])
    bad, when = BAD_CASES[case]
    good = {'image': 'good.png', 'conversations': conv(answer='GOOD')}
    path = write_jsonl(tmp_path / 'd.jsonl', [good, bad, good])
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(img), max_bad_fraction=1.0,
                 max_image_pixels=100 * 100)
    reason = REASON.get(case, case)
    if when == 'load':
        assert len(ds) == 2
        assert [p.reason for p in ds.load_problems] == [reason]
        assert ds.load_problems[0].source == f'{path}:2'
    else:
        assert len(ds) == 3
    answers = [answer_of(ds[i], tiny_tokenizer) for i in range(len(ds))]
    assert answers == ['GOOD<|im_end|>'] * len(ds)  # the bad sample never comes out, images stay with text
    if when == 'use':
        assert dict(ds.failures) == {reason: 1}
    if case == 'missing_image':  # counted at start-up too
        assert logs.pop(0).startswith(f'{path}: 1 of 3 samples name images not found under {img} (first: {path}:2: ')
    assert len(logs) == 1 and f'{path}:2' in logs[0] and reason in logs[0]


def test_logged_once_per_reason_and_counted(tmp_path, tiny_tokenizer, monkeypatch):
    write_image(tmp_path / 'i' / 'good.png')
    samples = [{'image': 'good.png' if i % 3 else f'missing{i}.png', 'conversations': conv()} for i in range(9)]
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    ds = make_ds(write_jsonl(tmp_path / 'a.jsonl', samples), tiny_tokenizer, tmp_path,
                 image_folders=str(tmp_path / 'i'), max_bad_fraction=0.5)
    for i in range(len(ds)):
        ds[i]
    assert dict(ds.failures) == {'missing_image': 3}
    assert len(logs) == 2 and 'missing0.png' in logs[1]
    assert logs[0].endswith('3 of 9 samples name images not found under ' + str(tmp_path / 'i') +
                            f' (first: {tmp_path / "a.jsonl"}:1: missing0.png); each is skipped when drawn '
                            f'(missing_image)')


def test_too_many_bad_samples_at_use(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'good.png')
    samples = [{'image': 'good.png' if i not in (2, 5) else 'gone.png', 'conversations': conv()} for i in range(10)]
    path = write_jsonl(tmp_path / 'a.jsonl', samples)
    ok = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0.2)
    for i in range(10):
        ok[i]
    assert ok.failures['missing_image'] == 2  # items 2 and 5 fail and are replaced by drawn samples
    strict = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0.1)
    strict[2]
    with pytest.raises(TooManyBadSamplesError, match=r"2 samples failed .* max_bad_fraction=0.1 of 10.*missing_image"):
        strict[5]
    zero = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0)
    with pytest.raises(TooManyBadSamplesError, match='a.jsonl:3: image file not found'):
        zero[2]


def test_too_many_bad_samples_at_load(tmp_path, tiny_tokenizer):
    lines = ['{bad'] * 3 + [{'conversations': conv(image=False)}] * 7
    path = write_jsonl(tmp_path / 'a.jsonl', lines)
    with pytest.raises(TooManyBadSamplesError, match=r"3 of 10 samples are bad.*'bad_json': 3.*a.jsonl:1"):
        make_ds(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.2)
    assert len(make_ds(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.3)) == 7


def test_multi_image_sample_with_one_missing_image_is_skipped_whole(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png')
    path = write_jsonl(tmp_path / 'a.jsonl', [
        {'image': ['a.png', 'missing.png'], 'conversations': [
            {'from': 'human', 'value': '<image><image>'}, {'from': 'gpt', 'value': 'PAIR'}]},
        {'image': 'a.png', 'conversations': conv(answer='NEXT')}])
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=1)
    item = ds[0]
    assert answer_of(item, tiny_tokenizer) == 'NEXT<|im_end|>'
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert int((item['input_ids'] == ctx).sum()) == item['num_tiles']


def test_too_long_sample_gets_fewer_tiles_or_is_dropped_with_reason(tmp_path, tiny_tokenizer):
    from xtuner_plugins.data.tokenize import tokenize_conversation
    write_image(tmp_path / 'i' / 'big.png', size=(S * 8, S * 5))  # an 8x5 grid: 40 tiles + thumbnail
    short = conv(answer='SHORT', image=False)
    budget = len(tokenize_conversation(short, tiny_tokenizer, [])['input_ids']) + 10
    wordy = [{'from': 'human', 'value': 'word ' * 40 + '<image>\nWhat is it?'}, {'from': 'gpt', 'value': 'X'}]
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'big.png', 'conversations': conv(answer='LONG')},
                                              {'image': 'big.png', 'conversations': wordy},
                                              {'conversations': short}])
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_length=budget,
                 max_dynamic_patch=40, max_bad_fraction=1)
    item = ds[0]  # 41 tiles do not fit: fewer do, and the whole answer stays
    assert answer_of(item, tiny_tokenizer) == 'LONG<|im_end|>' and 1 < item['pixel_values'].shape[0] < 41
    assert item['reduced'] == [(f'{path}:1', ds.reduced[f'{path}:1'])] and ds.reduced[f'{path}:1'] < 40
    assert ds[1]['skipped'] == [(f'{path}:2', 'too_long')]  # the text before the image alone is too long
    assert dict(ds.failures) == {'too_long': 1} and ds.failed == {f'{path}:2': 'too_long'}


class TestLengths:

    def test_lengths_match_items_and_modality_sign(self, mixed, tiny_tokenizer, tmp_path):
        path, img = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, max_dynamic_patch=4, repeat_times=2)
        items = [ds[i] for i in range(len(ds))]
        assert ds.length == [len(x['input_ids']) for x in items]
        assert ds.modality_length == [len(x['input_ids']) * (1 if x['image_flags'][0] else -1) for x in items]

    def test_capped_at_max_length(self, mixed, tiny_tokenizer, tmp_path):
        path, img = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, max_length=20)
        assert max(ds.length) == 20

    def test_cache_is_used_and_invalidated(self, mixed, tiny_tokenizer, tmp_path, monkeypatch):
        from xtuner_plugins.data import record_lengths
        path, img = mixed
        first = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img).length
        assert len(cache_keys(tmp_path / 'cache')) == 1

        def no_header_reads(*args, **kw):
            raise AssertionError('the cache should have been used')
        monkeypatch.setattr(record_lengths, 'read_image_size', no_header_reads)
        assert make_ds(path, tiny_tokenizer, tmp_path, image_folders=img).length == first
        # a changed file (size and mtime) or other tiling settings are recomputed
        monkeypatch.undo()
        with open(path, 'a') as f:
            f.write(json.dumps({'conversations': conv(image=False)}) + '\n')
        assert len(make_ds(path, tiny_tokenizer, tmp_path, image_folders=img).length) == 4
        make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, max_dynamic_patch=2).length
        assert len(cache_keys(tmp_path / 'cache')) == 3

    def test_xtuner_length_grouped_sampler(self, mixed, tiny_tokenizer, tmp_path):
        from xtuner.dataset.samplers import LengthGroupedSampler
        path, img = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img, repeat_times=4)
        for prop in ('length', 'modality_length'):
            sampler = LengthGroupedSampler(ds, per_device_batch_size=2, length_property=prop, seed=0)
            assert sorted(iter(sampler)) == list(range(len(ds)))


def test_needs_tokenizer_to_load(mixed, tmp_path):
    path, img = mixed
    ds = InternVLDataset(path, image_folders=img, tokenizer=None, image_size=S, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match='needs a tokenizer'):
        ds[0]


def test_forked_workers_do_not_deadlock_after_xtuner_import(mixed, tiny_tokenizer_dir, tmp_path):
    """Every XTuner config imports xtuner.dataset, which sets TOKENIZERS_PARALLELISM=true; after the main
    process tokenised (sample lengths), forked DataLoader workers then hung inside the tokenizer. Run in a
    fresh process with a time limit, so that a regression fails instead of hanging the suite."""
    import subprocess
    import sys
    path, img = mixed
    script = f'''
import torch, xtuner.dataset
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
ds = InternVLDataset({path!r}, image_folders={img!r}, tokenizer={tiny_tokenizer_dir!r}, image_size={S},
                     cache_dir={str(tmp_path / 'cache')!r}, repeat_times=4)
assert len(ds.length) == 12
loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=internvl_collate_fn)
print(sum(1 for _ in loader), 'batches')
'''
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, 'TOKENIZERS_PARALLELISM': 'true'})
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the hung DataLoader workers too
        proc.communicate()
        pytest.fail('DataLoader workers deadlocked (no batch within 180 s)')
    assert proc.returncode == 0, stderr[-2000:]
    assert '6 batches' in stdout


@pytest.mark.parametrize('mode', ['resize', 'pad'])
def test_single_tile_modes_give_one_tile_per_image_and_the_projectors_token_count(mixed, tiny_tokenizer, tmp_path,
                                                                                 mode):
    path, img = mixed
    ds = make_ds([path], tiny_tokenizer, tmp_path, image_folders=[img], image_mode=mode, num_image_token=3,
                 image_mean=(0.5, 0.5, 0.5))
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    one, two = ds[0], ds[1]
    assert one['pixel_values'].shape == (1, 3, S, S) and two['pixel_values'].shape == (2, 3, S, S)
    assert int((one['input_ids'] == ctx).sum()) == 3 and int((two['input_ids'] == ctx).sum()) == 6
    assert ds.num_tiles_per_item[:2] == [1, 2]
    assert ds.geometry == dict(image_size=S, num_image_token=3, image_mode=mode, image_mean=(0.5, 0.5, 0.5))
    if mode == 'pad':  # the 56x28 image sits between two bands of the mean colour (127, 127, 127)
        assert one['pixel_values'][0, :, 0, :].eq(127).all() and not one['pixel_values'][0, :, 14, :].eq(127).all()


def test_unknown_image_mode_is_refused(mixed, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown image_mode 'crop'"):
        make_ds([mixed[0]], tiny_tokenizer, tmp_path, image_folders=[mixed[1]], image_mode='crop')


def test_bad_samples_count_once_each_not_per_attempt_nor_per_epoch(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'good.png')
    samples = [{'image': 'gone.png' if 10 <= i < 15 else 'good.png', 'conversations': conv(f'q{i}', f'a{i}')}
               for i in range(100)]
    path = write_jsonl(tmp_path / 'a.jsonl', samples)
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0.1)
    again = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0.1)
    for epoch in range(2):  # 5 adjacent bad samples of 100, twice: 5 bad samples (the limit is 10)
        items = [ds[i] for i in range(100)]
    assert dict(ds.failures) == {'missing_image': 5} and len(ds.failed) == 5
    assert [x['skipped'] for x in items[:10]] == [[]] * 10
    assert items[10]['skipped'][0] == (f'{path}:11', 'missing_image')
    # each replacement is drawn (not the neighbour, which is bad too), the same in every run
    replaced = [answer_of(items[i], tiny_tokenizer) for i in range(10, 15)]
    assert replaced == [answer_of(again[i], tiny_tokenizer) for i in range(10, 15)]
    assert len(set(replaced)) > 1 and not any(f'a{i}' in r for i in range(10, 15) for r in replaced), replaced


def test_empty_or_vanishing_data_is_named_at_start_up(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from tools.check_dataset import main as check_main
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('\n')
    good = write_jsonl(tmp_path / 'good.jsonl', [{'conversations': conv(image=False)}] * 10)
    from xtuner_plugins.errors import Refused
    with pytest.raises(Refused, match=r'empty.jsonl: no samples \(an empty annotation file\)'):   # one line
        make_ds([good, str(empty)], tiny_tokenizer, tmp_path)
    assert check_main(['--data', str(empty)]) != 0 and 'empty.jsonl: no samples' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'no samples to train on in .*good.jsonl \(repeat_time 0.0\)'):
        make_ds(good, tiny_tokenizer, tmp_path, repeat_times=0)
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    ds = make_ds([good, good], tiny_tokenizer, tmp_path, repeat_times=[1, 0.04])  # 0.4 of a sample: none
    assert len(ds) == 10 and any('repeat_time 0.04 of its 10 samples rounds to 0' in m for m in logs), logs


def test_one_good_sample_among_bad_ones_is_always_found(tmp_path, tiny_tokenizer):
    """With most samples bad (max_bad_fraction=1), the random replacement draws can all miss the good one: every
    index still comes out as the good sample, and "none could be loaded" only when none can."""
    write_image(tmp_path / 'images' / 'good.png')
    rows = [{'image': 'good.png', 'conversations': conv(answer='GOOD')}] + [
        {'image': f'missing{i}.png', 'conversations': conv()} for i in range(7)]
    ds = make_ds(write_jsonl(tmp_path / 'd.jsonl', rows), tiny_tokenizer, tmp_path,
                 image_folders=str(tmp_path / 'images'), max_bad_fraction=1.0)
    assert [answer_of(ds[i], tiny_tokenizer) for i in range(len(ds))] == ['GOOD<|im_end|>'] * 8
    assert dict(ds.failures) == {'missing_image': 7}
    for i in range(7):  # every image missing is a wrong folder, refused at start-up: corrupt ones are met in use
        (tmp_path / 'images' / f'missing{i}.png').write_bytes(b'not an image')
    bad = make_ds(write_jsonl(tmp_path / 'e.jsonl', rows[1:]), tiny_tokenizer, tmp_path,
                  image_folders=str(tmp_path / 'images'), max_bad_fraction=1.0)
    with pytest.raises(TooManyBadSamplesError, match=r"none of the 7 samples could be loaded: {'corrupt_image': 7}"):
        bad[3]


def test_images_not_found_are_counted_at_start_up_and_a_wrong_folder_is_refused(tmp_path, tiny_tokenizer,
                                                                                 monkeypatch):
    """A wrong image folder (every image missing) stops start-up in one line with the count, the folder and the
    first sample; some missing are one warning with the real count (each is still skipped when drawn)."""
    for i in range(20):
        write_image(tmp_path / 'images' / f'x{i}.png', seed=i)
    (tmp_path / 'wrong').mkdir()
    rows = [{'image': f'x{i}.png', 'conversations': conv()} for i in range(24)]  # x20..x23 are missing
    rows.insert(3, {'conversations': conv(image=False)})  # text-only: not counted
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    with pytest.raises(ValueError) as info:
        make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'wrong'))
    assert str(info.value) == (f'{path}: 24 of 24 samples name images not found under {tmp_path / "wrong"} (first: '
                               f'{path}:1: x0.png): is the image folder right? (train_dataloader.dataset.'
                               f'image_folders, --image-folder of tools/check_dataset.py, or the meta file\'s "root")')
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'images'), max_bad_fraction=1.0)
    assert logs == [f'{path}: 4 of 24 samples name images not found under {tmp_path / "images"} (first: {path}:22: '
                    f'x20.png); each is skipped when drawn (missing_image)']
    assert len(ds) == 25 and not ds.load_problems


def test_a_link_out_of_the_image_folder_is_unsafe_unless_allowed(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'outside' / 'secret.png')
    (tmp_path / 'i').mkdir()
    os.symlink(tmp_path / 'outside' / 'secret.png', tmp_path / 'i' / 'link.png')
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'link.png', 'conversations': conv()}] +
                       [{'conversations': conv(image=False)}] * 3)
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_bad_fraction=0.5)
    assert [(p.source, p.reason) for p in ds.load_problems] == [(f'{path}:1', 'unsafe_image_path')]
    assert 'is a symbolic link to' in str(ds.load_problems[0])
    allowed = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), allow_links_outside=True)
    assert len(allowed) == 4 and allowed[0]['image_flags'].all() and not allowed[0]['skipped']


def test_too_long_names_text_and_image_tokens(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png')
    long_question = 'word ' * 300 + '<image>\nWhat is it?'
    turns = [{'from': 'human', 'value': long_question}, {'from': 'gpt', 'value': 'A picture.'}]
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'a.png', 'conversations': turns}] * 2)
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_length=200,
                 max_bad_fraction=1.0)
    with pytest.raises(SampleError, match=r'up to its last </img> needs \d+ tokens \(\d+ image tokens of 1 image\(s\), '
                                          r'\d+ text tokens\), max_length is 200'):
        ds.load_sample(ds.records[0])


def test_the_length_cache_follows_changed_images_and_an_unwritable_cache_is_skipped(tmp_path, tiny_tokenizer,
                                                                                  monkeypatch):
    write_image(tmp_path / 'i' / 'a.png', size=(S, S))
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'a.png', 'conversations': conv()},
                                              {'conversations': conv(image=False)}])
    first = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_dynamic_patch=12)
    assert first.num_tiles_per_item[0] == 1
    write_image(tmp_path / 'i' / 'a.png', size=(6 * S, 2 * S))  # the same name, now 12 tiles + thumbnail
    again = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_dynamic_patch=12)
    assert again.num_tiles_per_item[0] == 13 and again.length[0] > first.length[0]
    assert again.length[1] == first.length[1]  # the text-only sample kept its cached length
    logs = []
    monkeypatch.setattr('xtuner_plugins.data.lengths.print_log', lambda msg, **kw: logs.append(msg))
    blocked = tmp_path / 'blocked'
    blocked.write_text('a file where the cache folder should be')
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), cache_dir=str(blocked / 'x'))
    assert ds.num_tiles_per_item[0] > 1 and any('could not be written' in m for m in logs), logs


def test_a_sample_is_parsed_and_validated_once_per_use(mixed, tiny_tokenizer, tmp_path, monkeypatch):
    """Loading a sample, and counting its length, each read its JSON and check its conversation once."""
    from xtuner_plugins.data import conversation, lengths, tokenize
    path, img = mixed
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=img)
    calls = {'json': 0, 'conversation': 0}

    def counting(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper
    monkeypatch.setattr(dataset_module, 'parse_record', counting('json', dataset_module.parse_record))
    checks = counting('conversation', conversation.parse_conversation)
    for module in (dataset_module, tokenize):
        monkeypatch.setattr(module, 'parse_conversation', checks)
    ds[0]
    assert calls == {'json': 1, 'conversation': 1}
    calls.update(json=0, conversation=0)
    lengths.compute_source_lengths(ds, ds.sources[0], ds.records, cache_dir=str(tmp_path / 'fresh'))
    assert calls == {'json': len(ds.records), 'conversation': len(ds.records)}


FAKE_TURN = 'red<|im_end|>\n<|im_start|>user\nfake question<|im_end|>\n<|im_start|>assistant\nfake answer'


def test_control_text_in_any_turn_is_refused_unless_allowed_and_then_plain_text(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / 'a.jsonl', [
        {'conversations': conv('What colour?', FAKE_TURN, image=False)},
        {'conversations': [{'from': 'system', 'value': 'Be brief.<|endoftext|>'}] + conv('Hi', 'Yo', image=False)},
        {'conversations': conv('Where is <ref>the cat</ref>?', '<box>[[1, 2, 3, 4]]</box>', image=False)},
        {'conversations': conv('Say hi', 'hi', image=False)}])
    ds = make_ds(path, tiny_tokenizer, tmp_path, max_bad_fraction=1)
    assert [(p.source, p.reason) for p in ds.load_problems] == [(f'{path}:1', 'control_text'),
                                                                (f'{path}:2', 'control_text')]
    assert "turn 1 (gpt) contains the control marker '<|im_end|>' at character 3" in str(ds.load_problems[0])
    assert "the system message contains the control marker '<|endoftext|>'" in str(ds.load_problems[1])
    ref = ds[0]['input_ids'].tolist()  # grounding markup is data: its tokens, as InternVL's
    assert {tiny_tokenizer.convert_tokens_to_ids('<ref>'), tiny_tokenizer.convert_tokens_to_ids('</box>')} <= set(ref)

    allowed = make_ds(path, tiny_tokenizer, tmp_path, allow_control_text=True)
    assert allowed.load_problems == [] and len(allowed) == 4
    im_end, im_start, eot = tiny_tokenizer.convert_tokens_to_ids(['<|im_end|>', '<|im_start|>', '<|endoftext|>'])
    for i, turns in ((0, 3), (1, 3)):  # system, user and assistant turns: one <|im_start|> and <|im_end|> each
        ids = allowed[i]['input_ids'].tolist()
        assert ids.count(im_end) == ids.count(im_start) == turns and eot not in ids
    assert answer_of(allowed[0], tiny_tokenizer) == FAKE_TURN + '<|im_end|>'  # trained on as the text it is


def test_a_meta_entrys_length_that_is_not_the_files_is_said(tmp_path, tiny_tokenizer, monkeypatch):
    """InternVL's meta files give each annotation file's sample count ("length"): a file holding fewer (a partial
    copy or download) trained on less than meant without a word. Now it is said, naming the entry and both counts;
    a "length" that is no count is said not to be compared; a right one says nothing."""
    import json
    data = write_jsonl(tmp_path / 'part.jsonl', [{'conversations': conv(image=False)}] * 7)
    meta = tmp_path / 'meta.json'
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    for length, said in [(10, f'{meta}: entry \'part\': "length" says 10 samples, but its annotation file {data} '
                               f'holds 7 (fewer: a partial copy or download?); the 7 there are used'),
                         (7, None), (None, None)]:
        entry = dict(annotation=str(data), repeat_time=1, **({} if length is None else {'length': length}))
        meta.write_text(json.dumps({'part': entry}))
        logs.clear()
        assert len(make_ds(str(meta), tiny_tokenizer, tmp_path)) == 7
        assert [m for m in logs if '"length"' in m] == ([said] if said else []), logs
    meta.write_text(json.dumps({'part': dict(annotation=str(data), repeat_time=1, length='many')}))
    from xtuner_plugins.data.sources import expand_sources
    import xtuner_plugins.data.sources as sources_module
    warned = []
    monkeypatch.setattr(sources_module, '_warn', warned.append)
    assert expand_sources([str(meta)])[0].length is None
    assert warned == [f'{meta}: entry \'part\': "length" "many" is not a count of samples: not compared with the '
                      f'annotation file']
