"""Packed rows on LLM families whose code does not hand this project's attention its packed rows' bounds: GPT-2
passes no keyword arguments on to its attention, OPT builds its own causal mask. Under sdpa_segments the samples of a
row attended to each other without a word (logits 0.28-0.41 apart from each sample alone, found by a helper's sweep);
now refused in one line naming 'sdpa', under which they pack exactly."""

import pytest
import torch

from tests.helpers import random_llm
from tests.models.conftest import build
from tests.models.test_packing import split_batch
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items
from xtuner_plugins.errors import Refused


FAMILIES = {'gpt2': ('GPT2Config', dict(n_embd=64, n_layer=2, n_head=4, n_positions=2048, tie_word_embeddings=False)),
            'opt': ('OPTConfig', dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                      word_embed_proj_dim=64, max_position_embeddings=2048)),
            'falcon_h1': ('FalconH1Config', dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=128, head_dim=16,
                                                 mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                                                 mamba_d_state=16, mamba_chunk_size=16))}


def family(tiny, folder, name):
    """A tiny random LLM of ``name`` beside a copy of the tiny tokenizer."""
    config, settings = FAMILIES[name]
    return dict(tiny, llm=random_llm(folder, tiny['llm'], config, **settings))


@pytest.mark.parametrize('name, attention', [('gpt2', 'GPT2Attention gets no segment_bounds from its model'),
                                             ('opt', 'OPTAttention gets a mask its model built')])
def test_an_llm_that_drops_the_bounds_is_refused_packed_and_packs_under_sdpa(tiny, batch, tmp_path, name, attention):
    parts = family(tiny, tmp_path / name, name)
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items)])['data']
    segments = build(parts, attn_implementation='sdpa_segments').eval()
    with torch.no_grad(), pytest.raises(Refused, match=rf"^{attention}, so under sdpa_segments / sdpa_varlen the "
                                                        rf"samples of a packed row would attend to each other: set "
                                                        rf"model.attn_implementation='sdpa'"):
        segments(packed, mode='loss')
    with torch.no_grad():   # padded rows: no bounds expected, none refused
        assert torch.isfinite(segments(batch, mode='loss')['loss'])
    model = build(parts, attn_implementation='sdpa').eval()
    with torch.no_grad():
        logits = model(packed, mode='tensor')[0]
        start = 0
        for item in items:
            alone = model(internvl_collate_fn([item])['data'], mode='tensor')[0]
            assert (logits[start:start + alone.shape[0]] - alone).abs().max() < 1e-5
            start += alone.shape[0]


def test_an_llm_whose_state_runs_along_the_row_is_refused_packed(tiny, batch, tmp_path):
    """Falcon-H1's Mamba layers carry their state from one packed sample into the next, whatever the attention
    keeps apart (a helper's sweep saw samples 2 and 3 of a row 1.3e-5 off on a random tiny one); unpacked it trains.
    (Its attention is its own: sdpa_segments is refused as it loads.)"""
    parts = family(tiny, tmp_path / 'falcon_h1', 'falcon_h1')
    with pytest.raises(Refused, match=r"^model.attn_implementation='sdpa_segments': FalconH1ForCausalLM takes no "):
        build(parts, attn_implementation='sdpa_segments')
    model = build(parts).eval()
    packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
    with torch.no_grad(), pytest.raises(Refused, match=r"^packed rows: the LLM's FalconH1Mixer layers carry their "
                                                        r"state along the row"):
        model(packed, mode='loss')
    with torch.no_grad():
        assert torch.isfinite(model(batch, mode='loss')['loss'])



def test_lora_on_a_falcon_h1_leaves_its_mamba_projections_out(tiny, batch, tmp_path):
    """peft refuses adapters on a Mamba layer's out_proj: 'all-linear' on a Falcon-H1 was a ValueError traceback."""
    model = build(family(tiny, tmp_path / 'falcon_h1', 'falcon_h1'),
                  llm_lora=dict(r=4, lora_alpha=8, target_modules='all-linear'))
    adapted = {n.split('.lora_A')[0].rsplit('.', 1)[-1] for n, _ in model.language_model.named_parameters()
               if '.lora_A.' in n}
    assert 'in_proj' in adapted and 'q_proj' in adapted and 'out_proj' not in adapted
    assert torch.isfinite(model(batch, mode='loss')['loss'])
