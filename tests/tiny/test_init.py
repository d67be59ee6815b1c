"""The tiny writers' random-weight scale: ``initializer_range`` (and the vision tower's layer scales)."""

import json
import os

import pytest
from safetensors.torch import load_file

from xtuner_plugins.tiny import write_tiny_qwen2
from xtuner_plugins.tiny.vision import write_tiny_internvit


def _config(folder):
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        return json.load(f)


@pytest.mark.parametrize('std', [0.02, 0.1])
def test_llm_initializer_range(tmp_path, std):
    folder = write_tiny_qwen2(str(tmp_path / 'llm'), initializer_range=std)
    assert _config(folder)['initializer_range'] == std
    sd = load_file(os.path.join(folder, 'model.safetensors'))
    for key in ('model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight',
                'model.layers.1.mlp.down_proj.weight'):
        assert sd[key].std().item() == pytest.approx(std, rel=0.15), key
    assert sd['model.layers.0.input_layernorm.weight'].eq(1).all()


def test_vision_initializer_range_and_layer_scale(tmp_path):
    default = load_file(os.path.join(write_tiny_internvit(str(tmp_path / 'a')), 'model.safetensors'))
    folder = write_tiny_internvit(str(tmp_path / 'b'), initializer_range=0.1, initializer_factor=1.0)
    config, sd = _config(folder), load_file(os.path.join(folder, 'model.safetensors'))
    assert (config['initializer_range'], config['initializer_factor']) == (0.1, 1.0)
    for key in ('encoder.layers.0.attn.qkv.weight', 'encoder.layers.1.attn.proj.weight',
                'encoder.layers.0.mlp.fc1.weight', 'encoder.layers.1.mlp.fc2.weight'):
        assert sd[key].std().item() == pytest.approx(0.1, rel=0.15), key
        assert default[key].std().item() == pytest.approx(0.02, rel=0.15), key
        assert (sd[key] / default[key]).sub(5).abs().max().item() < 1e-4, key   # the same draws, scaled
    assert sd['encoder.layers.0.ls1'].mean().item() == pytest.approx(1.0, abs=0.01)
    assert default['encoder.layers.0.ls1'].mean().item() == pytest.approx(0.1, abs=0.01)
    assert (sd['embeddings.patch_embedding.weight'] == default['embeddings.patch_embedding.weight']).all()
