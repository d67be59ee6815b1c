"""A mixture-of-experts LLM's router load-balancing loss (models/moe.py): the LLM config's, computed as transformers'
own forward computes it, over the real tokens of padded and packed rows alike; a setting to change it; refused where
it cannot apply. It was dropped without a word (its forward's loss is never used here), and packed rows under sdpa or
eager failed in transformers' computation of it with their 4-D mask."""

import pytest
import torch

from tests.models.conftest import build
from tests.models.test_packing import split_batch
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items
from xtuner_plugins.errors import Refused
from xtuner_plugins.tiny import write_tiny_llm


@pytest.fixture(scope='module')
def moe(tiny, tmp_path_factory):
    return dict(tiny, llm=write_tiny_llm(str(tmp_path_factory.mktemp('moe') / 'llm'), arch='qwen3_moe'))


def transformers_losses(model, batch):
    """``(cross-entropy, coef x load-balancing loss)`` of the LLM's own forward on the batch's embeddings and
    padding mask (transformers computes both inside it)."""
    llm = model.language_model
    embeds = model.embed_inputs(batch['input_ids'], batch['pixel_values'], batch['image_flags'])
    out = llm(inputs_embeds=embeds, attention_mask=batch['attention_mask'], labels=batch['labels'],
              output_router_logits=True)
    aux = llm.config.router_aux_loss_coef * out.aux_loss
    return out.loss - aux, aux


def test_the_configs_loss_is_transformers_own_on_padded_rows(moe, batch):
    model = build(moe).eval()
    assert model.router.coef == pytest.approx(0.001) and (model.router.experts, model.router.top_k) == (4, 2)
    with torch.no_grad():
        losses = model(batch, mode='loss')
        ce, aux = transformers_losses(model, batch)
    assert set(losses) == {'loss', 'router_aux_loss'}
    assert losses['router_aux_loss'].item() == pytest.approx(aux.item(), rel=1e-5)
    assert losses['loss'].item() == pytest.approx(ce.item(), rel=1e-5)
    assert aux.item() > 0


@pytest.mark.parametrize('attn', ['sdpa', 'eager', 'sdpa_segments'])
def test_packed_rows_give_the_padded_rows_losses(moe, batch, attn):
    """sdpa and eager failed in transformers' load-balancing loss (the 4-D block mask); sdpa_segments passes no
    mask, so its padding would have been counted."""
    model = build(moe, attn_implementation=attn).eval()
    packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
    padded = dict(packed, input_ids=torch.cat([packed['input_ids'], packed['input_ids'][:, :5]], 1),
                  labels=torch.cat([packed['labels'], torch.full_like(packed['labels'][:, :5], -100)], 1),
                  position_ids=torch.cat([packed['position_ids'], torch.zeros_like(packed['position_ids'][:, :5])], 1),
                  attention_mask=torch.cat([packed['attention_mask'],
                                            torch.zeros_like(packed['attention_mask'][:, :5])], 1))
    with torch.no_grad():
        unpacked = model(batch, mode='loss')
        for data in (packed, padded):   # padding after the pack: not routed tokens
            losses = model(data, mode='loss')
            for key in ('loss', 'router_aux_loss'):
                assert losses[key].item() == pytest.approx(unpacked[key].item(), rel=1e-4), (key, data is padded)


def test_the_setting_turns_it_off_or_sets_its_coefficient(moe, batch):
    with torch.no_grad():
        off = build(moe, router_aux_loss_coef=0).eval()
        assert set(off(batch, mode='loss')) == {'loss'}
        packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
        assert set(off(packed, mode='loss')) == {'loss'}   # the config's output_router_logits not read by its forward
        ten = build(moe, router_aux_loss_coef=10.0).eval()
        ten.load_state_dict(super(type(off), off).state_dict())
        _, aux = transformers_losses(ten, batch)
        assert ten(batch, mode='loss')['router_aux_loss'].item() == pytest.approx(aux.item() * 1e4, rel=1e-5)


def test_a_gradient_reaches_the_router_from_the_balance(moe, batch):
    model = build(moe, router_aux_loss_coef=1.0, freeze_llm=False)
    model(batch, mode='loss')['router_aux_loss'].backward()
    gates = [p.grad for n, p in model.language_model.named_parameters() if n.endswith('mlp.gate.weight')]
    assert len(gates) == 2 and all(g is not None and g.abs().sum() > 0 for g in gates)


def test_a_coefficient_for_a_dense_llm_or_of_no_number_is_refused(tiny, moe):
    with pytest.raises(Refused, match=r'router_aux_loss_coef=0.01: the LLM Qwen2ForCausalLM has no router'):
        build(tiny, router_aux_loss_coef=0.01)
    assert build(tiny, router_aux_loss_coef=0).router is None
    for bad in (-1, float('nan'), 'high', True):
        with pytest.raises(Refused, match='give a number >= 0'):
            build(moe, router_aux_loss_coef=bad)


@pytest.mark.parametrize('attn', ['sdpa', 'sdpa_segments'])
def test_a_preference_stage_balances_the_policys_routing_over_both_answers(moe, tmp_path, attn):
    """DPO on an MoE LLM (LoRA, the reference its adapters off): the policy's load-balancing loss is logged and
    summed, the same for pairs packed as one per row."""
    from tests.models.conftest import TILE
    from tests.helpers import write_image, write_jsonl
    from xtuner_plugins.data import InternVLPreferenceDataset, preference_collate_fn
    write_image(tmp_path / 'i' / 'a.png', size=(120, 50), seed=1)
    path = write_jsonl(tmp_path / 'p.jsonl', [
        {'image': 'a.png', 'question': 'What is it?', 'chosen': 'a wide thing', 'rejected': 'a cat'},
        {'question': 'Hello', 'chosen': 'hi there', 'rejected': 'go away now'}])
    ds = InternVLPreferenceDataset(path, image_folders=str(tmp_path / 'i'), tokenizer=moe['llm'], image_size=TILE,
                                   max_dynamic_patch=6, cache_dir=str(tmp_path / 'cache'))
    items = [ds[i] for i in range(len(ds))]
    model = build(moe, freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
                  preference=dict(types=('sigmoid',), beta=0.1), attn_implementation=attn).eval()
    with torch.no_grad():
        one_per_row = model(dict(preference_collate_fn(items)['data']), mode='loss')
        packed = model(dict(preference_collate_fn([pack_items(items)])['data']), mode='loss')
    assert one_per_row['router_aux_loss'].item() > 0
    for key in ('loss', 'router_aux_loss'):
        assert packed[key].item() == pytest.approx(one_per_row[key].item(), rel=1e-4)
    loss, log_vars = model.parse_losses(one_per_row)
    assert loss.item() == pytest.approx((one_per_row['loss'] + one_per_row['router_aux_loss']).item())
    assert 'router_aux_loss' in log_vars


def test_qlora_keeps_the_routers_unquantised(moe, batch):
    """bitsandbytes quantised the routers to 4 bits (each token's choice of experts, a few MB at Qwen3-30B-A3B's
    size); the experts are 4-bit, the routers and the LM head are not."""
    import bitsandbytes as bnb
    from torch import nn
    model = build(moe, llm_lora=dict(r=4, lora_alpha=8, target_modules='all-linear'),
                  llm_quantization=dict(type='BitsAndBytesConfig', load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                        bnb_4bit_use_double_quant=True))
    kinds = {name: type(getattr(m, 'base_layer', m)) for name, m in model.language_model.named_modules()
             if name.endswith(('mlp.gate', 'experts.0.up_proj', 'lm_head'))}
    assert len(kinds) == 5 and all(kind is nn.Linear for name, kind in kinds.items() if not name.endswith('up_proj'))
    assert all(kind is bnb.nn.Linear4bit for name, kind in kinds.items() if name.endswith('up_proj'))
    model.train()   # (bitsandbytes' CPU kernel for eval mode takes no layer as narrow as these)
    with torch.no_grad():
        assert torch.isfinite(model(batch, mode='loss')['loss'])
