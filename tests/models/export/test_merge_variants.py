"""LoRA variants the converter merges: DoRA (each row of W + delta rescaled by its trained magnitude) and a LoRA bias
(``lora_bias=True``: added to the layer's bias), plain and over a 4-bit base (QLoRA). The merged model's logits equal
the unmerged training model's; a plain ``W + delta`` merge dropped the magnitudes and the biases (max logit
difference 0.98 and 0.79 on these models). A LoRA bias on layers with no bias of their own is refused at start-up."""

import copy

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.models.export import merge_adapters

BASE = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def perturbed(model, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(dict(batch), mode='tensor')


@pytest.mark.parametrize('lora', [dict(use_dora=True),
                                  dict(lora_bias=True, target_modules=['q_proj', 'k_proj', 'v_proj'])],
                         ids=['dora', 'lora_bias'])
def test_merged_variant_equals_the_trained_model(tiny, batch, lora):
    torch.manual_seed(0)
    model = perturbed(build(tiny, llm_lora=dict(BASE, **lora)))
    expected = logits(model, batch)
    merged = copy.deepcopy(model)
    merge_adapters(merged, torch.float32, log=lambda m: None)
    assert not any('lora_' in name for name, _ in merged.named_parameters())
    mask = batch['attention_mask'].bool()
    assert (logits(merged, batch) - expected).abs()[mask].max().item() < 1e-4


def test_dora_over_a_4bit_base_is_merged(tiny, batch):
    pytest.importorskip('bitsandbytes')
    import bitsandbytes as bnb
    torch.manual_seed(0)
    model = perturbed(build(tiny, llm_lora=dict(BASE, use_dora=True), llm_quantization=dict(
        load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()  # fp32 dequantise-and-multiply, as in training
    expected = logits(model, batch)
    merge_adapters(model, torch.float32, log=lambda m: None)
    mask = batch['attention_mask'].bool()
    assert (logits(model, batch) - expected).abs()[mask].max().item() < 1e-4


def test_a_lora_bias_on_layers_without_a_bias_is_refused(tiny):
    with pytest.raises(ValueError, match=r'lora_bias=True: the adapted layers .*o_proj.* have no bias of their own.*'
                                         r'\(k_proj, q_proj, v_proj\)'):
        build(tiny, llm_lora=dict(BASE, lora_bias=True))
