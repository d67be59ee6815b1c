"""What max_length does to a sample (data/fitting.py): an answer cut is counted as ``truncated`` with the tokens
it lost, kept or dropped by the data set's ``truncation``; a cut of the unsupervised tail only is no truncation."""

import pytest

from tests.data.test_dataset import answer_of, make_ds
from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data.collate import internvl_collate_fn
from xtuner_plugins.data.tokenize import tokenize_conversation

LONG = conv('Tell me everything.', 'word ' * 200, image=False)
SHORT = conv('Hi?', 'Hello.', image=False)


def lengths(tokenizer, conversation):
    out = tokenize_conversation(conversation, tokenizer, [])
    return len(out['input_ids']), sum(x != -100 for x in out['labels'])


def test_an_answer_cut_by_max_length_is_counted_with_the_tokens_lost(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': LONG}, {'conversations': SHORT}])
    full, supervised = lengths(tiny_tokenizer, LONG)
    budget = full - 150
    ds = make_ds(path, tiny_tokenizer, tmp_path, max_length=budget)
    item = ds[0]
    assert len(item['input_ids']) == budget and answer_of(item, tiny_tokenizer).startswith('word word')
    ((where, lost, detail),) = item['truncated']
    assert (where, lost) == (f'{path}:1', 150) and ds.truncated == {f'{path}:1': 150}
    assert detail == f'{full} tokens cut to max_length={budget}: 150 tokens lost, 149 of its {supervised} supervised'
    assert 'truncated' not in ds[1] and ds.failures == {}
    batch = internvl_collate_fn([ds[0], ds[1]])['data']
    assert batch['truncated'] == [(f'{path}:1', 150, detail)]


def test_an_answer_too_long_to_tokenise_whole_is_clipped_and_its_counts_are_said_to_be_lower_bounds(
        tmp_path, tiny_tokenizer):
    """A turn far past max_length is clipped before it is tokenised (tokenize.encode_turns): the sample trains on
    the same tokens as the whole answer gives, and its cut says its counts are at least these."""
    from xtuner_plugins.data.tokenize import CLIP_MARGIN, clip_chars
    huge = conv('Tell me everything.', ' colour square' * 40_000, image=False)
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': huge}])
    ds = make_ds(path, tiny_tokenizer, tmp_path, max_length=300)
    item = ds[0]
    whole = tokenize_conversation(huge, tiny_tokenizer, [], max_length=300)
    assert item['input_ids'].tolist() == whole['input_ids'] and item['labels'].tolist() == whole['labels']
    ((_, lost, detail),) = item['truncated']
    bound = clip_chars(tiny_tokenizer, 300) - CLIP_MARGIN
    assert detail.endswith(f'(at least: a turn over {bound} characters is clipped before it is tokenised)'), detail
    assert 0 < lost < len(tokenize_conversation(huge, tiny_tokenizer, [])['input_ids']) - 300


def test_truncation_drop_skips_the_sample_with_its_reason(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': LONG}, {'conversations': SHORT}])
    full, _ = lengths(tiny_tokenizer, LONG)
    ds = make_ds(path, tiny_tokenizer, tmp_path, max_length=full - 150, truncation='drop', max_bad_fraction=1)
    item = ds[0]
    assert item['skipped'] == [(f'{path}:1', 'truncated')] and answer_of(item, tiny_tokenizer) == 'Hello.<|im_end|>'
    assert ds.failures == {'truncated': 1} and ds.truncated == {}
    with pytest.raises(ValueError, match="truncation='cut'; use one of"):
        make_ds(path, tiny_tokenizer, tmp_path, truncation='cut')


def test_a_cut_of_the_unsupervised_tail_only_is_no_truncation(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': SHORT}])
    full, _ = lengths(tiny_tokenizer, SHORT)
    ds = make_ds(path, tiny_tokenizer, tmp_path, max_length=full - 1, truncation='drop')  # the final '\n'
    item = ds[0]
    assert len(item['input_ids']) == full - 1 and 'truncated' not in item and item['skipped'] == []


def test_fewer_tiles_first_then_the_cut_is_decided_once(tmp_path, tiny_tokenizer):
    """A sample too long with its 41 tiles gets one tile and its answer cut: fit() says so without pixels, and
    the loaded item has exactly those tiles and tokens."""
    write_image(tmp_path / 'i' / 'big.png', size=(28 * 8, 28 * 5))
    sample = {'image': 'big.png', 'conversations': conv('What?', 'word ' * 100)}
    path = write_jsonl(tmp_path / 'a.jsonl', [sample])
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_dynamic_patch=40,
                 max_length=200)
    record = ds.records[0]
    fit = ds.fit(record, ds.check_record(record), [(28 * 8, 28 * 5)])
    n = fit.cuts[0].length
    assert fit.reduced and fit.max_num == 1 and fit.tiles == [1] and n > 200
    assert fit.truncated.startswith(f'{n} tokens cut to max_length=200: {n - 200} tokens lost')
    item = ds[0]
    assert item['num_tiles'] == 1 and item['input_ids'].tolist() == fit.encoded[0]['input_ids']
    assert item['reduced'] == [(f'{path}:1', 1)] and item['truncated'][0][1] == fit.tokens_lost > 0
