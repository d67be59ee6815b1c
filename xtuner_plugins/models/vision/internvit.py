"""InternViT as OpenGVLab publishes it, loaded into transformers' own ``InternVLVisionModel``.

OpenGVLab ships InternViT (e.g. ``OpenGVLab/InternViT-300M-448px-V2_5``) in a remote-code layout:
``config.json`` with ``model_type`` "intern_vit_6b" and weights with keys such as
``encoder.layers.N.attn.qkv.weight``. This module maps that layout, config and weights, onto
``transformers.InternVLVisionModel`` so that no ``trust_remote_code`` is needed::

    from xtuner_plugins.models.vision import load_internvit, vision_features

    vit = load_internvit('/path/to/InternViT-300M-448px-V2_5', torch_dtype=torch.bfloat16)
    feats = vision_features(vit, pixel_values)           # [N, 1024, 1024] for 448px tiles, CLS dropped

The layout mapping, config and keys both ways, is ``internvit_layout.py``; this module loads, builds and runs
the encoder. The remote code itself is never imported.

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
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from transformers import InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

from ...data.tiling import IMAGENET_MEAN, IMAGENET_STD
from ...errors import Refused
from ..checkpoint import read_hf_weights
from ..dtypes import resolve_dtype
from .base import VisionEncoder, register_vision_encoder
from .internvit_layout import (OFFICIAL_MODEL_TYPE, _list_keys, hf_to_official_vision_config,
                               hf_to_official_vision_state_dict, official_to_hf_vision_config,
                               official_to_hf_vision_state_dict)

__all__ = [
    'OFFICIAL_MODEL_TYPE', 'official_to_hf_vision_config', 'hf_to_official_vision_config',
    'official_to_hf_vision_state_dict', 'hf_to_official_vision_state_dict', 'interpolate_position_embeddings',
    'load_internvit', 'build_internvit_from_state_dict', 'InternVLVisionLayerWithDropPath',
    'set_drop_path', 'vision_features', 'InternViTEncoder',
]


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
        Refused (a ValueError): unknown, missing or unexpected keys, wrong shapes, or inconsistent position embeddings,
            each naming ``source`` and the keys.
    """
    config = official_to_hf_vision_config(vision_config, attn_implementation=attn_implementation)
    try:
        sd = official_to_hf_vision_state_dict(state_dict, prefix=prefix)
    except ValueError as err:
        raise Refused(f'{source}: {err}') from None

    pos_key = 'embeddings.position_embeddings'
    patch = config.patch_size[0]
    grid = config.image_size[0] // patch
    if pos_key in sd and sd[pos_key].shape[1] != 1 + grid * grid:
        num = sd[pos_key].shape[1]
        raise Refused(
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
        raise Refused(f'{source}: the weights do not match the config. Missing: {_list_keys(missing) or "-"}. '
                      f'Unexpected: {_list_keys(unexpected) or "-"} (transformers names)')
    wrong = [f'{k} {list(sd[k].shape)} (config: {list(v.shape)})'
             for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise Refused(f'{source}: {len(wrong)} tensor(s) have another shape than the config implies: '
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
    rates = torch.linspace(0, rate, len(layers), device='cpu').tolist()   # under a meta default device too (the planner)
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
