"""The trained model's tensors under each format's keys (the tensors themselves, no copies).

The training model names its parts ``vision_model`` (a transformers tower), ``mlp1`` (the projector) and
``language_model`` (a causal LM) whatever their type.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..vision import hf_to_official_vision_state_dict

State = Dict[str, torch.Tensor]


def _part(module: nn.Module, prefix: str) -> State:
    return {f'{prefix}{k}': v for k, v in nn.Module.state_dict(module).items()}


def official_state_dict(model) -> State:
    """InternVL's official layout: ``vision_model.*`` (InternViT's keys), ``mlp1.*``, ``language_model.*``."""
    state = {f'vision_model.{k}': v
             for k, v in hf_to_official_vision_state_dict(nn.Module.state_dict(model.vision_model)).items()}
    state.update(_part(model.mlp1, 'mlp1.'))
    state.update(_part(model.language_model, 'language_model.'))
    return state


def remote_state_dict(model) -> State:
    """``--format remote``: the training model's own keys."""
    state = {}
    for part in ('vision_model', 'mlp1', 'language_model'):
        state.update(_part(getattr(model, part), f'{part}.'))
    return state


def composite_llm_state_dict(model, layout: str) -> State:
    """The LLM's tensors as transformers' composite vision-language models (InternVL, LLaVA) key them:
    ``model.language_model.*`` for the decoder, ``lm_head.*``."""
    state = {}
    for key, value in nn.Module.state_dict(model.language_model).items():
        if key.startswith('model.'):
            state['model.language_model.' + key[len('model.'):]] = value
        elif key.startswith('lm_head.'):
            state[key] = value
        else:
            raise ValueError(f'language_model.{key}: no place for it in the transformers {layout} layout')
    return state


def hf_state_dict(model) -> State:
    """transformers' ``InternVLForConditionalGeneration`` keys."""
    state = _part(model.vision_model, 'model.vision_tower.')
    names = {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}  # InternVL's mlp1 Sequential indices
    for key, value in nn.Module.state_dict(model.mlp1).items():
        index, _, leaf = key.partition('.')
        state[f'model.multi_modal_projector.{names[index]}.{leaf}'] = value
    state.update(composite_llm_state_dict(model, 'InternVL'))
    return state


def llava_state_dict(model) -> State:
    """transformers' ``LlavaForConditionalGeneration`` keys."""
    state = _part(model.vision_model, 'model.vision_tower.')
    state.update(_part(model.mlp1, 'model.multi_modal_projector.'))
    state.update(composite_llm_state_dict(model, 'LLaVA'))
    return state
