"""InternViT as OpenGVLab publishes it, loaded into transformers' own ``InternVLVisionModel``.

OpenGVLab ships InternViT (e.g. ``OpenGVLab/InternViT-300M-448px-V2_5``) in a remote-code layout:
``config.json`` with ``model_type`` "intern_vit_6b" and weights with keys such as
``encoder.layers.N.attn.qkv.weight``. This module maps that layout, config and weights, onto
``transformers.InternVLVisionModel`` so that no ``trust_remote_code`` is needed::

    from xtuner_plugins.models.vision import load_internvit, vision_features

    vit = load_internvit('/path/to/InternViT-300M-448px-V2_5', torch_dtype=torch.bfloat16)
    feats = vision_features(vit, pixel_values)           # [N, 1024, 1024] for 448px tiles, CLS dropped

Both directions go through one key table (``_KEY_TABLE``) and one config table, so a checkpoint converted to
transformers and back is bit-identical. The remote code itself is never imported.

Facts used (checked in ``OpenGVLab/InternVL`` ``internvl_chat/internvl/model/internvl_chat/``
``configuration_intern_vit.py`` / ``modeling_intern_vit.py`` and transformers 4.57
``models/internvl/modeling_internvl.py``):

* layer: ``x = x + drop_path(ls1 * attn.proj(attn(norm1(x))))``, then
  ``x = x + drop_path(ls2 * mlp.fc2(act(mlp.fc1(norm2(x)))))``; ``attn.qkv`` is one Linear whose output rows
  are [q; k; v]; the 6B variant has RMSNorm ``attn.q_norm`` / ``attn.k_norm`` over the full width;
* layer scale ``ls1``/``ls2`` is initialised to ``initializer_factor``;
* drop path rate of layer i is ``torch.linspace(0, drop_path_rate, num_hidden_layers)[i]``;
* no final LayerNorm; the CLS token is position 0;
* position embeddings ``[1, 1 + g*g, C]`` are interpolated bicubically (``align_corners=False``, in float32)
  to the input's patch grid; ``InternVisionModel.resize_pos_embeddings`` does the same once when InternVL's
  ``force_image_size`` differs from the config's ``image_size``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from transformers import InternVLVisionConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

from ...data.tiling import IMAGENET_MEAN, IMAGENET_STD
from ...remote_code import INTERN_VIT_AUTO_MAP
from ..checkpoint import read_hf_weights
from ..dtypes import dtype_name, resolve_dtype
from .base import VisionEncoder, register_vision_encoder, square_side

__all__ = [
    'OFFICIAL_MODEL_TYPE', 'official_to_hf_vision_config', 'hf_to_official_vision_config',
    'official_to_hf_vision_state_dict', 'hf_to_official_vision_state_dict', 'interpolate_position_embeddings',
    'load_internvit', 'build_internvit_from_state_dict', 'InternVLVisionLayerWithDropPath',
    'set_drop_path', 'vision_features', 'InternViTEncoder',
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


def interpolate_position_embeddings(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize ``[1, 1 + g*g, C]`` position embeddings to ``[1, 1 + grid*grid, C]``, like InternViT.

    The CLS row is kept; the g x g patch grid is interpolated bicubically (``align_corners=False``) in float32
    and cast back, as ``InternVisionModel.resize_pos_embeddings`` does for InternVL's ``force_image_size``.
    """
    num = pos_embed.shape[1] - 1
    old = math.isqrt(num)
    if old * old != num:
        raise ValueError(f'position embeddings hold {num} patch positions, not a square grid')
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode='bicubic', align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Loading a folder
# ---------------------------------------------------------------------------------------------------------

def load_internvit(path_or_dir: Union[str, os.PathLike], torch_dtype: Union[None, str, torch.dtype] = None,
                   attn_implementation: str = 'sdpa', drop_path_rate: Optional[float] = None,
                   image_size: Optional[int] = None) -> InternVLVisionModel:
    """Load an InternViT folder in OpenGVLab's layout as a transformers ``InternVLVisionModel``.

    Args:
        path_or_dir: the folder with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``, or ``pytorch_model.bin``, read with ``weights_only=True``), or
            one weights file in such a folder. A full InternVL chat folder works too: its ``vision_config`` and
            its ``vision_model.`` tensors are used, the other tensors are not read.
        torch_dtype, attn_implementation, drop_path_rate, image_size: see
            :func:`build_internvit_from_state_dict`.

    Raises:
        FileNotFoundError: no config.json or no weights; ValueError: see
            :func:`build_internvit_from_state_dict`.
    """
    path = os.fspath(path_or_dir)
    folder, weights_file = (path, None) if os.path.isdir(path) else (os.path.dirname(path) or '.', path)
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f'{folder}: no config.json')
    with open(config_path, encoding='utf-8') as f:
        raw = json.load(f)
    vision_raw, prefix = (raw['vision_config'], 'vision_model.') if 'vision_config' in raw else (raw, '')
    weights = read_hf_weights(folder, prefix, weights_file)
    return build_internvit_from_state_dict(vision_raw, weights, torch_dtype, attn_implementation, source=folder,
                                           drop_path_rate=drop_path_rate, image_size=image_size, prefix=prefix)


def build_internvit_from_state_dict(vision_config: dict, state_dict: Dict[str, torch.Tensor],
                                    torch_dtype: Union[None, str, torch.dtype] = None,
                                    attn_implementation: str = 'sdpa', source: str = 'state dict',
                                    drop_path_rate: Optional[float] = None, image_size: Optional[int] = None,
                                    prefix: str = '') -> InternVLVisionModel:
    """Build an ``InternVLVisionModel`` from an InternViT config dict and state dict (official key names).

    Args:
        vision_config: InternViT's config.json dict (see :func:`official_to_hf_vision_config`).
        state_dict: official keys, under ``prefix`` (e.g. ``'vision_model.'`` for a full InternVL checkpoint).
        torch_dtype: dtype of the returned model; None means float32, "auto" the config's ``torch_dtype``.
        attn_implementation: "sdpa", "eager" or "flash_attention_2" (which needs the flash_attn package).
        source: named in error messages (the folder the tensors came from).
        drop_path_rate: stochastic depth applied by :func:`set_drop_path` (training mode only); None keeps the
            config's ``drop_path_rate``, like InternViT's ``from_pretrained``.
        image_size: InternVL's ``force_image_size``. When it differs from the config's ``image_size``, the
            position embeddings are resized once, bicubically (:func:`interpolate_position_embeddings`), and
            the config's ``image_size`` becomes ``image_size``.

    Position embeddings: the checkpoint must hold ``1 + (image_size // patch_size)**2`` positions for the
    ``image_size`` of its own config; otherwise the checkpoint is inconsistent and a ValueError says so
    (InternViT's own ``from_pretrained`` fails there too). Pass ``image_size=`` to change the resolution.
    Inputs of another size than ``image_size`` are still accepted at run time: transformers interpolates the
    position embeddings bicubically per forward, as InternViT does.

    Returns:
        The model in eval mode (like ``from_pretrained``), weights loaded strictly.

    Raises:
        ValueError: unknown, missing or unexpected keys, wrong shapes, or inconsistent position embeddings,
            each naming ``source`` and the keys.
    """
    config = official_to_hf_vision_config(vision_config, attn_implementation=attn_implementation)
    try:
        sd = official_to_hf_vision_state_dict(state_dict, prefix=prefix)
    except ValueError as err:
        raise ValueError(f'{source}: {err}') from None

    pos_key = 'embeddings.position_embeddings'
    patch = config.patch_size[0]
    grid = config.image_size[0] // patch
    if pos_key in sd and sd[pos_key].shape[1] != 1 + grid * grid:
        num = sd[pos_key].shape[1]
        raise ValueError(
            f'{source}: embeddings.position_embedding has {num} positions, but config.json image_size '
            f'{config.image_size[0]} with patch_size {patch} implies {1 + grid * grid} (a {grid}x{grid} grid + CLS). '
            f'Put the image_size the weights were trained at in config.json; to change the resolution, pass '
            f'image_size= to load_internvit, which interpolates the position embeddings.')
    if image_size is not None and image_size != config.image_size[0]:
        if pos_key in sd:
            sd[pos_key] = interpolate_position_embeddings(sd[pos_key], image_size // patch)
        config.image_size = [image_size, image_size]

    with torch.device('meta'):  # no random init: every tensor comes from the checkpoint
        model = InternVLVisionModel(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f'{source}: the weights do not match the config. Missing: {_list_keys(missing) or "-"}. '
                         f'Unexpected: {_list_keys(unexpected) or "-"} (transformers names)')
    wrong = [f'{k} {list(sd[k].shape)} (config: {list(v.shape)})'
             for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f'{source}: {len(wrong)} tensor(s) have another shape than the config implies: '
                         f'{_list_keys(wrong, limit=8)}')
    model.load_state_dict(sd, strict=True, assign=True)
    saved = vision_config.get('vision_config', vision_config)  # None: fp32; 'auto': the dtype the folder records
    model.to(resolve_dtype(torch.float32 if torch_dtype is None else torch_dtype,
                           auto=saved.get('torch_dtype', saved.get('dtype')) or torch.float32))
    set_drop_path(model, config.drop_path_rate if drop_path_rate is None else drop_path_rate)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Drop path (stochastic depth)
# ---------------------------------------------------------------------------------------------------------


def _drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Zero whole samples of ``x`` [N, ...] with probability ``rate``, scale the kept ones by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class InternVLVisionLayerWithDropPath(InternVLVisionLayer):
    """``InternVLVisionLayer`` with InternViT's stochastic depth on both residual branches.

    Hand-written because transformers' ``InternVLVisionLayer`` has no drop path (InternViT uses timm's
    ``DropPath`` inside its own layer), and no library offers one for this layer; InternVL's stage 1.5 and 2
    train the ViT with ``drop_path_rate`` 0.1. :func:`set_drop_path` swaps the class of existing layer
    instances, so the parameters, their names and the state dict do not change.

    In eval mode, or with rate 0, ``forward`` is the parent's (bit-identical). In training mode each sample's
    attention branch ``lambda_1 * attn`` and MLP branch ``lambda_2 * mlp`` are dropped independently with
    probability ``drop_path_rate`` and the kept ones scaled by ``1 / (1 - drop_path_rate)``, like timm's
    ``DropPath``. Gradient checkpointing recomputes the same masks (torch's checkpoint restores the RNG state).
    """

    drop_path_rate: float = 0.0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path_rate == 0.0:
            return super().forward(hidden_states)
        attention_output, _ = self.attention(self.layernorm_before(hidden_states))
        hidden_states = _drop_path(self.lambda_1 * attention_output, self.drop_path_rate) + hidden_states
        layer_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return _drop_path(self.lambda_2 * layer_output, self.drop_path_rate) + hidden_states

    def extra_repr(self) -> str:
        return f'drop_path_rate={self.drop_path_rate:g}'


def set_drop_path(model: InternVLVisionModel, rate: float) -> List[float]:
    """Give layer i of ``model`` the drop path rate ``torch.linspace(0, rate, L)[i]``, as InternViT does.

    ``rate`` 0 restores plain ``InternVLVisionLayer`` instances (a no-op on a model without drop path).
    Records ``rate`` as ``model.config.drop_path_rate`` (saved as InternViT's field). Returns the per-layer rates.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'drop_path_rate must be in [0, 1], got {rate}')
    layers = model.encoder.layer
    rates = [x.item() for x in torch.linspace(0, rate, len(layers))]
    for i, (layer, layer_rate) in enumerate(zip(layers, rates)):
        if not isinstance(layer, InternVLVisionLayer):
            raise TypeError(f'encoder.layer.{i} is a {type(layer).__name__}, not an InternVLVisionLayer')
        if rate > 0.0:
            layer.__class__ = InternVLVisionLayerWithDropPath
            layer.drop_path_rate = layer_rate
        elif type(layer) is InternVLVisionLayerWithDropPath:
            layer.__class__ = InternVLVisionLayer
            layer.__dict__.pop('drop_path_rate', None)
    model.config.drop_path_rate = rate
    return rates


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------


def vision_features(model: InternVLVisionModel, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
    """InternVL's ``extract_feature`` up to the pixel shuffle: [N, 3, H, W] -> [N, (H/p)*(W/p), C], CLS dropped.

    ``select_layer`` indexes the hidden states as InternViT's ``output_hidden_states`` does: L + 1 entries,
    0 = embeddings, i = output of layer i, -1 = ``last_hidden_state``. For other values than -1 the layers
    after the selected one are not run. (transformers 4.57's ``InternVLVisionModel.forward`` rejects the
    ``output_hidden_states`` argument, so the hidden state is computed here from the model's own modules.)
    """
    num_layers = len(model.encoder.layer)
    if not -(num_layers + 1) <= select_layer <= num_layers:
        raise ValueError(f'select_layer {select_layer} is out of range for {num_layers} layers '
                         f'(valid: {-(num_layers + 1)}..{num_layers})')
    pixel_values = pixel_values.to(model.embeddings.patch_embeddings.projection.weight.dtype)
    depth = select_layer % (num_layers + 1)
    if depth == num_layers:
        hidden = model(pixel_values=pixel_values).last_hidden_state
    else:
        hidden, _ = model.embeddings(pixel_values)
        for layer in model.encoder.layer[:depth]:
            hidden = layer(hidden)
    return hidden[:, 1:]


@register_vision_encoder
class InternViTEncoder(VisionEncoder):
    """InternViT (OpenGVLab's layout, or the ``vision_config`` of an InternVL chat folder): ImageNet
    mean/std, CLS dropped, the last layer by default."""

    name = 'internvit'
    model_types = (OFFICIAL_MODEL_TYPE,)
    module_class = InternVLVisionModel
    drop_cls = True
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    @classmethod
    def load(cls, path, torch_dtype, attn_implementation='sdpa', drop_path_rate=0.0):
        return load_internvit(path, torch_dtype, attn_implementation, drop_path_rate=drop_path_rate)

    def features(self, module, pixel_values):
        return vision_features(module, pixel_values, self.select_layer)
