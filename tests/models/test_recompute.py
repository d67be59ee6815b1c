"""Gradient checkpointing that keeps the attention kernels' outputs (models/recompute.py): the same loss and
gradients as no checkpointing and as full recomputation, the attention kernel run once a layer instead of twice,
full recomputation under DeepSpeed ZeRO-3, and a clear error for a mode that does not exist."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.models.conftest import build
from xtuner_plugins.models import recompute
from xtuner_plugins.models.recompute import KEPT_OPS, checkpointing_kwargs, recompute_mode


class CountAttention(TorchDispatchMode):
    """Counts the attention kernels the step runs (the operators ``recompute.py`` keeps)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.name() in KEPT_OPS
        return func(*args, **(kwargs or {}))


def step(tiny, batch, vision_grad_ckpt=False, **kw):
    torch.manual_seed(0)
    model = build(tiny, freeze_llm=False, freeze_vision=vision_grad_ckpt is False, vision_grad_ckpt=vision_grad_ckpt,
                  **kw).train()
    with CountAttention() as count:
        loss = model(batch, mode='loss')['loss']
        loss.backward()
    return model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, count.calls


@pytest.mark.parametrize('attn', ['sdpa', 'sdpa_segments'])
def test_keep_attention_gives_the_same_gradients_with_one_kernel_run_a_layer(tiny, batch, attn):
    plain, loss, grads, plain_calls = step(tiny, batch, llm_grad_ckpt=False, attn_implementation=attn)
    layers = plain.language_model.config.num_hidden_layers
    for mode in ('full', True, 'keep_attention'):
        model, l2, g2, seen = step(tiny, batch, llm_grad_ckpt=mode, attn_implementation=attn)
        assert model.language_model.is_gradient_checkpointing
        if mode == 'full':   # the LLM's kernels (one a layer, or a layer and sample) again in the backward
            assert seen - plain_calls >= layers, (seen, plain_calls)
        else:                # kept: never run again (the frozen tower's run once either way)
            assert seen == plain_calls, (mode, seen, plain_calls)
        assert l2 == pytest.approx(loss, rel=1e-6)
        assert g2.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f'{mode} {name}: {m}')


def test_vision_tower_keeps_its_attention_too(tiny, batch):
    _, loss, grads, full = step(tiny, batch, vision_grad_ckpt='full')
    _, l2, g2, kept = step(tiny, batch, vision_grad_ckpt=True)
    assert kept < full and l2 == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f'{name}: {m}')


def test_modes_and_errors(tiny):
    assert recompute_mode(False) is None and recompute_mode(None) is None
    assert recompute_mode(True) == 'keep_attention' and recompute_mode('full') == 'full'
    assert checkpointing_kwargs('full') == {'use_reentrant': False}
    assert 'context_fn' in checkpointing_kwargs('keep_attention')
    with pytest.raises(ValueError, match=r"llm_grad_ckpt='selective': expected True, False or one of "
                                         r"'keep_attention', 'full'"):
        build(tiny, llm_grad_ckpt='selective')


def test_zero3_recomputes_attention_too(tiny, monkeypatch):
    """Under ZeRO-3 the recomputation gathers weights (a collective selective checkpointing cannot replay: the
    two-process ZeRO-3 run of tests/eval/test_hook.py stops without this): True means 'full' there."""
    monkeypatch.setattr(recompute, 'zero3_enabled', lambda: True)
    model = build(tiny, freeze_llm=False, llm_grad_ckpt=True)
    assert model.llm_recompute == 'full' and model.language_model.is_gradient_checkpointing
    assert recompute_mode('full') == 'full' and recompute_mode(False) is None


@pytest.mark.parametrize('quantized', [False, True], ids=['lora_dropout', 'qlora'])
def test_lora_and_qlora_keep_attention_give_the_gradients_of_no_checkpointing(tiny, batch, quantized):
    """LoRA adapters with dropout (its masks drawn again in the recomputation) and QLoRA's 4-bit layers under
    checkpointing that keeps attention: the adapters' and projector's gradients of a step without checkpointing."""
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.1)
    qlora = dict(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True) if quantized else None
    runs = {}
    for mode in (False, True):
        torch.manual_seed(0)
        model = build(tiny, llm_lora=lora, llm_quantization=qlora, llm_grad_ckpt=mode).train()
        assert model.language_model.is_gradient_checkpointing == mode and model.llm_recompute == (
            'keep_attention' if mode else None)
        with CountAttention() as count:
            torch.manual_seed(1)
            loss = model(batch, mode='loss')['loss']
            loss.backward()
        runs[mode] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, count.calls)
    (loss, grads, calls), (l2, g2, calls2) = runs[False], runs[True]
    assert calls2 == calls and l2 == pytest.approx(loss, rel=1e-6)
    assert any('lora_A' in n for n in grads) and g2.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')


def test_the_kept_kernels_are_named_as_torch_names_them():
    """Every kept operator exists under that name (a misspelt one would be recomputed, silently), and torch's
    ``varlen_attn`` (``sdpa_varlen``'s kernel on a GPU, which this CPU cannot run) is among them."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    assert torch.ops.torch_attn._varlen_attn.default.name() in KEPT_OPS
    for name in KEPT_OPS:
        space, op = name.split('::')
        if space != 'flash_attn':   # flash-attn, a CUDA package, is not installed here
            assert getattr(getattr(torch.ops, space), op).default.name() == name


def test_layers_left_out_of_checkpointing_run_once(tiny, batch):
    """``llm_grad_ckpt_layers=k`` of the tiny LLM's 2 layers: the first k run again in the backward (their
    attention kernels too, with ``'full'``), the others only in the forward; the loss and gradients are those of
    checkpointing every layer (and of none)."""
    _, loss, grads, plain = step(tiny, batch, llm_grad_ckpt=False)
    again = {}
    for k in (2, 1, 0):
        model, l2, g2, seen = step(tiny, batch, llm_grad_ckpt='full', llm_grad_ckpt_layers=k)
        assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] * k + \
            [False] * (2 - k)
        again[k] = seen - plain
        assert l2 == pytest.approx(loss, rel=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f'{k} {name}: {m}')
    assert again[2] == 2 * again[1] > 0 and again[0] == 0, again


@pytest.mark.parametrize('value', [3, -1, True, 1.5, '1'])
def test_llm_grad_ckpt_layers_out_of_range_is_refused(tiny, value):
    with pytest.raises(ValueError, match=rf"llm_grad_ckpt_layers={value!r}: expected a whole number of decoder "
                                         r"layers to checkpoint, from 0 to 2 \(this LLM's layers\), or None"):
        build(tiny, freeze_llm=False, llm_grad_ckpt=True, llm_grad_ckpt_layers=value)
    with pytest.raises(ValueError, match='llm_grad_ckpt_layers=1 without llm_grad_ckpt'):
        build(tiny, freeze_llm=False, llm_grad_ckpt=False, llm_grad_ckpt_layers=1)
