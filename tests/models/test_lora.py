"""LoRA on the LLM (and optionally the vision tower) through peft, on the tiny look-alikes."""

import logging
import re

import pytest
import torch

from tests.models.conftest import build, train_steps
from xtuner_plugins.errors import Refused
from xtuner_plugins.models.lora import apply_lora, check_init

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


@pytest.mark.parametrize('kw, part', [(dict(llm_lora=LORA, freeze_llm=False), 'llm'),
                                      (dict(vision_lora=LORA, freeze_vision=False), 'vision')])
def test_lora_beside_an_unfrozen_part_is_refused(tiny, kw, part):
    """peft froze the whole part under its adapters: freeze_llm=False with llm_lora trained the adapters alone (the
    LLM kept frozen, in fp32), without a word; finetune_full.py with llm_lora given did so."""
    with pytest.raises(Refused, match=f"{part}_lora with freeze_{part}=False: peft freezes the .* under its adapters, "
                                      f"so only they would train: set freeze_{part}=True .* or {part}_lora=None"):
        build(tiny, **kw)


def test_a_misspelt_target_module_is_refused(tiny):
    """peft adapted v_proj alone and dropped 'qproj' without a word."""
    with pytest.raises(ValueError, match=r"target_modules \['qproj', 'v_proj'\]: 'qproj' name no layer of the model.*"
                                         r"'qproj': closest q_proj"):
        build(tiny, llm_lora=dict(LORA, target_modules=['qproj', 'v_proj']))
    model = build(tiny, llm_lora=dict(LORA, target_modules=['q_proj', 'v_proj']))
    assert {k.split('.')[-4] for k in model.trainable_keys() if 'lora_A' in k} == {'q_proj', 'v_proj'}


REWRITING = ['pissa', 'pissa_niter_4', 'corda', 'olora', 'loftq', 'lora_ga']


@pytest.mark.parametrize('init', REWRITING + ['eva', 'mica', 'nope'])
def test_an_init_the_checkpoints_cannot_rebuild_is_refused(init):
    """peft's inits that rewrite the base weights (PiSSA: a helper's sweep converted a model 39% off on a layer, and
    a LoRA DPO's reference was not its SFT model) passed from a config file straight to peft."""
    for key in ('model.llm_lora', 'model.vision_lora'):
        for preference in (False, True):
            with pytest.raises(Refused) as refused:
                check_init(dict(LORA, init_lora_weights=init), key, preference=preference)
            message = str(refused.value)
            assert message.startswith(f'{key}.init_lora_weights={init!r}: '), message
            assert message.endswith("use init_lora_weights=True (the default: lora_B starts at 0, the base weights "
                                    "unchanged) or 'gaussian'"), message
            assert '\n' not in message
            if init in REWRITING:
                assert 'rewrites the base layers\' weights' in message


def test_inits_that_keep_the_base_pass():
    for init in (True, 'gaussian', 'Gaussian'):
        check_init(dict(LORA, init_lora_weights=init), 'model.llm_lora', preference=True)
    check_init(LORA, 'model.llm_lora', preference=True)
    check_init(None, 'model.llm_lora')
    for init in (False, 'orthogonal'):   # the base kept, the adapters not 0 at the start: not the reference
        check_init(dict(LORA, init_lora_weights=init), 'model.llm_lora')
        with pytest.raises(Refused, match=f"init_lora_weights={init!r}: the adapters' product does not start at 0"):
            check_init(dict(LORA, init_lora_weights=init), 'model.llm_lora', preference=True)


def test_the_model_refuses_it_before_anything_loads(tiny, monkeypatch):
    import xtuner_plugins.models.internvl as internvl

    def no_loading(*args, **kwargs):
        raise AssertionError('the parts were built')
    monkeypatch.setattr(internvl, 'build_parts', no_loading)
    for kw in (dict(llm_lora=dict(LORA, init_lora_weights='pissa_niter_4')),
               dict(vision_lora=dict(LORA, init_lora_weights='olora')),
               dict(llm_lora=dict(LORA, init_lora_weights='orthogonal'), preference=dict(beta=0.1))):
        with pytest.raises(Refused, match='init_lora_weights='):
            build(tiny, **kw)
    with pytest.raises(Refused, match=r"^lora.init_lora_weights='corda': "):   # peft's own entry too
        apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), dict(LORA, init_lora_weights='corda',
                                                                    target_modules=['0']))


def test_a_rank_past_the_hidden_size_is_named_before_anything_loads(tiny, monkeypatch):
    """``model.llm_lora.r=4096`` on an LLM of hidden size 64 trained without a word (each adapter more parameters
    than the layer it adapts); the vision tower's likewise. Read from the folders' config.json, before the parts
    load, and warned of, not refused: a stage config's rank (LLaVA's 128) on a tiny look-alike trains; the hidden
    size itself passes without a word."""
    import json
    import os

    import xtuner_plugins.models.internvl as internvl

    def no_loading(*args, **kwargs):
        raise AssertionError('the parts were built')
    monkeypatch.setattr(internvl, 'build_parts', no_loading)
    hidden = {part: json.load(open(os.path.join(tiny[part], 'config.json')))['hidden_size']
              for part in ('llm', 'internvit')}

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append

    def warned(**lora):
        records.clear()
        logger.addHandler(handler)
        try:
            with pytest.raises(AssertionError, match='the parts were built'):   # the warning comes first
                build(tiny, **lora)
        finally:
            logger.removeHandler(handler)
        return [r.getMessage() for r in records if 'past the hidden size' in r.getMessage()]
    lines = warned(llm_lora=dict(LORA, r=hidden['llm'] + 1))
    assert len(lines) == 1 and re.search(
        rf"^model\.llm_lora\.r={hidden['llm'] + 1} is past the hidden size of {tiny['llm']} "
        rf"\({hidden['llm']}\): .*; r from 1 to {hidden['llm']} is one\); trained as given$", lines[0]), lines
    lines = warned(vision_lora=dict(LORA, r=4096))
    assert len(lines) == 1 and f"model.vision_lora.r=4096 is past the hidden size of {tiny['internvit']} " \
        f"({hidden['internvit']})" in lines[0], lines
    assert warned(llm_lora=dict(LORA, r=hidden['llm'])) == []
