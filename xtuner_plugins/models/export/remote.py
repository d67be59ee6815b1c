"""Any trained model written as a self-contained remote-code folder (``--format remote``).

For the combinations no standard layout holds (a SigLIP tower with bilinear pooling, CLIP with InternVL's
tiling, InternViT with LLaVA's MLP, ...): the weights under the training model's own keys (``vision_model.*``,
``mlp1.*``, ``language_model.*``), a ``config.json`` (``VLMChatConfig``) recording everything the model was
trained with, the remote-code files (``xtuner_plugins/remote_code``: ``VLMChatModel`` with InternVL's
``chat``), this package's ``projector.py`` (it imports only torch), the tokenizer with its chat template and
the generation config. It loads with ``AutoModel.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from torch import nn

from xtuner_plugins.remote_code import FOLDER as REMOTE_FOLDER
from xtuner_plugins.remote_code import PROJECTOR_FILE, VLM_CHAT_AUTO_MAP, VLM_FILES

from ..dtypes import dtype_name
from .files import Log, _print, frame_range, generation_config, part_config, save_tokenizer, write_weights
from .layouts import remote_state_dict


def projector_settings(projector: nn.Module) -> dict:
    """``build_projector``'s spec of a built projector."""
    spec = {'type': type(projector).name}
    for key in ('downsample_ratio', 'ps_version'):
        if hasattr(projector, key):
            spec[key] = getattr(projector, key)
    return spec


def remote_config(model, tiling: dict, dtype: torch.dtype, system: Optional[str] = None) -> dict:
    import transformers
    vision = part_config(model.vision_model.config)
    for key in ('drop_path_rate', 'use_flash_attn'):
        vision.pop(key, None)
    llm = part_config(model.language_model.config)
    llm.update(tie_word_embeddings=False, dtype=dtype_name(dtype), use_cache=True,
               vocab_size=model.language_model.get_input_embeddings().weight.shape[0],
               architectures=[type(model.language_model).__name__])
    enc = model.vision
    extra = {'frame_prefix': tiling['frame_prefix']} if tiling.get('frame_prefix') else {}
    return {**extra,
        'architectures': ['VLMChatModel'], 'auto_map': dict(VLM_CHAT_AUTO_MAP), 'model_type': 'xtuner_vlm_chat',
        'vision_config': vision, 'llm_config': llm, 'vision_type': enc.name, 'select_layer': enc.select_layer,
        'drop_cls': enc.drop_cls, 'projector': projector_settings(model.mlp1),
        'num_image_token': model.num_image_token, 'image_mode': model.image_mode, 'force_image_size': enc.image_size,
        'image_mean': list(enc.mean), 'image_std': list(enc.std), 'dynamic_image_size': model.image_mode == 'tile',
        'use_thumbnail': bool(tiling['use_thumbnail']), 'min_dynamic_patch': int(tiling['min_dynamic_patch']),
        'max_dynamic_patch': int(tiling['max_dynamic_patch']),
        **frame_range(tiling),
        'template': model.template,
        'system_message': system, 'tie_word_embeddings': False, 'dtype': dtype_name(dtype),
        'transformers_version': transformers.__version__,
    }


def write_remote(model, tiling: dict, out_dir: str, dtype: torch.dtype, max_shard_size: str = '5GB',
                 log: Log = _print, system: Optional[str] = None) -> None:
    write_weights(remote_state_dict(model), out_dir, max_shard_size, log)
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(remote_config(model, tiling, dtype, system), f, indent=2, ensure_ascii=False)
    for name in VLM_FILES:
        shutil.copyfile(os.path.join(REMOTE_FOLDER, name), os.path.join(out_dir, name))
    shutil.copyfile(PROJECTOR_FILE, os.path.join(out_dir, 'projector.py'))
    save_tokenizer(model, out_dir, system=system)
    generation_config(model).save_pretrained(out_dir)
