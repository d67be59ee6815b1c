"""Tests for xtuner_plugins.models.vision.internvit_layout: InternViT's official config and keys <-> transformers'
InternVLVisionConfig and InternVLVisionModel keys, both ways."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from tests.models.vision.conftest import read_folder as _read
from xtuner_plugins.models.vision import (hf_to_official_vision_config, hf_to_official_vision_state_dict,
                                          official_to_hf_vision_config, official_to_hf_vision_state_dict)


def test_state_dict_round_trip_is_exact(tiny_dir):
    cfg, sd = _read(tiny_dir)
    hf = official_to_hf_vision_state_dict(sd)
    assert set(hf) == set(InternVLVisionModel(official_to_hf_vision_config(cfg)).state_dict())
    back = hf_to_official_vision_state_dict(hf)
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_state_dict_renames_and_qkv_rows(tiny_300m):
    _, sd = _read(tiny_300m)
    hf = official_to_hf_vision_state_dict(sd)
    c = sd['embeddings.class_embedding'].shape[-1]
    qkv = sd['encoder.layers.1.attn.qkv.weight']
    for i, part in enumerate('qkv'):
        assert torch.equal(hf[f'encoder.layer.1.attention.{part}_proj.weight'], qkv[i * c:(i + 1) * c])
    pairs = {
        'embeddings.class_embedding': 'embeddings.cls_token',
        'embeddings.position_embedding': 'embeddings.position_embeddings',
        'embeddings.patch_embedding.weight': 'embeddings.patch_embeddings.projection.weight',
        'encoder.layers.0.attn.proj.bias': 'encoder.layer.0.attention.projection_layer.bias',
        'encoder.layers.0.ls1': 'encoder.layer.0.lambda_1',
        'encoder.layers.0.ls2': 'encoder.layer.0.lambda_2',
        'encoder.layers.0.norm1.weight': 'encoder.layer.0.layernorm_before.weight',
        'encoder.layers.0.norm2.bias': 'encoder.layer.0.layernorm_after.bias',
        'encoder.layers.0.mlp.fc2.weight': 'encoder.layer.0.mlp.fc2.weight',
    }
    for official, name in pairs.items():
        assert torch.equal(hf[name], sd[official]), official


def test_config_round_trip(tiny_dir):
    cfg, _ = _read(tiny_dir)
    hf = official_to_hf_vision_config(cfg)
    assert isinstance(hf, InternVLVisionConfig)
    assert hf.attention_bias == cfg['qkv_bias'] and hf.use_qk_norm == cfg['qk_normalization']
    assert hf.norm_type == cfg['norm_type'] and hf.layer_norm_eps == cfg['layer_norm_eps']
    assert hf.image_size == [cfg['image_size']] * 2 and hf.patch_size == [cfg['patch_size']] * 2
    assert hf.use_mean_pooling is True and hf.hidden_dropout_prob == 0.0  # no final LayerNorm
    assert hf.layer_scale_init_value == cfg['initializer_factor'] == 0.1
    assert hf.drop_path_rate == cfg['drop_path_rate']
    back = hf_to_official_vision_config(hf)
    for key in set(cfg) - {'transformers_version', 'use_bfloat16'}:
        assert back[key] == cfg[key], key
    assert back['model_type'] == 'intern_vit_6b' and back['architectures'] == ['InternVisionModel']
    assert back['auto_map'] == {'AutoConfig': 'configuration_intern_vit.InternVisionConfig',
                                'AutoModel': 'modeling_intern_vit.InternVisionModel'}
    json.dumps(back)


def test_config_defaults_and_rejections():
    hf = official_to_hf_vision_config({'model_type': 'intern_vit_6b'})  # InternViT's class defaults
    assert (hf.hidden_size, hf.num_hidden_layers, hf.norm_type, hf.use_qk_norm, hf.attention_bias) == \
        (3200, 48, 'rms_norm', True, False)
    nested = official_to_hf_vision_config({'model_type': 'internvl_chat', 'vision_config': {'hidden_size': 1024}})
    assert nested.hidden_size == 1024
    with pytest.raises(ValueError, match="model_type 'intern_vit_6b', got 'internvl_vision'"):
        official_to_hf_vision_config({'model_type': 'internvl_vision'})
    with pytest.raises(ValueError, match='use_moe'):
        official_to_hf_vision_config({'model_type': 'intern_vit_6b', 'use_moe': True})
    with pytest.raises(ValueError, match='use_mean_pooling'):
        hf_to_official_vision_config(InternVLVisionConfig(use_mean_pooling=False))


def test_unknown_keys_are_listed(tiny_300m):
    _, sd = _read(tiny_300m)
    sd['encoder.layers.0.attn.foo.weight'] = torch.zeros(1)
    sd['head.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'2 key\(s\).*encoder\.layers\.0\.attn\.foo\.weight, head\.weight'):
        official_to_hf_vision_state_dict(sd)
    with pytest.raises(ValueError, match=r'layernorm\.weight'):
        hf_to_official_vision_state_dict({'layernorm.weight': torch.ones(4)})
    hf = official_to_hf_vision_state_dict(_read(tiny_300m)[1])
    del hf['encoder.layer.0.attention.v_proj.bias']
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention: has \['k', 'q'\]_proj\.bias"):
        hf_to_official_vision_state_dict(hf)
