"""Starting from an official InternVL checkpoint (e.g. ``OpenGVLab/InternVL2_5-1B``) without remote code.

The folder's ``config.json`` (``InternVLChatConfig``) holds ``vision_config`` (InternViT) and
``llm_config`` (e.g. Qwen2); its weights hold ``vision_model.*``, ``mlp1.*`` and ``language_model.*``.
Each part is rebuilt with transformers' own classes and loaded strictly.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import no_init_weights

from .checkpoint import read_hf_weights
from .projector import InternVLProjector
from .vision import build_internvit_from_state_dict


def _split(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_official_parts(folder: str, dtype: torch.dtype, attn_implementation: str = 'sdpa',
                        drop_path_rate: float = 0.0, vision_attn_implementation: Optional[str] = None
                        ) -> Tuple[nn.Module, nn.Module, nn.Module, int]:
    """Return ``(vision_model, mlp1, language_model, select_layer)`` loaded from an official InternVL folder
    (the vision tower's attention is ``vision_attn_implementation``, by default the LLM's)."""
    cfg_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(cfg_path):
        from xtuner_plugins.errors import NotFound
        raise NotFound(f'{folder}: no config.json; is this an official InternVL checkpoint folder?')
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key in ('vision_config', 'llm_config'):
        if key not in cfg:
            raise ValueError(f'{cfg_path}: missing "{key}"; expected an InternVLChatConfig (model_type internvl_chat)')
    state = read_hf_weights(folder)
    known = ('vision_model.', 'mlp1.', 'language_model.')
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise ValueError(f'{folder}: {len(unknown)} weights outside vision_model./mlp1./language_model.: {unknown[:8]}')

    vision = build_internvit_from_state_dict(cfg['vision_config'], _split(state, 'vision_model.'), dtype,
                                             vision_attn_implementation or attn_implementation, source=folder,
                                             drop_path_rate=drop_path_rate)

    llm_cfg = dict(cfg['llm_config'])
    llm_config = AutoConfig.for_model(llm_cfg.pop('model_type'), **llm_cfg)
    llm_config.tie_word_embeddings = False
    with no_init_weights():
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype, attn_implementation=attn_implementation)
    _load_strict(llm, _split(state, 'language_model.'), f'{folder} (language_model.)')

    mlp_state = _split(state, 'mlp1.')
    in_features = mlp_state['0.weight'].shape[0]
    ratio = float(cfg.get('downsample_ratio', 0.5))
    mlp1 = InternVLProjector(in_features * ratio * ratio, llm_config.hidden_size, ratio,
                             cfg.get('ps_version', 'v2'))
    _load_strict(mlp1, mlp_state, f'{folder} (mlp1.)')
    return vision, mlp1.to(dtype), llm.to(dtype), int(cfg.get('select_layer', -1))


def _load_strict(module: nn.Module, state, where: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith('rotary_emb.inv_freq')]
    if missing or result.unexpected_keys:
        raise ValueError(f'{where}: missing keys {missing[:8]} ({len(missing)}), unexpected keys '
                         f'{result.unexpected_keys[:8]} ({len(result.unexpected_keys)})')
