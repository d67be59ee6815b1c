"""The demo's preference pairs (xtuner_plugins.demo.preference): the rejected answer is the model's own wrong
answer where it gave one (on-policy), else a random wrong answer of the question's kind; never the chosen one.
The held-out accuracy itself is tested with the shortened demo (tests/demo/test_demo.py)."""

import json
import os

import pytest

from xtuner_plugins.demo import ANSWERS, make_demo_data
from xtuner_plugins.demo.preference import make_pairs, wrong_answers


def _read(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # extra questions on: the pair is made of the first question, not the last
    return make_demo_data(str(tmp_path_factory.mktemp('demo')), n_pretrain=0, n_sft=36, n_test=0,
                          sft_extra_questions=True)


class FakeAnswerer:
    """Answers like a converted model (``reset`` / ``ask``), from a table: image file -> answer; records what it
    was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def reset(self):
        pass

    def ask(self, question, images, generation=None):
        assert len(images) == 1 and os.path.isfile(images[0]) and generation['do_sample'] is False
        self.asked.append((question, os.path.basename(images[0])))
        return self.table[os.path.basename(images[0])]


def _answers(samples):
    """A fake model's answers: every third sample a wrong answer of its kind, one of them empty, one with
    another case than the reference (right, by the scorer), the rest right."""
    table = {}
    for i, s in enumerate(samples):
        right = s['conversations'][1]['value']
        if i % 3 == 0:
            table[s['image']] = [a for a in ANSWERS[s['kind']] if a != right][i % (len(ANSWERS[s['kind']]) - 1)]
        else:
            table[s['image']] = right
    table[samples[3]['image']] = ''             # nothing said: not a rejected answer
    table[samples[1]['image']] = table[samples[1]['image']].upper() + '.'  # right after normalisation
    return table


def test_the_models_wrong_answer_becomes_the_rejected_one(data, tmp_path):
    samples = _read(data['sft'])
    assert any(len(s['conversations']) > 2 for s in samples)
    model = FakeAnswerer(_answers(samples))
    own, asked = wrong_answers(model, data['sft'], data['images'], max_new_tokens=4)
    assert asked == len(samples) == len(model.asked)
    # the first question of each sample, with its image
    assert model.asked == [(s['conversations'][0]['value'], s['image']) for s in samples]
    expect = {s['id']: model.table[s['image']] for i, s in enumerate(samples) if i % 3 == 0 and i != 3}
    assert own == expect and len(own) == 11

    random_only = tmp_path / 'random.jsonl'
    on_policy = tmp_path / 'on_policy.jsonl'
    assert make_pairs(data['sft'], str(random_only), seed=0) == len(samples)
    assert make_pairs(data['sft'], str(on_policy), seed=0, rejected=own) == len(samples)
    plain, pairs = _read(random_only), _read(on_policy)
    for sample, base, pair in zip(samples, plain, pairs):
        right = sample['conversations'][1]['value']
        assert pair['chosen'] == base['chosen'] == right
        assert pair['question'] == sample['conversations'][0]['value'] and pair['image'] == sample['image']
        assert pair['rejected'] != pair['chosen'] and base['rejected'] != base['chosen']
        if sample['id'] in own:
            assert pair['rejected'] == own[sample['id']]
        else:  # the fallback: the same random wrong answer of its kind as without the model's answers
            assert pair['rejected'] == base['rejected'] and pair['rejected'] in ANSWERS[sample['kind']]
    # the random ones vary (not always the first wrong answer)
    assert len({(p['kind'], p['rejected']) for p in plain}) > len(ANSWERS)


def test_limit_and_bad_rejected_answers(data, tmp_path):
    samples = _read(data['sft'])
    model = FakeAnswerer({s['image']: 'nonsense' for s in samples})
    own, asked = wrong_answers(model, data['sft'], data['images'], limit=10)
    assert asked == 10 == len(model.asked) and set(own) == {s['id'] for s in samples[:10]}
    out = tmp_path / 'pairs.jsonl'
    # a "wrong" answer that is the right one, or blank, never becomes the rejected one
    bad = {samples[0]['id']: samples[0]['conversations'][1]['value'], samples[1]['id']: '  '}
    assert make_pairs(data['sft'], str(out), rejected=dict(own, **bad), limit=10) == 10
    pairs = _read(out)
    assert [p['id'] for p in pairs] == [s['id'] for s in samples[:10]]
    assert all(p['rejected'] != p['chosen'] for p in pairs)
    assert [p['rejected'] == 'nonsense' for p in pairs] == [False, False] + [True] * 8


def test_repeated_id_is_named(data, tmp_path):
    lines = open(data['sft'], encoding='utf-8').read().splitlines()
    path = tmp_path / 'dup.jsonl'
    path.write_text('\n'.join(lines[:3] + [lines[1]]) + '\n')
    with pytest.raises(ValueError, match=r'dup\.jsonl:4: id .* repeats line 2'):
        wrong_answers(FakeAnswerer({}), str(path), data['images'])
