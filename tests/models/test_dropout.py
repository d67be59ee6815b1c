"""LoRA's CPU dropout (models/dropout.py): the drop rate and expectation of ``nn.Dropout``, torch's seed repeating it,
a checkpointed recompute drawing the same mask, compiled blocks equal to eager, and PEFT's dropouts replaced."""

import pytest
import torch
from torch import nn

from tests.models.conftest import build
from xtuner_plugins.models.dropout import CpuDropout, keep_mask

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.3, target_modules='all-linear')


def test_rate_and_expectation():
    x = torch.ones(1000, 1000)
    drop = CpuDropout(0.05).train()
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    sigma = (0.05 * 0.95 / x.numel()) ** 0.5
    assert abs(dropped - 0.05) < 5 * sigma                       # Bernoulli(0.05) per element
    assert y.mean().item() == pytest.approx(1.0, abs=5 * sigma / 0.95)   # the kept ones scaled: E[y] = x
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and len(values) == 2 and values[1] == pytest.approx(1 / (1 - round(0.05 * 65536) / 65536))
    for p in (0.01, 0.5, 0.9):                                    # each 16-bit field of the draws is uniform
        rate = (~keep_mask(torch.Size([4, 250_000]), p)).float().mean(dim=1)
        assert torch.all((rate - p).abs() < 5 * (p * (1 - p) / 250_000) ** 0.5), (p, rate)
    assert torch.equal(drop.eval()(x), x)                         # eval: the input itself


def test_seed_repeats_and_calls_differ():
    drop = CpuDropout(0.5)
    x = torch.randn(64, 33)                                        # an element count not a multiple of four
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)


def test_peft_dropouts_replaced(tiny):
    model = build(tiny, llm_lora=LORA)
    drops = [m for m in model.language_model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is CpuDropout and m.p == 0.3 for m in drops)


def grads(tiny, batch, **kw):
    torch.manual_seed(0)
    model = build(tiny, llm_lora=LORA, **kw).train()
    torch.manual_seed(1)
    loss = model(batch, mode='loss')['loss']
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('kw', [dict(llm_grad_ckpt=True), dict(llm_grad_ckpt=True, compile_blocks='llm')])
def test_recompute_and_compile_draw_the_same_masks(tiny, batch, kw):
    """Dropout 0.3 on every adapter: a checkpointed (and a compiled) LLM's loss and gradients equal the plain
    eager ones, so the recompute drew the masks of the forward and compiling drew them in the same order."""
    loss, ref = grads(tiny, batch, llm_grad_ckpt=False)
    loss2, got = grads(tiny, batch, **kw)
    assert loss2 == pytest.approx(loss, rel=1e-5)
    assert got.keys() == ref.keys() and any('lora_A' in n for n in ref)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')
