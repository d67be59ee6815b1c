"""Preference pairs (MMPR and the conversation form): both answers share the prompt's tokens and tiles, only the
answers are supervised, bad pairs are named and counted, and the collate makes chosen rows then rejected rows."""

import torch

from tests.helpers import write_image, write_jsonl
from xtuner_plugins.data.preference import InternVLPreferenceDataset, preference_collate_fn
from xtuner_plugins.data.template import IGNORE_INDEX, IMG_CONTEXT_TOKEN

S = 28


def make(path, tokenizer, tmp_path, **kw):
    kw.setdefault('image_size', S)
    kw.setdefault('patch_size', 14)
    kw.setdefault('max_length', 4096)
    return InternVLPreferenceDataset(path, tokenizer=tokenizer, cache_dir=str(tmp_path / 'cache'),
                                     image_folders=str(tmp_path / 'i'), **kw)


def answer(side, tokenizer):
    return tokenizer.decode([i for i, l in zip(side['input_ids'].tolist(), side['labels'].tolist())
                             if l != IGNORE_INDEX])


def test_mmpr_and_conversation_pairs_share_the_prompt_and_the_tiles(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png', size=(3 * S, S))
    lines = [{'image': 'a.png', 'question': '<image>\nWhat colour?', 'chosen': 'Red.', 'rejected': 'Blue, I think.'},
             {'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello'},
                                {'from': 'human', 'value': 'Say yes.'}], 'chosen': 'Yes.', 'rejected': 'No.'}]
    ds = make(write_jsonl(tmp_path / 'p.jsonl', lines), tiny_tokenizer, tmp_path)
    item = ds[0]
    chosen, rejected = item['chosen'], item['rejected']
    start = chosen['labels'].ne(IGNORE_INDEX).nonzero()[0].item()
    assert torch.equal(chosen['input_ids'][:start], rejected['input_ids'][:start])  # the same prompt
    assert rejected['labels'][:start].eq(IGNORE_INDEX).all()
    assert answer(chosen, tiny_tokenizer) == 'Red.<|im_end|>' and answer(rejected, tiny_tokenizer) == \
        'Blue, I think.<|im_end|>'
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert item['pixel_values'].shape[0] == 4 and int(chosen['input_ids'].eq(ctx).sum()) == 4  # 3 tiles + thumb
    text = ds[1]
    assert answer(text['chosen'], tiny_tokenizer) == 'Yes.<|im_end|>' and text['image_flags'].tolist() == [0]
    assert 'Hello' in tiny_tokenizer.decode(text['rejected']['input_ids'])  # the context turns are kept


def test_bad_pairs_are_named_and_counted(tmp_path, tiny_tokenizer):
    good = {'question': 'Q?', 'chosen': 'A', 'rejected': 'B'}
    lines = [good, {'question': 'Q?', 'chosen': 'A'}, {'question': 'Q?', 'chosen': 'Same', 'rejected': ' Same '},
             {'conversations': [{'from': 'human', 'value': 'x'}, {'from': 'gpt', 'value': 'y'}], 'chosen': 'A',
              'rejected': 'B'}] + [good] * 6
    path = write_jsonl(tmp_path / 'p.jsonl', lines)
    (tmp_path / 'i').mkdir()
    ds = make(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.5)
    assert len(ds) == 7
    assert [(p.source, p.reason) for p in ds.load_problems] == [(f'{path}:{n}', 'bad_pair') for n in (2, 3, 4)]
    assert 'no rejected answer' in str(ds.load_problems[0]) and 'the same answer' in str(ds.load_problems[1])
    assert 'must end with a human turn' in str(ds.load_problems[2])


def test_a_pair_whose_answers_differ_only_where_the_tokenizer_normalises_is_a_bad_pair(tmp_path, tiny_tokenizer):
    """'café' composed and 'cafe' + a combining accent: other texts, the same tokens (the tokenizer writes NFC, as
    Qwen2's does), a pair that trains nothing (its margin always 0), kept as a pair."""
    (tmp_path / 'i').mkdir()
    lines = [{'question': 'Q?', 'chosen': 'caf\u00e9', 'rejected': 'cafe\u0301'},
             {'question': 'Q?', 'chosen': 'caf\u00e9', 'rejected': 'cafe'}]
    path = write_jsonl(tmp_path / 'p.jsonl', lines)
    assert tiny_tokenizer('caf\u00e9')['input_ids'] == tiny_tokenizer('cafe\u0301')['input_ids']
    ds = make(path, tiny_tokenizer, tmp_path, max_bad_fraction=1)
    assert ds[0]['skipped'] == [(f'{path}:1', 'bad_pair')] and ds.failed == {f'{path}:1': 'bad_pair'}
    assert not ds[1]['skipped']   # other tokens: a pair


def test_other_tools_pair_layouts_say_what_is_read(tmp_path, tiny_tokenizer):
    """LLaMA-Factory's {"from", "value"} answers were 'no chosen and no rejected answer' (they are there); TRL's
    "prompt" was 'the prompt must end with a human turn'."""
    good = {'question': 'Q?', 'chosen': 'A', 'rejected': 'B'}
    lines = [{'question': 'Q?', 'chosen': {'from': 'gpt', 'value': 'A'}, 'rejected': {'from': 'gpt', 'value': 'B'}},
             {'prompt': 'Q?', 'chosen': 'A', 'rejected': 'B'}] + [good] * 6
    path = write_jsonl(tmp_path / 'p.jsonl', lines)
    (tmp_path / 'i').mkdir()
    ds = make(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.5)
    first, second = (str(p) for p in ds.load_problems)
    assert '"chosen" is a dict ({"from": "gpt", "value": "A"}): a pair\'s chosen and rejected are the answers\' ' \
           'text' in first
    assert 'no "question": "prompt" (TRL\'s key) is not read' in second


def test_a_pair_in_another_layout_says_what_is_wrong(tmp_path, tiny_tokenizer):
    """A top-level "system" was dropped without a word (the default system message trained), as the SFT reader
    dropped it: both now read it as the first turn (one beside a system turn is refused); OpenAI's role/content
    turns were 'the prompt must end with a human turn'; "Chosen" / "Rejected" were 'no chosen and no rejected
    answer'."""
    good = {'question': 'Q?', 'chosen': 'A', 'rejected': 'B'}
    pirate = {'from': 'system', 'value': 'You are a pirate.'}
    lines = [dict(good, system='You are a pirate.'),
             {'conversations': [{'role': 'user', 'content': 'Q?'}], 'chosen': 'A', 'rejected': 'B'},
             {'question': 'Q?', 'Chosen': 'A', 'Rejected': 'B'},
             {'conversations': [pirate], **good},
             {'conversations': [pirate], 'system': 'You are a cat.', **good}] + [good] * 8
    path = write_jsonl(tmp_path / 'p.jsonl', lines)
    (tmp_path / 'i').mkdir()
    ds = make(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.5)
    openai, capitals, twice = (str(p) for p in ds.load_problems)
    assert 'p.jsonl:5: a top-level "system" ("You are a cat.") and a first "system" turn: give the system message ' \
           'once' in twice
    assert [ds[0][k]['input_ids'].tolist() for k in ('chosen', 'rejected')] == \
        [ds[1][k]['input_ids'].tolist() for k in ('chosen', 'rejected')]   # read as the turn it is, in both answers
    assert 'p.jsonl:2: turn 0 must be a dict with "from" and "value" (OpenAI\'s "role" / "content" keys are not ' \
           'this format\'s: its turns are {"from": "human" | "gpt" | "system", "value": TEXT}' in openai
    assert 'p.jsonl:3: no chosen and no rejected answer (a pair needs both, as text); the keys are lower case, ' \
           '"chosen" and "rejected", not "Chosen" and "Rejected"' in capitals
    assert 'You are a pirate.' in tiny_tokenizer.decode(ds[0]['chosen']['input_ids'])   # the system turn's way


def test_an_answer_that_is_a_number_or_a_boolean_is_said_to_be_no_text(tmp_path, tiny_tokenizer):
    """``"chosen": 5`` (or ``true``, ``1e308``) was 'no chosen answer', where there is one, of another type."""
    good = {'question': 'Q?', 'chosen': 'A', 'rejected': 'B'}
    lines = [dict(good, chosen=5), dict(good, rejected=True), dict(good, chosen=1e308)] + [good] * 6
    path = write_jsonl(tmp_path / 'p.jsonl', lines)
    (tmp_path / 'i').mkdir()
    ds = make(path, tiny_tokenizer, tmp_path, max_bad_fraction=0.5)
    said = [str(p) for p in ds.load_problems]
    assert said == [f'{path}:1: "chosen" is a number (5), not text: a pair\'s chosen and rejected are the answers\' '
                    f'text [bad_pair]',
                    f'{path}:2: "rejected" is true or false (true), not text: a pair\'s chosen and rejected are the '
                    f'answers\' text [bad_pair]',
                    f'{path}:3: "chosen" is a number (1e+308), not text: a pair\'s chosen and rejected are the '
                    f'answers\' text [bad_pair]'], said


def test_a_long_answer_gives_both_answers_fewer_tiles(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'big.png', size=(S * 8, S * 5))  # 40 tiles + thumbnail
    short = {'image': 'big.png', 'question': 'What?', 'chosen': 'A', 'rejected': 'B'}
    budget = len(make(write_jsonl(tmp_path / 's.jsonl', [short]), tiny_tokenizer, tmp_path, max_dynamic_patch=40,
                      max_length=None)[0]['rejected']['input_ids'])
    long_pair = dict(short, rejected='word ' * 20)
    ds = make(write_jsonl(tmp_path / 'p.jsonl', [long_pair]), tiny_tokenizer, tmp_path, max_dynamic_patch=40,
              max_length=budget)
    item = ds[0]
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    tiles = item['pixel_values'].shape[0]
    assert tiles < 41 and ds.reduced
    assert int(item['chosen']['input_ids'].eq(ctx).sum()) == int(item['rejected']['input_ids'].eq(ctx).sum()) == tiles
    assert answer(item['rejected'], tiny_tokenizer).startswith('word word')


def test_collate_puts_the_chosen_rows_first(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png', size=(S, S))
    lines = [{'image': 'a.png', 'question': 'Q?', 'chosen': 'Yes', 'rejected': 'A much longer no.'},
             {'question': 'Q2?', 'chosen': 'Right', 'rejected': 'Wrong'}]
    ds = make(write_jsonl(tmp_path / 'p.jsonl', lines), tiny_tokenizer, tmp_path)
    items = [ds[0], ds[1]]
    data = preference_collate_fn(items)['data']
    assert data['num_pairs'] == 2 and data['input_ids'].shape[0] == 4
    rows = [items[0]['chosen'], items[1]['chosen'], items[0]['rejected'], items[1]['rejected']]
    for row, side in zip(data['input_ids'], rows):
        assert torch.equal(row[:len(side['input_ids'])], side['input_ids'])
    assert data['image_flags'].tolist() == [1, 0, 1, 0]  # each row its copy of the tiles
    assert data['samples'] == [f'{tmp_path}/p.jsonl:1', f'{tmp_path}/p.jsonl:2'] * 2


def test_pairs_pack_alike_and_are_as_long_as_their_longer_answer(tmp_path, tiny_tokenizer):
    from xtuner_plugins.data.packing import PackedInternVLDataset
    write_image(tmp_path / 'i' / 'a.png', size=(2 * S, S))
    lines = [{'image': 'a.png', 'question': 'Q?', 'chosen': 'Yes', 'rejected': 'A much longer no, truly longer.'},
             {'question': 'Q2?', 'chosen': 'Right, and a long answer at that', 'rejected': 'Wrong'},
             {'image': 'a.png', 'question': 'Q3?', 'chosen': 'C', 'rejected': 'R'}]
    ds = make(write_jsonl(tmp_path / 'p.jsonl', lines), tiny_tokenizer, tmp_path)
    items = [ds[i] for i in range(3)]
    assert ds.length == [max(len(x['chosen']['input_ids']), len(x['rejected']['input_ids'])) for x in items]
    item = PackedInternVLDataset(ds, max_tokens=10 ** 6, shuffle=False)[0]
    for side in ('chosen', 'rejected'):  # both rows pack the same pairs in the same order
        assert item[side]['seq_lens'].tolist() == [len(x[side]['input_ids']) for x in items]
        for key in ('input_ids', 'labels'):
            assert torch.equal(item[side][key], torch.cat([x[side][key] for x in items]))
    assert torch.equal(item['pixel_values'], torch.cat([x['pixel_values'] for x in items]))
    data = preference_collate_fn([item])['data']
    assert data['num_pairs'] == 1 and data['input_ids'].shape[0] == 2
    assert [s.tolist() for s in data['seq_lens']] == [item['chosen']['seq_lens'].tolist(),
                                                     item['rejected']['seq_lens'].tolist()]
    # the budget holds for both rows: packs are sized by each pair's longer answer
    budget = max(ds.length) + 2
    packed = PackedInternVLDataset(ds, max_tokens=budget, shuffle=False)
    assert len(packed) > 1
    for i in range(len(packed)):
        assert all(int(packed[i][side]['seq_lens'].sum()) <= budget for side in ('chosen', 'rejected'))


def pair_lines(prefix_words=30):
    common = 'the same words ' * prefix_words
    return [{'question': 'Q?', 'chosen': common + 'so A.', 'rejected': common + 'so B.'},   # differ at the end
            {'question': 'Q?', 'chosen': 'word ' * 100, 'rejected': 'No.'},              # one long answer
            {'question': 'Q?', 'chosen': 'Yes.', 'rejected': 'No.'}]


def test_a_pair_cut_to_the_same_answers_is_a_bad_pair(tmp_path, tiny_tokenizer):
    (tmp_path / 'i').mkdir()
    path = write_jsonl(tmp_path / 'p.jsonl', pair_lines())
    whole = make(path, tiny_tokenizer, tmp_path, max_length=None)
    prompt = int(whole[2]['chosen']['labels'].ne(IGNORE_INDEX).nonzero()[0])  # where the answers start
    ds = make(path, tiny_tokenizer, tmp_path, max_length=prompt + 20, max_bad_fraction=1)
    item = ds[0]  # the 90 common words cut at 20 tokens: the same answer twice
    assert item['skipped'] == [(f'{path}:1', 'bad_pair')]
    assert ds.failed == {f'{path}:1': 'bad_pair'} and 'truncated' not in ds.failures


def test_an_unbalanced_cut_of_a_pair_is_counted_and_named(tmp_path, tiny_tokenizer):
    (tmp_path / 'i').mkdir()
    path = write_jsonl(tmp_path / 'p.jsonl', pair_lines())
    whole = make(path, tiny_tokenizer, tmp_path, max_length=None)
    prompt = int(whole[2]['chosen']['labels'].ne(IGNORE_INDEX).nonzero()[0])
    chosen_answer, rejected_answer = (int(whole[1][side]['labels'].ne(IGNORE_INDEX).sum())
                                      for side in ('chosen', 'rejected'))
    ds = make(path, tiny_tokenizer, tmp_path, max_length=prompt + 20)
    item = ds[1]
    ((where, lost, detail),) = item['truncated']
    assert where == f'{path}:2' and lost == len(whole[1]['chosen']['input_ids']) - (prompt + 20)
    assert detail == (f'pair cut to max_length={prompt + 20}: chosen keeps 20 of {chosen_answer} answer tokens, '
                      f'rejected whole ({rejected_answer} answer tokens); unbalanced: a cut answer against a whole one')
    assert int(item['chosen']['labels'].ne(IGNORE_INDEX).sum()) == 20
    data = preference_collate_fn([item, ds[2]])['data']
    assert data['truncated'] == [(where, lost, detail)]
    dropping = make(path, tiny_tokenizer, tmp_path, max_length=prompt + 20, truncation='drop', max_bad_fraction=1)
    assert dropping[1]['skipped'][0] == (f'{path}:2', 'truncated')  # then a replacement, maybe line 1 (bad_pair)


def test_online_packing_refuses_pairs_in_one_line(tmp_path, tiny_tokenizer):
    """Pairs under online packing ended the first step with KeyError: 'input_ids'; offline packing packs them."""
    import pytest

    from xtuner_plugins.data.online_packing import OnlinePackedDataset
    write_image(tmp_path / 'i' / 'a.png', size=(S, S))
    ds = make(write_jsonl(tmp_path / 'p.jsonl', [{'image': 'a.png', 'question': '<image>\nWhat?', 'chosen': 'A.',
                                                  'rejected': 'B.'}]), tiny_tokenizer, tmp_path)
    with pytest.raises(ValueError, match='online packing takes samples, not preference pairs: pack pairs offline'):
        OnlinePackedDataset(ds, max_tokens=512)
