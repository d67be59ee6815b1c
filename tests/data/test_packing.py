import pytest
import torch

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.collate import internvl_collate_fn
from xtuner_plugins.data.packing import PackedInternVLDataset, greedy_packs


def test_greedy_packs_respect_both_budgets_and_never_split():
    lengths, tiles = [5, 4, 3, -6, 2, 9], [2, 1, 3, 1, 1, 5]
    packs = greedy_packs(lengths, tiles, max_tokens=10, max_tiles=4)
    assert packs == [[0, 1], [2, 3], [4], [5]]  # [5] is over the tile budget alone: a pack of its own
    assert sorted(i for p in packs for i in p) == list(range(6))
    for pack in packs[:3]:
        assert sum(abs(lengths[i]) for i in pack) <= 10 and sum(tiles[i] for i in pack) <= 4
    assert greedy_packs(lengths, tiles, 10, order=[5, 0, 1]) == [[5], [0, 1]]
    with pytest.raises(ValueError, match='max_tokens=0'):
        greedy_packs(lengths, tiles, 0)


def test_packed_items(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png', size=(56, 28))
    samples = [{'image': 'a.png', 'conversations': conv(answer=f'A{i}')} for i in range(3)]
    samples += [{'conversations': conv(answer='T', image=False)}, {'image': 'missing.png', 'conversations': conv()}]
    ds = InternVLDataset(write_jsonl(tmp_path / 'd.jsonl', samples), image_folders=str(tmp_path / 'i'),
                         tokenizer=tiny_tokenizer, image_size=28, cache_dir=str(tmp_path / 'c'), max_bad_fraction=1)
    packed = PackedInternVLDataset(ds, max_tokens=10 ** 6, seed=0)
    assert len(packed) == 1 and sorted(packed.packs[0]) == [0, 1, 2, 3, 4]
    item = packed[0]
    # the sample with a missing image is skipped (and counted), the other four are packed whole
    assert dict(ds.failures) == {'missing_image': 1}
    lens = item['seq_lens'].tolist()
    assert len(lens) == 4 and sum(lens) == item['input_ids'].shape[0] == item['labels'].shape[0]
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    assert (item['position_ids'][starts] == 0).all() and item['position_ids'].max() == max(lens) - 1
    assert item['image_flags'].tolist().count(0) == 1 and item['num_tiles'] == item['pixel_values'].shape[0]
    batch = internvl_collate_fn([item, packed[0]], pad_token_id=0)['data']
    assert batch['position_ids'].shape == batch['input_ids'].shape and len(batch['seq_lens']) == 2
    from xtuner_plugins.engine.hooks import count_tokens_and_samples
    assert count_tokens_and_samples({'data': batch}) == (2 * sum(lens), 8)  # throughput counts packed samples
    small = PackedInternVLDataset(ds, max_tokens=max(ds.length), max_tiles=3, seed=0)
    assert len(small) > 1 and all(sum(ds.num_tiles_per_item[i] for i in p) <= 3 for p in small.packs)


def test_packing_counts_exact_lengths_and_tiles_with_a_length_field(tmp_path, tiny_tokenizer):
    """length_field (InternVL's untokenised 'length', one tile an image) serves the length-grouped sampler;
    packing planned its budgets from it: 8 samples of 9 tiles each claiming 10 tokens went into 2 packs of 36
    tiles under max_tiles=6. Packs are planned from the samples as they load."""
    write_image(tmp_path / 'i' / 'a.png', size=(84, 28))   # 3 tiles + a thumbnail at 28 px
    samples = [{'image': 'a.png', 'length': 10, 'conversations': conv(answer='word ' * 20)} for _ in range(8)]
    path = write_jsonl(tmp_path / 'd.jsonl', samples)

    def packs(**kw):
        ds = InternVLDataset(path, image_folders=str(tmp_path / 'i'), tokenizer=tiny_tokenizer, image_size=28,
                             max_dynamic_patch=6, cache_dir=str(tmp_path / 'c'), **kw)
        return ds, PackedInternVLDataset(ds, max_tokens=150, max_tiles=6, seed=0)
    exact_ds, exact = packs()
    given_ds, given = packs(length_field='length')
    assert given_ds.length == [10] * 8 and given_ds.num_tiles_per_item == [1] * 8   # the sampler's, as given
    item = exact[0]
    tiles, tokens = item['num_tiles'], item['input_ids'].shape[0]
    assert tiles == 4 and tokens > 75   # one sample a pack: two would pass both budgets
    assert given.packs == exact.packs and len(given) == 8
    assert given.length == exact.length == [tokens] * 8
