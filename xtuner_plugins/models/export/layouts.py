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
    """The LLM's tensors as transformers 4.x saves its composite vision-language models (InternVL, LLaVA):
    ``language_model.model.*`` for the decoder, ``language_model.lm_head.*``."""
    state = _part(model.language_model, 'language_model.')
    other = next((k for k in state if not k.startswith(('language_model.model.', 'language_model.lm_head.'))), None)
    if other:
        raise ValueError(f'{other}: no place for it in the transformers {layout} layout')
    return state


# The composite layouts are the ones transformers 4.x's ``save_pretrained`` writes (``vision_tower.*``,
# ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``): its
# ``...ForConditionalGeneration`` classes and ``AutoModel`` (``InternVLModel``, ``LlavaModel``) both read them, and
# so do vLLM and transformers 5's conversion. The in-memory names of 4.5x (``model.language_model.*``, ``lm_head.*``)
# loaded into ``...ForConditionalGeneration`` only: ``AutoModel`` left every weight at random, with a warning.


def hf_state_dict(model) -> State:
    """transformers' ``InternVLForConditionalGeneration`` keys."""
    state = _part(model.vision_model, 'vision_tower.')
    names = {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}  # InternVL's mlp1 Sequential indices
    for key, value in nn.Module.state_dict(model.mlp1).items():
        index, _, leaf = key.partition('.')
        state[f'multi_modal_projector.{names[index]}.{leaf}'] = value
    state.update(composite_llm_state_dict(model, 'InternVL'))
    return state


def llava_state_dict(model) -> State:
    """transformers' ``LlavaForConditionalGeneration`` keys."""
    state = _part(model.vision_model, 'vision_tower.')
    state.update(_part(model.mlp1, 'multi_modal_projector.'))
    state.update(composite_llm_state_dict(model, 'LLaVA'))
    return state
