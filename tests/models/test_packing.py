"""A pack gives each sample the logits and loss it gets alone.

(RoPE makes attention scores depend only on relative positions, so with the block-diagonal mask the
restarting position ids do not change these logits; they matter to flash attention's varlen path, which
finds the sample boundaries from them, and are checked in tests/data/test_packing.py.)"""

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items
from xtuner_plugins.models.loss import causal_lm_loss


def split_batch(batch):
    """The collated (unpacked) batch back into per-sample items."""
    items, t = [], 0
    for b in range(batch['input_ids'].shape[0]):
        n = int(batch['attention_mask'][b].sum())
        k = int(batch['num_tiles'][b])
        items.append(dict(input_ids=batch['input_ids'][b, :n], labels=batch['labels'][b, :n],
                          pixel_values=batch['pixel_values'][t:t + k], image_flags=batch['image_flags'][t:t + k],
                          num_tiles=k))
        t += k
    return items


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
def test_pack_equals_samples_one_by_one(tiny, batch, attn):
    model = build(tiny, attn_implementation=attn).eval()
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items)])['data']
    with torch.no_grad():
        pack_logits = model(packed, mode='tensor')[0]
        start = 0
        for item in items:
            alone = model(internvl_collate_fn([item])['data'], mode='tensor')[0]
            n = alone.shape[0]
            assert (pack_logits[start:start + n] - alone).abs().max() < 1e-5
            start += n


@pytest.mark.parametrize('reduction', ['token', 'sample', 'square'])
def test_pack_loss_equals_unpacked_loss(tiny, batch, reduction):
    model = build(tiny, loss_reduction=reduction).eval()
    packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
    with torch.no_grad():
        unpacked_loss = model(batch, mode='loss')['loss']
        packed_loss = model(packed, mode='loss')['loss']
        # the same reduction without sample boundaries would count the pack as one sample
        plain = causal_lm_loss(model(packed, mode='tensor'), packed['labels'], reduction)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5)
    if reduction != 'token':
        assert plain.item() != pytest.approx(unpacked_loss.item(), rel=1e-4)
