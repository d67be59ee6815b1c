"""LoRA on the LLM (and optionally the vision tower) through peft, on the tiny look-alikes."""

import pytest
import torch

from tests.models.conftest import build, train_steps

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def test_llm_lora_trains_adapters_and_projector_only(tiny, batch):
    torch.manual_seed(0)
    model = build(tiny, llm_lora=LORA)
    keys = model.trainable_keys()
    assert keys and all('lora_' in k or k.startswith('mlp1.') for k in keys), sorted(keys)[:10]
    llm_lora = [k for k in keys if k.startswith('language_model.')]
    # all linear layers of every decoder layer, lm_head left out
    for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'):
        assert any(f'.{proj}.lora_A.' in k for k in llm_lora), proj
    assert not any('lm_head' in k for k in llm_lora)
    assert set(model.state_dict()) == keys  # checkpoints hold the adapters and mlp1, nothing frozen
    base = {n: p.detach().clone() for n, p in model.language_model.named_parameters() if 'lora_' not in n}
    losses = train_steps(model, batch, 6)
    assert losses[-1] < losses[0] - 0.5, losses  # adapters move the answer tokens' loss a lot
    for name, param in model.language_model.named_parameters():
        if 'lora_' not in name:
            assert torch.equal(param, base[name]), name


def test_vision_lora(tiny, batch):
    model = build(tiny, vision_lora=LORA)
    vision = [k for k in model.trainable_keys() if k.startswith('vision_model.')]
    assert vision and all('lora_' in k for k in vision)
    for layer in ('q_proj', 'k_proj', 'v_proj', 'projection_layer', 'fc1', 'fc2'):
        assert any(f'.{layer}.lora_A.' in k for k in vision), layer
    model(batch, mode='loss')['loss'].backward()
    assert all(p.grad is not None for n, p in model.vision_model.named_parameters() if 'lora_B' in n)


def test_lora_starts_from_mlp_warmup_checkpoint(tiny, tmp_path, batch):
    warm = build(tiny)
    with torch.no_grad():
        for p in warm.mlp1.parameters():
            p.add_(0.25)
    torch.save({'state_dict': warm.state_dict()}, tmp_path / 'iter_1.pth')
    lora = build(tiny, llm_lora=LORA, pretrained_pth=str(tmp_path / 'iter_1.pth'))
    for a, b in zip(warm.mlp1.parameters(), lora.mlp1.parameters()):
        assert torch.equal(a, b)
    # LoRA B starts at zero: before training, the LoRA model computes what the warm-up model computes
    with torch.no_grad():
        assert torch.allclose(warm.eval()(batch, mode='tensor'), lora.eval()(batch, mode='tensor'), atol=1e-5)


@pytest.mark.parametrize('bad', [dict(r=0), dict(target_modules=['nope'])])
def test_bad_lora_settings_fail_clearly(tiny, bad):
    with pytest.raises(ValueError):
        build(tiny, llm_lora={**LORA, **bad})


QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)


def test_qlora_trains_adapters_on_a_4bit_llm(tiny, batch):
    import bitsandbytes as bnb
    torch.manual_seed(0)
    model = build(tiny, llm_lora=LORA, llm_quantization=QLORA)
    linear = model.language_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(linear.base_layer, bnb.nn.Linear4bit)
    assert linear.base_layer.weight.quant_type == 'nf4' and linear.base_layer.weight.quant_state.nested  # double quant
    keys = model.trainable_keys()
    assert all('lora_' in k or k.startswith('mlp1.') for k in keys) and set(model.state_dict()) == keys
    assert model.mlp1[1].weight.dtype == torch.float32  # projector and vision tower in full precision
    assert next(model.vision_model.parameters()).dtype == torch.float32
    losses = train_steps(model, batch, 6)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize('kw', [dict(llm_quantization=QLORA), dict(llm_quantization=QLORA, llm_lora=LORA,
                                                                   freeze_llm=False)])
def test_qlora_needs_frozen_base_and_adapters(tiny, kw):
    with pytest.raises(ValueError, match='llm_quantization needs llm_lora and freeze_llm=True'):
        build(tiny, **kw)


def test_a_misspelt_target_module_is_refused(tiny):
    """peft adapted v_proj alone and dropped 'qproj' without a word."""
    with pytest.raises(ValueError, match=r"target_modules \['qproj', 'v_proj'\]: 'qproj' name no layer of the model.*"
                                         r"'qproj': closest q_proj"):
        build(tiny, llm_lora=dict(LORA, target_modules=['qproj', 'v_proj']))
    model = build(tiny, llm_lora=dict(LORA, target_modules=['q_proj', 'v_proj']))
    assert {k.split('.')[-4] for k in model.trainable_keys() if 'lora_A' in k} == {'q_proj', 'v_proj'}
