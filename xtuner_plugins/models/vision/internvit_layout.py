"""InternViT's official layout (OpenGVLab's remote code: ``config.json`` with ``model_type`` "intern_vit_6b",
keys such as ``encoder.layers.N.attn.qkv.weight``) mapped onto transformers' ``InternVLVisionConfig`` and
``InternVLVisionModel`` keys, both ways: one config table and one key table (``_KEY_TABLE``), so that a
checkpoint converted to transformers and back is bit-identical. Loading and running the encoder is
``internvit.py``; this module only renames and reshapes.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch
from transformers import InternVLVisionConfig

from ...remote_code import INTERN_VIT_AUTO_MAP
from ..dtypes import dtype_name
from .base import square_side

__all__ = [
    'OFFICIAL_MODEL_TYPE', 'official_to_hf_vision_config', 'hf_to_official_vision_config',
    'official_to_hf_vision_state_dict', 'hf_to_official_vision_state_dict',
]

OFFICIAL_MODEL_TYPE = 'intern_vit_6b'
OFFICIAL_ARCHITECTURES = ['InternVisionModel']

# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

# Defaults of InternViT's ``InternVisionConfig.__init__``: a config.json that omits a field means these.
_OFFICIAL_DEFAULTS = {
    'num_channels': 3, 'patch_size': 14, 'image_size': 224, 'qkv_bias': False, 'hidden_size': 3200,
    'num_attention_heads': 25, 'intermediate_size': 12800, 'qk_normalization': True, 'num_hidden_layers': 48,
    'use_flash_attn': True, 'hidden_act': 'gelu', 'norm_type': 'rms_norm', 'layer_norm_eps': 1e-6,
    'dropout': 0.0, 'drop_path_rate': 0.0, 'attention_dropout': 0.0, 'initializer_range': 0.02,
    'initializer_factor': 0.1,
}

# official field -> InternVLVisionConfig field. ``dropout`` is InternViT's dropout after ``attn.proj``;
# ``initializer_factor`` is the init value of ``ls1``/``ls2`` (the checkpoint's values replace it on load).
# ``image_size``/``patch_size`` are ints in InternViT and [s, s] in transformers.
_CONFIG_TABLE = {
    'hidden_size': 'hidden_size',
    'num_hidden_layers': 'num_hidden_layers',
    'num_attention_heads': 'num_attention_heads',
    'intermediate_size': 'intermediate_size',
    'hidden_act': 'hidden_act',
    'norm_type': 'norm_type',
    'layer_norm_eps': 'layer_norm_eps',
    'num_channels': 'num_channels',
    'image_size': 'image_size',
    'patch_size': 'patch_size',
    'qkv_bias': 'attention_bias',
    'qk_normalization': 'use_qk_norm',
    'dropout': 'projection_dropout',
    'attention_dropout': 'attention_dropout',
    'initializer_range': 'initializer_range',
    'initializer_factor': 'layer_scale_init_value',
}
# Official fields transformers' model has no use for; kept as extra attributes of the transformers config so
# that the round trip is lossless. ``drop_path_rate`` is what :func:`set_drop_path` applies by default.
_CARRIED_FIELDS = ('drop_path_rate', 'use_flash_attn')
# What InternViT's architecture fixes: no final LayerNorm, absolute position embeddings, no other dropout.
_HF_FIXED = {'use_mean_pooling': True, 'use_absolute_position_embeddings': True, 'use_mask_token': False,
             'hidden_dropout_prob': 0.0}


def official_to_hf_vision_config(cfg: dict, attn_implementation: Optional[str] = None) -> InternVLVisionConfig:
    """InternViT ``config.json`` dict -> ``InternVLVisionConfig``.

    Args:
        cfg: the official vision config (``model_type`` "intern_vit_6b"); a full InternVL chat config is
            accepted too, its ``vision_config`` is used. Missing fields take InternViT's defaults; fields with
            no meaning here (``architectures``, ``auto_map``, ``torch_dtype``, the unused MoE fields of
            InternVL3's config ...) are dropped.
        attn_implementation: "sdpa", "eager" or "flash_attention_2"; None leaves transformers' choice.

    Raises:
        ValueError: for another ``model_type``, a MoE ViT (``use_moe`` true) or a non-square size.
    """
    if 'vision_config' in cfg:
        cfg = cfg['vision_config']
    model_type = cfg.get('model_type', OFFICIAL_MODEL_TYPE)
    if model_type != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"expected an InternViT config with model_type '{OFFICIAL_MODEL_TYPE}', got "
                         f"'{model_type}'; a transformers-native folder loads with InternVLVisionModel.from_pretrained")
    if cfg.get('use_moe'):
        raise ValueError('this InternViT config has use_moe true; a MoE vision encoder has no transformers model')
    full = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in cfg.items() if k in _OFFICIAL_DEFAULTS}}
    kwargs = {hf: full[official] for official, hf in _CONFIG_TABLE.items()}
    size, patch = square_side(full['image_size'], 'image_size'), square_side(full['patch_size'], 'patch_size')
    kwargs['image_size'], kwargs['patch_size'] = [size, size], [patch, patch]
    kwargs.update({name: full[name] for name in _CARRIED_FIELDS})
    kwargs.update(_HF_FIXED)
    if cfg.get('torch_dtype', cfg.get('dtype')) is not None:
        kwargs['dtype'] = cfg.get('torch_dtype', cfg.get('dtype'))
    if attn_implementation is not None:
        kwargs['attn_implementation'] = attn_implementation
    return InternVLVisionConfig(**kwargs)


def hf_to_official_vision_config(cfg: InternVLVisionConfig) -> dict:
    """``InternVLVisionConfig`` -> an InternViT ``config.json`` dict (with ``architectures``, ``auto_map``).

    Raises:
        ValueError: when ``cfg`` describes something InternViT cannot be: a final LayerNorm
            (``use_mean_pooling`` false), a mask token, no absolute position embeddings, hidden dropout,
            or a non-square image/patch size.
    """
    for name, value in _HF_FIXED.items():
        if getattr(cfg, name) != value:
            raise ValueError(f'InternViT has no equivalent of {name}={getattr(cfg, name)!r} (it needs {value!r})')
    out = {'architectures': list(OFFICIAL_ARCHITECTURES), 'auto_map': dict(INTERN_VIT_AUTO_MAP),
           'model_type': OFFICIAL_MODEL_TYPE}
    for official, hf in _CONFIG_TABLE.items():
        out[official] = getattr(cfg, hf)
    out['image_size'] = square_side(cfg.image_size, 'image_size')
    out['patch_size'] = square_side(cfg.patch_size, 'patch_size')
    out['drop_path_rate'] = getattr(cfg, 'drop_path_rate', 0.0)
    out['use_flash_attn'] = getattr(cfg, 'use_flash_attn', cfg._attn_implementation == 'flash_attention_2')
    dtype = getattr(cfg, 'dtype', None)
    if dtype is not None:
        out['torch_dtype'] = dtype_name(dtype)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------

# fmt: off
# One table for both directions: InternViT key <-> InternVLVisionModel key. {n} is a layer index,
# {wb} is weight or bias. ``attention.qkv`` is not a transformers key: it is the fused projection, split by
# rows into attention.{q,k,v}_proj by _split_qkv (and concatenated back in hf_to_official_vision_state_dict).
_KEY_TABLE = (
    ('embeddings.class_embedding',              'embeddings.cls_token'),
    ('embeddings.position_embedding',           'embeddings.position_embeddings'),
    ('embeddings.patch_embedding.{wb}',         'embeddings.patch_embeddings.projection.{wb}'),
    ('encoder.layers.{n}.attn.qkv.{wb}',        'encoder.layer.{n}.attention.qkv.{wb}'),
    ('encoder.layers.{n}.attn.q_norm.weight',   'encoder.layer.{n}.attention.q_norm.weight'),
    ('encoder.layers.{n}.attn.k_norm.weight',   'encoder.layer.{n}.attention.k_norm.weight'),
    ('encoder.layers.{n}.attn.proj.{wb}',       'encoder.layer.{n}.attention.projection_layer.{wb}'),
    ('encoder.layers.{n}.ls1',                  'encoder.layer.{n}.lambda_1'),
    ('encoder.layers.{n}.ls2',                  'encoder.layer.{n}.lambda_2'),
    ('encoder.layers.{n}.norm1.{wb}',           'encoder.layer.{n}.layernorm_before.{wb}'),
    ('encoder.layers.{n}.norm2.{wb}',           'encoder.layer.{n}.layernorm_after.{wb}'),
    ('encoder.layers.{n}.mlp.fc1.{wb}',         'encoder.layer.{n}.mlp.fc1.{wb}'),
    ('encoder.layers.{n}.mlp.fc2.{wb}',         'encoder.layer.{n}.mlp.fc2.{wb}'),
)
# fmt: on
_PLACEHOLDERS = {'n': r'\d+', 'wb': 'weight|bias'}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r'\{(\w+)\}', template)  # literal, name, literal, name, ...
    return re.compile(''.join(re.escape(p) if i % 2 == 0 else f'(?P<{p}>{_PLACEHOLDERS[p]})'
                              for i, p in enumerate(parts)))


_OFFICIAL_TO_HF = [(_template_regex(official), hf) for official, hf in _KEY_TABLE]
_HF_TO_OFFICIAL = [(_template_regex(hf), official) for official, hf in _KEY_TABLE]
_HF_QKV = re.compile(r'(?P<base>encoder\.layer\.\d+\.attention)\.(?P<part>[qkv])_proj\.(?P<wb>weight|bias)')


def _rename(key: str, rules) -> Optional[str]:
    """The one place where keys are renamed: the first rule whose pattern matches all of ``key``."""
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def _list_keys(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _split_qkv(key: str, new: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``key`` [3C, ...] (renamed ``new`` = ``...attention.qkv.{wb}``) -> q/k/v_proj [C, ...] each.

    Rows [0:C] are q, [C:2C] k, [2C:3C] v, as InternViT's ``qkv(x).reshape(B, N, 3, heads, head_dim)`` reads them.
    """
    if tensor.shape[0] % 3:
        raise ValueError(f'{key}: the fused qkv has {tensor.shape[0]} rows, not a multiple of 3')
    base, wb = new.rsplit('.qkv.', 1)
    # clone: views would share one storage, which safetensors refuses to save
    return {f'{base}.{part}_proj.{wb}': chunk.clone() for part, chunk in zip('qkv', tensor.chunk(3, dim=0))}


def official_to_hf_vision_state_dict(sd: Dict[str, torch.Tensor], prefix: str = '') -> Dict[str, torch.Tensor]:
    """InternViT state dict -> ``InternVLVisionModel`` state dict.

    Args:
        sd: official keys (``embeddings.class_embedding``, ``encoder.layers.N.attn.qkv.weight``, ...).
        prefix: stripped from the keys, e.g. ``'vision_model.'`` for a full InternVL checkpoint; keys without
            it (``mlp1.``, ``language_model.``) are skipped.

    Raises:
        ValueError: listing the keys (under ``prefix``) the table does not know, or when no key has ``prefix``.
    """
    keys = [k for k in sd if k.startswith(prefix)]
    if prefix and not keys:
        raise ValueError(f'no key starts with {prefix!r}; the first keys are: {_list_keys(list(sd)[:5])}')
    out, unknown = {}, []
    for key in keys:
        new = _rename(key[len(prefix):], _OFFICIAL_TO_HF)
        if new is None:
            unknown.append(key)
        elif '.attention.qkv.' in new:
            out.update(_split_qkv(key, new, sd[key]))
        else:
            out[new] = sd[key]
    if unknown:
        raise ValueError(f'{len(unknown)} key(s) are not InternViT keys this loader knows: {_list_keys(unknown)}')
    return out


def hf_to_official_vision_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``InternVLVisionModel`` state dict -> InternViT state dict (q/k/v_proj concatenated into ``attn.qkv``).

    Raises:
        ValueError: listing unknown keys (e.g. ``layernorm.weight`` of a model with a final LayerNorm, which
            InternViT does not have) or a layer whose q, k and v are not all present.
    """
    fused: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    renamed, unknown = {}, []
    for key, tensor in sd.items():
        match = _HF_QKV.fullmatch(key)
        if match:
            fused.setdefault((match['base'], match['wb']), {})[match['part']] = tensor
            continue
        renamed[key] = tensor
    for (base, wb), parts in fused.items():
        if set(parts) != {'q', 'k', 'v'}:
            raise ValueError(f'{base}: has {sorted(parts)}_proj.{wb} but needs q, k and v to fuse attn.qkv')
        renamed[f'{base}.qkv.{wb}'] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    out = {}
    for key, tensor in renamed.items():
        new = _rename(key, _HF_TO_OFFICIAL)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(f'{len(unknown)} key(s) have no InternViT equivalent: {_list_keys(unknown)}')
    return out
