"""Tests of the demo's synthetic data (xtuner_plugins.demo.data)."""

import collections
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.tile_grid import choose_grid, num_tiles
from xtuner_plugins.demo import ANSWERS, KINDS, chance_accuracy, make_demo_data, read_questions
from xtuner_plugins.demo.questions import QUESTIONS
from xtuner_plugins.demo.scenes import BACKGROUND, COLOURS

S, MAX_PATCH = 56, 6
SPLITS = ('pretrain', 'sft', 'test', 'preference')
SMALL = dict(n_pretrain=24, n_sft=48, n_test=24, n_preference=24)


def _read(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def _pixel_hash(path):
    a = _pixels(path)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope='module')
def full(tmp_path_factory):
    """The default sizes and 120 preference prompts, generated once."""
    return make_demo_data(str(tmp_path_factory.mktemp('demo_full')), n_preference=120)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp('demo_small')), **SMALL)


def test_layout_and_format(full):
    counts = full['counts']
    assert counts == {'pretrain': 600, 'sft': 1800, 'test': 120, 'preference': 120, 'images': 2640}
    images = sorted(os.listdir(full['images']))
    assert len(images) == counts['images'] and all(n.endswith('.png') for n in images)
    used = set()
    for split in SPLITS:
        assert full[split] == os.path.join(os.path.dirname(full['images']), f'{split}.jsonl')
        records = _read(full[split])
        assert len(records) == counts[split]
        assert len({r['id'] for r in records}) == len(records)
        for r in records:
            assert isinstance(r['id'], str) and isinstance(r['image'], str)
            assert not os.path.isabs(r['image']) and r['image'] not in used
            used.add(r['image'])
            with Image.open(os.path.join(full['images'], r['image'])) as im:
                assert im.format == 'PNG' and im.mode == 'RGB'
                assert list(im.size) == r['meta']['size']
            conv = r['conversations']
            assert [t['from'] for t in conv] == ['human', 'gpt']
            assert conv[0]['value'].startswith('<image>\n') and conv[0]['value'].count('<image>') == 1
            assert conv[0]['value'][len('<image>\n'):].strip()
            answer = conv[1]['value']
            assert answer.strip() == answer and answer
            if split == 'pretrain':
                assert r['kind'] == 'caption' and answer.endswith('.')
            else:
                assert r['kind'] in KINDS and answer in ANSWERS[r['kind']] and ' ' not in answer
    assert used == set(images)


def test_captions_name_the_objects(full):
    for r in _read(full['pretrain']):
        caption = r['conversations'][1]['value']
        objects = r['meta']['objects']
        for o in objects:
            if 'shape' in o:
                assert f"{o['colour']} {o['shape']}" in caption
            else:
                assert f"digit {o['digit']}" in caption and (('small' in caption) == bool(o.get('small')))
        shapes = sum('shape' in o for o in objects)
        if shapes > 1:
            assert caption.startswith(f'{shapes} shapes:')
        if shapes == 1 and all('shape' in o for o in objects):  # a lone shape says where it is
            assert any(w in caption for w in ('on the left', 'on the right', 'in the middle'))


def test_deterministic_and_stale_images_removed(tmp_path):
    a = make_demo_data(str(tmp_path / 'a'), **SMALL, seed=3)
    b = make_demo_data(str(tmp_path / 'b'), **SMALL, seed=3)
    assert a['counts'] == b['counts']
    bytes_a, bytes_b = _tree_bytes(str(tmp_path / 'a')), _tree_bytes(str(tmp_path / 'b'))
    assert len(bytes_a) == sum(SMALL.values()) + 4
    assert bytes_a == bytes_b
    other = make_demo_data(str(tmp_path / 'c'), **SMALL, seed=4)
    assert _tree_bytes(str(tmp_path / 'c')) != bytes_a and other['counts'] == a['counts']

    # Re-running into the same folder with fewer samples leaves exactly the new files (and keeps foreign ones).
    (tmp_path / 'a' / 'images' / 'notes.txt').write_text('mine')
    make_demo_data(str(tmp_path / 'a'), n_pretrain=5, n_sft=6, n_test=7, seed=3)
    names = set(os.listdir(tmp_path / 'a' / 'images'))
    assert len(names) == 5 + 6 + 7 + 1 and 'notes.txt' in names
    # The first samples of each split are the same draws as before only if the split sizes match; the
    # files are still self-consistent:
    for split in SPLITS:
        for r in _read(str(tmp_path / 'a' / f'{split}.jsonl')):
            assert r['image'] in names


def test_test_images_disjoint_from_training(full):
    hashes = {split: [_pixel_hash(os.path.join(full['images'], r['image'])) for r in _read(full[split])]
              for split in SPLITS}
    train = set(hashes['pretrain']) | set(hashes['sft'])
    assert len(train) == len(hashes['pretrain']) + len(hashes['sft'])  # no image twice in training either
    assert len(set(hashes['test'])) == len(hashes['test'])
    assert not train & set(hashes['test'])
    prompts = set(hashes['preference'])  # the preference stage's prompts are new images too
    assert len(prompts) == len(hashes['preference']) and not prompts & (train | set(hashes['test']))


def test_preference_prompts_change_no_other_split(small, tmp_path):
    without = make_demo_data(str(tmp_path / 'without'), **dict(SMALL, n_preference=0))
    for split in ('pretrain', 'sft', 'test'):
        assert _read(without[split]) == _read(small[split])
        for r in _read(small[split]):
            assert _pixel_hash(os.path.join(without['images'], r['image'])) == \
                _pixel_hash(os.path.join(small['images'], r['image']))
    assert _read(without['preference']) == [] and len(_read(small['preference'])) == 24


def test_all_grids_occur(full):
    for split in SPLITS:
        tiles = collections.Counter()
        for r in _read(full[split]):
            w, h = r['meta']['size']
            assert list(choose_grid(w, h, 1, MAX_PATCH, S)) == r['meta']['grid']
            tiles[num_tiles(w, h, 1, MAX_PATCH, S)] += 1
        assert set(tiles) == set(range(1, MAX_PATCH + 1)), (split, tiles)
        assert min(tiles.values()) >= 0.08 * sum(tiles.values()), (split, tiles)


def test_every_sample_loads_through_the_dataset(small, tiny_tokenizer_dir, tmp_path):
    for split in SPLITS:
        ds = InternVLDataset(small[split], image_folders=small['images'], tokenizer=tiny_tokenizer_dir,
                             image_size=S, max_dynamic_patch=MAX_PATCH, max_bad_fraction=0.0,
                             cache_dir=str(tmp_path / 'cache'))
        assert ds.load_problems == [] and len(ds) == small['counts'][split]
        seen = collections.Counter()
        for i in range(len(ds)):
            item = ds[i]
            assert item['pixel_values'].shape[1:] == (3, S, S) and bool(item['image_flags'].all())
            assert (item['labels'] != -100).any()
            seen[item['num_tiles']] += 1
        assert not ds.failures
        # 1 tile alone; 2..6 tiles plus the thumbnail.
        assert set(seen) == {1} | {n + 1 for n in range(2, MAX_PATCH + 1)}, (split, seen)
        assert ds.num_tiles_per_item == [ds[i]['num_tiles'] for i in range(len(ds))]


def test_answers_balanced(full):
    for split in ('sft', 'test', 'preference'):
        per_kind = collections.defaultdict(collections.Counter)
        for q in read_questions(full[split]):
            per_kind[q['kind']][q['answer']] += 1
        assert set(per_kind) == set(KINDS)
        sizes = [sum(c.values()) for c in per_kind.values()]
        assert max(sizes) - min(sizes) <= 1
        for kind, counter in per_kind.items():
            full_counts = [counter.get(a, 0) for a in ANSWERS[kind]]
            assert max(full_counts) - min(full_counts) <= 1, (split, kind, counter)
    # The answer does not follow from the image size: e.g. every count is seen at several tile counts (small
    # digits live in the longest strips only, both orientations: 6x1 and 1x6 here).
    by = collections.defaultdict(set)
    for r in _read(full['sft']):
        by[(r['kind'], r['conversations'][1]['value'])].add(tuple(r['meta']['grid']))
    assert all(len(grids) >= 3 for (kind, _), grids in by.items() if kind != 'small_digit')
    assert all(grids == {(6, 1), (1, 6)} for (kind, _), grids in by.items() if kind == 'small_digit')


def test_questions_do_not_leak_answers(full):
    for split in ('sft', 'test'):
        for q in read_questions(full[split]):
            words = q['question'].lower().replace('?', ' ').replace(',', ' ').replace('.', ' ').split()
            named = {a for a in ANSWERS[q['kind']] if a in words}
            # a question names no answer of its kind, or all of them ("on the left or the right?")
            assert not named or named == set(ANSWERS[q['kind']]), q
            assert not any(ch.isdigit() for ch in q['question']), q


def _mask(pixels, colour):
    return np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1)


def test_answers_match_the_pixels(full):
    for split in ('sft', 'test'):
        for r in _read(full[split]):
            px = _pixels(os.path.join(full['images'], r['image']))
            h, w = px.shape[:2]
            objects, kind, answer = r['meta']['objects'], r['kind'], r['conversations'][1]['value']
            drawn = ~np.all(px == np.array(BACKGROUND, dtype=np.uint8), axis=-1)
            inside = np.zeros((h, w), bool)
            for o in objects:
                x0, y0, x1, y1 = o['box']
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                inside[y0:y1, x0:x1] = True
                if 'shape' in o:
                    fill = _mask(px[y0:y1, x0:x1], COLOURS[o['colour']]).mean()
                    lo, hi = {'circle': (0.7, 0.9), 'square': (0.99, 1.0), 'triangle': (0.4, 0.62)}[o['shape']]
                    assert lo <= fill <= hi, (r['id'], o, fill)
                else:
                    dark = np.all(px[y0:y1, x0:x1] < 100, axis=-1)
                    ys, xs = np.nonzero(dark)
                    assert len(ys) >= 8, (r['id'], o)
                    # the ink fills its cell: the box is a tight cell, not a loose frame
                    assert ys.max() - ys.min() + 1 >= 0.75 * (y1 - y0), (r['id'], o)
            assert not (drawn & ~inside).any(), r['id']  # nothing drawn outside the recorded boxes
            shapes = [o for o in objects if 'shape' in o]
            digits = [o for o in objects if 'digit' in o]
            if kind == 'colour':
                assert len(objects) == 1 and shapes[0]['colour'] == answer
            elif kind == 'shape':
                assert len(objects) == 1 and shapes[0]['shape'] == answer
            elif kind == 'count':
                assert len(objects) == len(shapes) == int(answer)
                assert ndimage.label(drawn, np.ones((3, 3)))[1] == int(answer)  # separate blobs in the pixels too
            elif kind == 'position':
                x0, _, x1, _ = shapes[0]['box']
                assert len(objects) == 1 and (x1 <= w / 2 if answer == 'left' else x0 >= w / 2)
            elif kind == 'digit':
                assert len(objects) == 1 and digits[0]['digit'] == answer and not digits[0].get('small')
            else:
                assert kind == 'small_digit' and len(shapes) == 1 and len(digits) == 1
                assert digits[0]['digit'] == answer and digits[0]['small']


def test_small_digits_only_readable_in_the_tiles(full):
    n = 0
    for split in ('sft', 'test'):
        for r in _read(full[split]):
            w, h = r['meta']['size']
            cols, rows = choose_grid(w, h, 1, MAX_PATCH, S)
            for o in r['meta']['objects']:
                if 'digit' not in o:
                    continue
                x0, y0, x1, y1 = o['box']
                tile_w, tile_h = (x1 - x0) * cols * S / w, (y1 - y0) * rows * S / h
                thumb_w, thumb_h = (x1 - x0) * S / w, (y1 - y0) * S / h
                if o.get('small'):
                    n += 1
                    assert r['kind'] == 'small_digit'
                    assert min(tile_w, tile_h) >= 8 and tile_h <= 21, (r['id'], o)
                    assert min(thumb_w, thumb_h) < 3, (r['id'], o)
                    # inside one token cell (28 px: 2 x 2 patches of 14 px, one LLM token after pixel shuffle) of
                    # one tile (strips are exact: native pixels are tile pixels), so not cut by a tile seam either
                    assert (w, h) == (cols * S, rows * S) and x0 // 28 == (x1 - 1) // 28 and y0 // 28 == (y1 - 1) // 28, \
                        (r['id'], o)
                else:  # a large digit is clearly taller than a small one in the tiles
                    assert tile_h >= 28, (r['id'], o)
    assert n == 300 + 20


def test_answers_are_few_distinct_tokens(tiny_tokenizer):
    for kind, answers in ANSWERS.items():
        ids = [tiny_tokenizer(a, add_special_tokens=False)['input_ids'] for a in answers]
        assert all(1 <= len(i) <= 3 for i in ids), (kind, ids)
        assert len({i[0] for i in ids}) == len(answers), kind  # the first token already decides


def test_chance_accuracy_on_a_hand_made_file(tmp_path, full):
    def line(kind, answer):
        return json.dumps({'id': '0', 'image': 'x.png', 'kind': kind, 'conversations': [
            {'from': 'human', 'value': '<image>\nQ?'}, {'from': 'gpt', 'value': answer}]})

    rows = [('colour', 'red'), ('colour', 'red'), ('colour', 'blue'),
            ('digit', '1'), ('digit', '3'), ('digit', '3'), ('digit', '3'), ('digit', '2'),
            ('position', 'left')]
    path = tmp_path / 'hand.jsonl'
    path.write_text('\n'.join(line(k, a) for k, a in rows) + '\n')
    assert chance_accuracy(str(path)) == pytest.approx((2 + 3 + 1) / 9)
    assert [q['answer'] for q in read_questions(str(path))] == [a for _, a in rows]

    empty = tmp_path / 'empty.jsonl'
    empty.write_text('')
    assert chance_accuracy(str(empty)) == 0.0

    bad = tmp_path / 'bad.jsonl'
    bad.write_text(line('colour', 'red') + '\n' + json.dumps({'id': '1', 'conversations': [
        {'from': 'human', 'value': 'Q?'}, {'from': 'gpt', 'value': 'red'}]}) + '\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:2: no question "kind"'):
        chance_accuracy(str(bad))

    # The default test file: 20 questions per kind, so 5/20 colour, 7/20 shape and count, 10/20 position and
    # 2/20 for each digit kind.
    assert chance_accuracy(full['test']) == pytest.approx((5 + 7 + 7 + 10 + 2 + 2) / 120)


def test_sft_weights_and_extra_questions(tmp_path):
    out = make_demo_data(str(tmp_path), n_pretrain=0, n_sft=144, n_test=24, seed=1,
                         sft_weights={'digit': 3, 'small_digit': 2}, sft_extra_questions=True)
    sft = _read(out['sft'])
    by_kind = collections.Counter(r['kind'] for r in sft)
    assert by_kind == {'digit': 3 * 16, 'small_digit': 2 * 16, 'colour': 16, 'shape': 16, 'count': 16,
                       'position': 16}
    # the test split stays balanced and single-turn
    assert collections.Counter(q['kind'] for q in read_questions(out['test'])) == {k: 4 for k in KINDS}
    n_extra = collections.Counter()
    for r in sft:
        turns = r['conversations']
        assert [t['from'] for t in turns] == ['human', 'gpt'] * (len(turns) // 2)
        assert turns[0]['value'].startswith('<image>\n') and all('<image>' not in t['value'] for t in turns[1:])
        extras = [(turns[i]['value'], turns[i + 1]['value']) for i in range(2, len(turns), 2)]
        if r['kind'] in ('count', 'digit'):
            assert not extras, r
            continue
        shape = next(o for o in r['meta']['objects'] if 'shape' in o)
        w = r['meta']['size'][0]
        side = 'left' if shape['box'][2] <= w / 2 else 'right' if shape['box'][0] >= w / 2 else None
        truth = {'shape': shape['shape'], 'colour': shape['colour'], 'position': side}
        for j, (question, answer) in enumerate(extras):
            kind = next(k for k in ('shape', 'colour', 'position') if question in
                        {t.format(shape=shape['shape'], colour=shape['colour']) for t in QUESTIONS[k]})
            assert kind != r['kind'] and answer == truth[kind], (r, question)
            n_extra[kind] += 1
            # nothing said before gives the answer away
            before = ' '.join(t['value'] for t in turns[:2 + 2 * j]).lower()
            assert answer not in re.findall(r'[a-z0-9]+', before), r
    assert all(n_extra[k] > 10 for k in ('shape', 'colour', 'position')), n_extra
    with pytest.raises(ValueError, match='sft_weights must map kinds'):
        make_demo_data(str(tmp_path / 'bad'), n_sft=4, sft_weights={'digit': 0})


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_sft=-1), 'n_sft must be a non-negative integer'),
    (dict(max_dynamic_patch=3), 'small_digit questions need strips'),
    (dict(kinds=('colour', 'size')), 'kinds must be distinct names'),
    (dict(tile_size=8), 'tile_size must be an integer >= 28'),
    (dict(token_px=24), 'token_px must be a positive integer dividing tile_size=56'),
    (dict(tile_size=112, token_px=14), 'need a digit that fits a token cell of token_px=14 px'),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_demo_data(str(tmp_path), **kwargs)


def test_fewer_kinds_and_tiles(tmp_path):
    out = make_demo_data(str(tmp_path), n_pretrain=4, n_sft=12, n_test=6, max_dynamic_patch=3,
                         kinds=('colour', 'count'))
    questions = read_questions(out['sft'])
    assert collections.Counter(q['kind'] for q in questions) == {'colour': 6, 'count': 6}
    for r in _read(out['sft']):
        assert num_tiles(*r['meta']['size'], 1, 3, S) <= 3
