"""A tiny InternViT in OpenGVLab's on-disk layout, written offline in milliseconds.

:func:`write_tiny_internvit` writes what ``OpenGVLab/InternViT-300M-448px-V2_5`` ships, at toy size:

* ``config.json`` with the fields InternViT's ``InternVisionConfig`` saves (``model_type`` "intern_vit_6b",
  ``architectures`` ["InternVisionModel"], ``auto_map`` to ``configuration_intern_vit`` / ``modeling_intern_vit``,
  ``qkv_bias``, ``qk_normalization``, ``norm_type``, ``initializer_factor``, ``drop_path_rate``, ...);
* ``model.safetensors`` with InternViT's key names and shapes (``embeddings.class_embedding`` [1, 1, C],
  ``embeddings.position_embedding`` [1, 1 + g*g, C], ``encoder.layers.N.attn.qkv.weight`` [3C, C], ...).

The remote-code ``.py`` files are not written (they are OpenGVLab's, and not needed to load the folder with
:func:`xtuner_plugins.models.vision.load_internvit`).

Weights are random from a seeded ``torch.Generator``: linear, conv and embedding tensors N(0, 0.02); LayerNorm
weights near 1, biases near 0, layer scales near 0.1 (InternViT's init), each jittered so that every tensor
differs from its neighbour: a converter that swaps norm1/norm2, ls1/ls2 or the k/v rows changes the output.
The same arguments give byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Union

import torch
import transformers
from safetensors.torch import save_file

from xtuner_plugins.remote_code import INTERN_VIT_AUTO_MAP

from .dual import check_vit_sizes, write_tiny_clip, write_tiny_siglip

__all__ = ['write_tiny_internvit', 'write_tiny_siglip', 'write_tiny_clip']



def _official_config(image_size, patch_size, hidden_size, num_layers, num_heads, intermediate_size, qkv_bias,
                     qk_normalization, norm_type, initializer_range=0.02, initializer_factor=0.1) -> dict:
    """The fields of InternViT-300M-448px-V2_5's config.json, at the given size."""
    return {
        'architectures': ['InternVisionModel'],
        'attention_dropout': 0.0,
        'auto_map': dict(INTERN_VIT_AUTO_MAP),
        'drop_path_rate': 0.0,
        'dropout': 0.0,
        'hidden_act': 'gelu',
        'hidden_size': hidden_size,
        'image_size': image_size,
        'initializer_factor': initializer_factor,
        'initializer_range': initializer_range,
        'intermediate_size': intermediate_size,
        'layer_norm_eps': 1e-6,
        'model_type': 'intern_vit_6b',
        'norm_type': norm_type,
        'num_attention_heads': num_heads,
        'num_channels': 3,
        'num_hidden_layers': num_layers,
        'patch_size': patch_size,
        'qk_normalization': qk_normalization,
        'qkv_bias': qkv_bias,
        'torch_dtype': 'float32',
        'transformers_version': transformers.__version__,
        'use_bfloat16': False,
        'use_flash_attn': True,
    }


def _official_state_dict(config: dict, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, std=0.02):
        return torch.randn(*shape, generator=gen) * std + mean

    c, inter, p = config['hidden_size'], config['intermediate_size'], config['patch_size']
    std = config['initializer_range']  # the encoder layers' linear weights
    grid = config['image_size'] // p
    has_bias = config['norm_type'] == 'layer_norm'  # InternViT's RMSNorm has a weight only
    sd = {
        'embeddings.class_embedding': rand(1, 1, c),
        'embeddings.patch_embedding.weight': rand(c, 3, p, p),
        'embeddings.patch_embedding.bias': rand(c),
        'embeddings.position_embedding': rand(1, 1 + grid * grid, c),
    }
    for i in range(config['num_hidden_layers']):
        pre = f'encoder.layers.{i}.'
        sd[pre + 'attn.qkv.weight'] = rand(3 * c, c, std=std)
        if config['qkv_bias']:
            sd[pre + 'attn.qkv.bias'] = rand(3 * c)
        if config['qk_normalization']:
            sd[pre + 'attn.q_norm.weight'] = rand(c, mean=1.0, std=0.1)
            sd[pre + 'attn.k_norm.weight'] = rand(c, mean=1.0, std=0.1)
        sd[pre + 'attn.proj.weight'] = rand(c, c, std=std)
        sd[pre + 'attn.proj.bias'] = rand(c)
        sd[pre + 'mlp.fc1.weight'] = rand(inter, c, std=std)
        sd[pre + 'mlp.fc1.bias'] = rand(inter)
        sd[pre + 'mlp.fc2.weight'] = rand(c, inter, std=std)
        sd[pre + 'mlp.fc2.bias'] = rand(c)
        for norm in ('norm1', 'norm2'):
            sd[f'{pre}{norm}.weight'] = rand(c, mean=1.0, std=0.1)
            if has_bias:
                sd[f'{pre}{norm}.bias'] = rand(c)
        sd[pre + 'ls1'] = rand(c, mean=config['initializer_factor'], std=0.02)
        sd[pre + 'ls2'] = rand(c, mean=config['initializer_factor'], std=0.02)
    return sd


def write_tiny_internvit(out_dir: Union[str, os.PathLike], image_size: int = 56, patch_size: int = 14,
                        hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                        seed: int = 0, *, qkv_bias: bool = True, qk_normalization: bool = False,
                        norm_type: str = 'layer_norm', initializer_range: float = 0.02,
                        initializer_factor: float = 0.1) -> str:
    """Write a tiny InternViT (config.json + model.safetensors, official layout) to ``out_dir``; returns it.

    The defaults give a 300M-style model (qkv bias, LayerNorm, no qk-norm) with a 4x4 patch grid. The 6B
    variant is ``qkv_bias=False, qk_normalization=True, norm_type='rms_norm'``. ``initializer_range`` is the
    std of the encoder layers' linear weights and ``initializer_factor`` the layer scales' value (InternViT's
    0.02 and 0.1; a 64-wide tower that is to learn from scratch needs a larger std, about ``hidden_size ** -0.5``).
    """
    check_vit_sizes(image_size, patch_size, hidden_size, num_heads)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = _official_config(image_size, patch_size, hidden_size, num_layers, num_heads, intermediate_size,
                              qkv_bias, qk_normalization, norm_type, initializer_range, initializer_factor)
    save_file(_official_state_dict(config, seed), os.path.join(out_dir, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write('\n')
    return out_dir
