"""Which formats fit a pixel-shuffle model whose code outside training would compute it otherwise: a ratio such as
0.2 (InternVL's code takes its shapes from ``int(grid * ratio)`` and the like in floating point, one below the whole
numbers training uses) and a feature layer other than the last (transformers' own InternVL fails on it). Such a
model is refused for those formats, naming why, and ``auto`` picks the remote-code folder, which runs the training
model's own projector."""

import pytest
import torch

from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.models.export import choose_format
from xtuner_plugins.tiny import make_tiny_models


def model(root, image_size, **kw):
    paths = make_tiny_models(str(root), image_size=image_size)
    return VisionLanguageModel(vision_encoder=paths['internvit'], llm=paths['llm'], torch_dtype=torch.float32, **kw)


def test_a_ratio_internvl_code_computes_otherwise_goes_to_the_remote_folder(tmp_path):
    vlm = model(tmp_path, 70, downsample_ratio=0.2)  # a 5x5 grid: one token per tile in training
    assert vlm.num_image_token == 1
    assert choose_format(vlm, 'auto') == 'remote'
    for fmt in ('official', 'hf'):
        with pytest.raises(ValueError, match=r'--format .* does not fit this model: downsample_ratio 0.2 on a 5x5 '
                                             r'patch grid .*formats that fit: remote'):
            choose_format(vlm, fmt)


def test_a_third_fits_internvl_code_but_not_transformers(tmp_path):
    vlm = model(tmp_path, 84, downsample_ratio=1 / 3)  # 6x6 -> 2x2: InternVL's int() lands right, 6 % (1/3) != 0
    assert choose_format(vlm, 'auto') == 'official'
    with pytest.raises(ValueError, match=r'--format hf does not fit this model: downsample_ratio'):
        choose_format(vlm, 'hf')


def test_an_earlier_feature_layer_is_not_written_for_transformers_internvl(tmp_path):
    vlm = model(tmp_path, 56, select_layer=-2)
    assert choose_format(vlm, 'auto') == 'official'
    with pytest.raises(ValueError, match=r'--format hf does not fit this model: select_layer -2 .*formats that fit: '
                                         r'official, remote'):
        choose_format(vlm, 'hf')
    assert choose_format(model(tmp_path / 'last', 56), 'hf') == 'hf'


def test_an_internvit_normalised_otherwise_goes_to_the_remote_folder(tmp_path):
    """InternVL's code and its load_image normalise with ImageNet's mean/std whatever config.json says: a tower
    trained with another (here 0.5/0.5) gave logits 8.3 off through an official folder; the remote folder records
    its mean/std."""
    paths = make_tiny_models(str(tmp_path), image_size=56)
    vlm = VisionLanguageModel(vision_encoder=dict(type='internvit', path=paths['internvit'], mean=[0.5] * 3,
                                                  std=[0.5] * 3), llm=paths['llm'], torch_dtype=torch.float32)
    assert choose_format(vlm, 'auto') == 'remote'
    for fmt in ('official', 'hf'):
        with pytest.raises(ValueError, match=rf'--format {fmt} does not fit this model: pixel mean \[0.5, 0.5, 0.5\] '
                                             r'and std \[0.5, 0.5, 0.5\] .*formats that fit: remote'):
            choose_format(vlm, fmt)


def test_an_llm_with_final_logit_softcapping_is_not_written_for_transformers_classes(tmp_path):
    """Gemma-2 caps its logits after its lm_head (tanh(x / 30) * 30); transformers' InternVL and LLaVA classes call
    the lm_head themselves: their logits were 0.03 off on a tiny model (every option's likelihood with them)."""
    vlm = model(tmp_path, 56)
    vlm.language_model.config.final_logit_softcapping = 30.0
    assert choose_format(vlm, 'auto') == 'official'
    with pytest.raises(ValueError, match=r'--format hf does not fit this model: final_logit_softcapping 30.0 '):
        choose_format(vlm, 'hf')


@pytest.mark.parametrize('setting, value', [('logits_scaling', 8.0), ('lm_head_multiplier', 0.5),
                                            ('logit_scale', 0.0625)])
def test_every_logit_transform_after_the_head_keeps_the_llm_from_transformers_classes(tmp_path, setting, value):
    """Granite divides its logits by logits_scaling, Falcon-H1 multiplies them by lm_head_multiplier, Cohere by
    logit_scale: an hf folder of a Granite gave logits 8.0x the trained model's (found by a helper's sweep)."""
    vlm = model(tmp_path, 56)
    setattr(vlm.language_model.config, setting, 1.0 if setting != 'logit_scale' else None)   # neutral: fits
    assert choose_format(vlm, 'hf') == 'hf'
    setattr(vlm.language_model.config, setting, value)
    assert choose_format(vlm, 'auto') == 'official'
    with pytest.raises(ValueError, match=rf'--format hf does not fit this model: {setting} {value} '):
        choose_format(vlm, 'hf')


def test_a_decoder_that_takes_no_other_keywords_is_not_written_for_transformers_classes(tmp_path):
    """transformers' InternVL passes its language model image_sizes: a Qwen2-MoE's decoder takes no keyword but its
    own, and its hf folder failed at the first question (a TypeError in chat; found by a helper's sweep)."""
    from tests.helpers import random_llm
    paths = make_tiny_models(str(tmp_path), image_size=56)
    folder = random_llm(tmp_path / 'qwen2moe', paths['llm'], 'Qwen2MoeConfig', hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    vlm = VisionLanguageModel(vision_encoder=paths['internvit'], llm=folder, torch_dtype=torch.float32)
    assert choose_format(vlm, 'auto') == 'official'
    with pytest.raises(ValueError, match=r"--format hf does not fit this model: the LLM's Qwen2MoeModel takes no "
                                         r"keywords but its own"):
        choose_format(vlm, 'hf')
