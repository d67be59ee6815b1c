"""The demo's preference pairs (xtuner_plugins.demo.preference): the rejected answers are the model's own wrong
answers, greedy and sampled as MMPR draws them (on-policy), one pair each up to a cap, else a random wrong
answer of the question's kind; never the chosen one. The held-out accuracy itself is tested with the shortened
demo (tests/demo/test_demo.py)."""

import json
import os

import pytest

from xtuner_plugins.demo import ANSWERS, make_demo_data
from xtuner_plugins.demo.preference import make_pairs, pair_counts, wrong_answers


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
    expect = {s['id']: [model.table[s['image']]] for i, s in enumerate(samples) if i % 3 == 0 and i != 3}
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
            assert [pair['rejected'], pair['source']] == [own[sample['id']][0], 'model']
        else:  # the fallback: the same random wrong answer of its kind as without the model's answers
            assert pair['rejected'] == base['rejected'] and pair['rejected'] in ANSWERS[sample['kind']]
            assert pair['source'] == base['source'] == 'random'
    # the random ones vary (not always the first wrong answer)
    assert len({(p['kind'], p['rejected']) for p in plain}) > len(ANSWERS)


def test_limit_and_bad_rejected_answers(data, tmp_path):
    samples = _read(data['sft'])
    model = FakeAnswerer({s['image']: 'nonsense' for s in samples})
    own, asked = wrong_answers(model, data['sft'], data['images'], limit=10)
    assert asked == 10 == len(model.asked) and own == {s['id']: ['nonsense'] for s in samples[:10]}
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


class FakeSampler(FakeAnswerer):
    """Greedy answers from ``table``; sampled ones (``ask_batch`` with ``do_sample``) from ``drawn``: image file
    -> the answers its question gets, in turn."""

    def __init__(self, table, drawn):
        super().__init__(table)
        self.drawn, self.batches = {k: iter(v) for k, v in drawn.items()}, []

    def ask_batch(self, questions, images, generation):
        if not generation['do_sample']:
            return [self.ask(q, i, generation) for q, i in zip(questions, images)]
        assert generation['temperature'] == 0.7
        self.batches.append([os.path.basename(i[0]) for i in images])
        return [next(self.drawn[os.path.basename(i[0])]) for i in images]


def test_sampled_wrong_answers_become_pairs_as_mmpr_draws_them(data, tmp_path):
    every = _read(data['sft'])
    first = next(s for s in every if len(ANSWERS[s['kind']]) >= 4)   # three wrong answers
    samples = [first] + [s for s in every if len(ANSWERS[s['kind']]) >= 3 and s is not first][:2]
    path = tmp_path / 'three.jsonl'
    path.write_text(''.join(json.dumps(s) + '\n' for s in samples))
    right = [s['conversations'][1]['value'] for s in samples]
    wrong = [[a for a in ANSWERS[s['kind']] if a != r] for s, r in zip(samples, right)]
    a, b, c = (s['image'] for s in samples)
    model = FakeSampler(
        {a: wrong[0][0], b: right[1], c: right[2]},
        # a: the greedy answer again (another case: the same answer), its second wrong answer thrice, its
        # third once, a blank and the right one; b: always right; c: once wrong
        {a: [right[0].upper(), wrong[0][1], wrong[0][1], wrong[0][0].upper() + '.', wrong[0][2], ' ', wrong[0][1],
             right[0]],
         b: [right[1]] * 8, c: [right[2]] * 7 + [wrong[2][1]]})
    own, asked = wrong_answers(model, str(path), data['images'], samples=8, temperature=0.7, batch_size=2)
    assert asked == 3 and len(model.asked) == 3   # greedy: once each
    # sampled: each question 8 times, 2 questions a batch
    assert model.batches == [[a] * 8 + [b] * 8, [c] * 8]
    ids = [s['id'] for s in samples]
    # greedy first, then the most often drawn; the same answer once, blanks and right ones never
    assert own == {ids[0]: [wrong[0][0], wrong[0][1], wrong[0][2]], ids[2]: [wrong[2][1]]}

    out = tmp_path / 'pairs.jsonl'
    assert make_pairs(str(path), str(out), rejected=own, per_prompt=2) == 4
    pairs = _read(out)
    assert [(p['id'], p['rejected'], p['source']) for p in pairs[:2]] == [
        (ids[0], wrong[0][0], 'model'), (ids[0], wrong[0][1], 'model')]
    assert pairs[2]['id'] == ids[1] and pairs[2]['source'] == 'random' and pairs[2]['rejected'] in wrong[1]
    assert (pairs[3]['id'], pairs[3]['rejected'], pairs[3]['source']) == (ids[2], wrong[2][1], 'model')
    assert all(p['chosen'] == right[ids.index(p['id'])] for p in pairs)
    counts = pair_counts(str(out))
    assert sum(k['model'] for k in counts.values()) == 3 and sum(k['random'] for k in counts.values()) == 1
    assert sum(k['prompts'] for k in counts.values()) == 3
    # no fallback: the question the model never got wrong has no pair
    assert make_pairs(str(path), str(out), rejected=own, per_prompt=5, fallback=False) == 4
    assert [p['id'] for p in _read(out)] == [ids[0]] * 3 + [ids[2]]


def test_kind_changes_shows_a_loss_that_the_total_hides():
    from xtuner_plugins.demo.scoring import Answer, accuracy, kind_changes

    def answers(right):   # right: {kind: questions right of 3}
        return [Answer(f'{k}{i}', k, 'q', 'a', 'a' if i < n else 'b', score=float(i < n))
                for k, n in right.items() for i in range(3)]
    before, after = answers({'colour': 3, 'digit': 1}), answers({'colour': 1, 'digit': 3})
    assert accuracy(before) == accuracy(after)
    rows = [line.split() for line in kind_changes(before, after).splitlines()]
    assert rows == [['kind', 'questions', 'before', 'after', 'change'], ['colour', '3', '3', '1', '-2'],
                    ['digit', '3', '1', '3', '+2']]


def test_random_pairs_add_to_on_policy_ones(data, tmp_path):
    samples = _read(data['sft'])
    # the model wrong on every other sample, with the first wrong answer of its kind
    own = {s['id']: [[a for a in ANSWERS[s['kind']] if a != s['conversations'][1]['value']][0]]
           for s in samples[::2]}
    plain, mixed = tmp_path / 'plain.jsonl', tmp_path / 'mixed.jsonl'
    make_pairs(data['sft'], str(plain), rejected=own)
    make_pairs(data["sft"], str(mixed), rejected=own, random_pairs=1)
    randoms = {p['id']: p['rejected'] for p in _read(plain) if p['source'] == 'random'}
    pairs = _read(mixed)
    assert [p for p in pairs if p['source'] == 'model'] == [p for p in _read(plain) if p['source'] == 'model']
    # the same random draw as without the model's answers, unless it is the model's own answer
    fresh = tmp_path / 'fresh.jsonl'
    make_pairs(data['sft'], str(fresh))
    drawn = {p['id']: p['rejected'] for p in _read(fresh)}
    for s in samples:
        got = [p['rejected'] for p in pairs if p['id'] == s['id'] and p['source'] == 'random']
        if s['id'] not in own:
            assert got == [randoms[s['id']]] == [drawn[s['id']]]
        elif drawn[s['id']] in own[s['id']]:   # another one, not the model's (none left: position has 2 answers)
            assert len(got) == min(1, len(ANSWERS[s['kind']]) - 2)
            assert not set(got) & set(own[s['id']] + [s['conversations'][1]['value']])
        else:
            assert got == [drawn[s['id']]]
    assert sum(p['source'] == 'random' for p in pairs) > len(samples) * 3 // 4
    # two random pairs a prompt: distinct, the first as with one
    two = tmp_path / 'two.jsonl'
    make_pairs(data['sft'], str(two), rejected=own, random_pairs=2)
    for s in samples:
        got = [p['rejected'] for p in _read(two) if p['id'] == s['id'] and p['source'] == 'random']
        one = [p['rejected'] for p in pairs if p['id'] == s['id'] and p['source'] == 'random']
        assert got[:1] == one and len(set(got)) == len(got) == min(2, len(ANSWERS[s['kind']]) - 1 -
                                                                     len(own.get(s['id'], [])))
