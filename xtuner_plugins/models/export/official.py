"""``--format official``: InternVL's own layout (InternViT + pixel shuffle, ``InternVLChatModel`` remote code),
loaded with ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` and ``model.chat(...)``."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from xtuner_plugins.remote_code import FILES as REMOTE_FILES
from xtuner_plugins.remote_code import FOLDER as REMOTE_FOLDER
from xtuner_plugins.remote_code import INTERNVL_CHAT_AUTO_MAP

from ..dtypes import dtype_name
from ..internvl import VisionLanguageModel
from ..projector import InternVLProjector
from ..vision import hf_to_official_vision_config
from .files import Log, _print, frame_range, generation_config, save_tokenizer, write_weights
from .layouts import official_state_dict


def internvl_misfit(model: VisionLanguageModel) -> Optional[str]:
    """Why ``model`` is not an InternVL model (InternViT + pixel shuffle + tiles, a ratio InternVL's code computes
    as training does), or None."""
    reasons = []
    if model.vision.name != 'internvit':
        reasons.append(f'encoder {model.vision.name} (InternVL takes internvit)')
    if not isinstance(model.mlp1, InternVLProjector):
        reasons.append(f'projector {type(model.mlp1).name} (InternVL takes pixel_shuffle_mlp)')
    elif shuffle_arithmetic_misfit(model):
        reasons.append(shuffle_arithmetic_misfit(model))
    if model.image_mode != 'tile':
        reasons.append(f'image mode {model.image_mode} (InternVL tiles)')
    if not all(abs(a - b) < 1e-6 for a, b in zip(model.vision.mean + model.vision.std, IMAGENET_MEAN + IMAGENET_STD)):
        reasons.append(f'pixel mean {list(model.vision.mean)} and std {list(model.vision.std)} (InternVL\'s code and '
                       f'load_image normalise with ImageNet\'s, {list(IMAGENET_MEAN)} and {list(IMAGENET_STD)})')
    return '; '.join(reasons) or None


def shuffle_arithmetic_misfit(model: VisionLanguageModel, float_modulo: bool = False) -> Optional[str]:
    """Why InternVL's code (OpenGVLab's and this project's ``modeling_internvl_chat.py``; ``float_modulo``:
    transformers' ``InternVLModel``, which also tests ``grid % ratio``) would not shuffle as training does:
    it takes its shapes from ``int(grid * ratio)``, ``int(C / ratio)``, ``int(C / ratio**2)`` and
    ``int(grid**2 * ratio**2)`` in floating point, which for a ratio such as 0.2 land one below the whole
    numbers training uses (``round(1 / ratio)``); None when they agree."""
    ratio, grid, channels = model.downsample_ratio, model.vision.grid, model.vision.hidden_size
    inv = round(1 / ratio)
    wanted = (grid // inv, channels * inv, channels * inv * inv, (grid // inv) ** 2, inv)
    got = (int(grid * ratio), int(channels / ratio), int(channels / (ratio * ratio)), int(grid ** 2 * ratio ** 2),
           int(1 / ratio))
    if got == wanted and not (float_modulo and grid % ratio != 0):
        return None
    return (f'downsample_ratio {ratio} on a {grid}x{grid} patch grid of {channels} channels (its code computes '
            f'the shapes in floating point: {got[:4]} where training has {wanted[:4]})')


def official_config(model: VisionLanguageModel, tiling: dict, dtype: torch.dtype, system: Optional[str] = None) -> dict:
    """``config.json`` of an official InternVL folder (``InternVLChatConfig``).

    ``system``: the system message the model was trained with, when not the template's; stored as
    ``system_message``, which this project's remote code uses as the default of ``chat()`` (InternVL's own
    remote code ignores the key: set ``model.system_message`` there).
    """
    vision = hf_to_official_vision_config(model.vision_model.config)
    vision.update(drop_path_rate=0.0, torch_dtype=dtype_name(dtype))
    llm = model.language_model.config.to_dict()
    llm.update(tie_word_embeddings=False, torch_dtype=dtype_name(dtype), use_cache=True,
               vocab_size=model.language_model.get_input_embeddings().weight.shape[0])
    llm.pop('quantization_config', None)
    llm.pop('_name_or_path', None)
    llm['architectures'] = [type(model.language_model).__name__]
    import transformers
    config = {
        'architectures': ['InternVLChatModel'], 'auto_map': dict(INTERNVL_CHAT_AUTO_MAP), 'model_type': 'internvl_chat',
        'vision_config': vision, 'llm_config': llm, 'downsample_ratio': model.downsample_ratio,
        'template': model.template, 'ps_version': model.ps_version, 'select_layer': model.select_layer,
        'force_image_size': int(tiling['image_size']), 'dynamic_image_size': True,
        'use_thumbnail': bool(tiling['use_thumbnail']), 'min_dynamic_patch': int(tiling['min_dynamic_patch']),
        'max_dynamic_patch': int(tiling['max_dynamic_patch']),
        **frame_range(tiling),
        'use_backbone_lora': 0, 'use_llm_lora': 0,
        'tie_word_embeddings': False, 'torch_dtype': dtype_name(dtype),
        'transformers_version': transformers.__version__,
    }
    if system is not None:
        config['system_message'] = system
    if tiling.get('frame_prefix'):  # a video frame prefix other than 'Frame{i}: ' (this project's tools read it)
        config['frame_prefix'] = tiling['frame_prefix']
    return config


def write_official(model: VisionLanguageModel, tiling: dict, out_dir: str, dtype: torch.dtype,
                   max_shard_size: str = '5GB', log: Log = _print, system: Optional[str] = None) -> None:
    """InternVL's official layout: weights, ``config.json`` with ``auto_map``, the remote-code files,
    tokenizer with chat template, ``generation_config.json`` and ``preprocessor_config.json``."""
    write_weights(official_state_dict(model), out_dir, max_shard_size, log)
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(official_config(model, tiling, dtype, system), f, indent=2, ensure_ascii=False)
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_FOLDER, name), os.path.join(out_dir, name))
    save_tokenizer(model, out_dir, system=system)
    generation_config(model).save_pretrained(out_dir)
    size = int(tiling['image_size'])
    preprocessor = {'crop_size': size, 'do_center_crop': True, 'do_normalize': True, 'do_resize': True,
                    'feature_extractor_type': 'CLIPFeatureExtractor', 'image_mean': list(IMAGENET_MEAN),
                    'image_std': list(IMAGENET_STD), 'resample': 3, 'size': size}
    with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as f:
        json.dump(preprocessor, f, indent=2)
