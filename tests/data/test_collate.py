import pytest
import torch

from xtuner_plugins.data.collate import internvl_collate_fn


def item(n_tokens, n_tiles, flag=1, start=1):
    ids = torch.arange(start, start + n_tokens)
    labels = ids.clone()
    labels[: n_tokens // 2] = -100
    pixels = torch.full((n_tiles, 3, 4, 4), start, dtype=torch.uint8)
    return dict(input_ids=ids, labels=labels, pixel_values=pixels,
                image_flags=torch.full((n_tiles,), flag, dtype=torch.long), num_tiles=n_tiles)


def test_pads_and_concatenates_in_order():
    batch = internvl_collate_fn([item(5, 3, start=10), item(2, 1, flag=0, start=50), item(4, 2, start=90)],
                                pad_token_id=7)
    assert batch['data_samples'] is None
    d = batch['data']
    assert d['input_ids'].tolist() == [[10, 11, 12, 13, 14], [50, 51, 7, 7, 7], [90, 91, 92, 93, 7]]
    assert d['labels'].tolist() == [[-100, -100, 12, 13, 14], [-100, 51, -100, -100, -100],
                                    [-100, -100, 92, 93, -100]]
    assert d['attention_mask'].tolist() == [[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]]
    assert d['pixel_values'].dtype == torch.uint8 and d['pixel_values'].shape == (6, 3, 4, 4)
    assert d['pixel_values'][:, 0, 0, 0].tolist() == [10, 10, 10, 50, 90, 90]  # sample after sample
    assert d['image_flags'].tolist() == [1, 1, 1, 0, 1, 1]
    assert d['num_tiles'].tolist() == [3, 1, 2]


def test_pad_to_multiple_of():
    d = internvl_collate_fn([item(5, 1)], pad_to_multiple_of=8)['data']
    assert d['input_ids'].shape == (1, 8) and d['attention_mask'].sum() == 5


def test_mismatched_sample_is_refused():
    bad = item(4, 2)
    bad['labels'] = bad['labels'][:3]
    with pytest.raises(ValueError, match='sample 1 of the batch has 4 input ids but 3 labels'):
        internvl_collate_fn([item(3, 1), bad])
    bad = item(4, 2)
    bad['image_flags'] = bad['image_flags'][:1]
    with pytest.raises(ValueError, match='sample 0 of the batch has 2 tiles but 1 image flags'):
        internvl_collate_fn([bad])
