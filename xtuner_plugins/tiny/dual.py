"""Tiny SigLIP and CLIP vision encoders, written as their real checkpoints are published: a whole dual-encoder
folder (``SiglipModel`` / ``CLIPModel``, ``config.json`` with ``text_config`` and ``vision_config``,
``model.safetensors`` with ``vision_model.*`` and ``text_model.*``) and its ``preprocessor_config.json``, as
``google/siglip-so400m-patch14-384`` and ``openai/clip-vit-large-patch14-336``. The vision encoders of
:mod:`xtuner_plugins.models.vision` load only ``vision_model.*`` of them, as they do from the real folders.
The text towers are minimal (they are never run).
"""

from __future__ import annotations

import os
from typing import Union

import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor,
                          SiglipModel)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ['write_tiny_siglip', 'write_tiny_clip', 'check_vit_sizes']

_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=16)


def check_vit_sizes(image_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    if image_size % patch_size or num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f'image_size {image_size} must be a multiple of patch_size {patch_size} and hidden_size '
                         f'{hidden_size} a multiple of num_heads {num_heads}')


def _vision(image_size, patch_size, hidden_size, num_layers, num_heads, intermediate_size) -> dict:
    # the patch convolution floors: SigLIP-so400m's 384 px with 14 px patches is a 27 x 27 grid
    check_vit_sizes(image_size - image_size % patch_size, patch_size, hidden_size, num_heads)
    return dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, intermediate_size=intermediate_size)


def write_tiny_siglip(out_dir: Union[str, os.PathLike], image_size: int = 56, patch_size: int = 14,
                      hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                      seed: int = 0, initializer_range: float = 0.02) -> str:
    """A random ``SiglipModel`` folder (mean/std 0.5, bicubic, no crop); returns it. ``initializer_range`` is
    not used by SigLIP's own init (which scales by the width); it is accepted like the other writers'."""
    out_dir = os.fspath(out_dir)
    config = SiglipConfig(text_config=dict(_TEXT), vision_config=_vision(image_size, patch_size, hidden_size,
                                                                          num_layers, num_heads, intermediate_size))
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out_dir, safe_serialization=True)
    SiglipImageProcessor(size={'height': image_size, 'width': image_size}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3, resample=3).save_pretrained(out_dir)
    return out_dir


def write_tiny_clip(out_dir: Union[str, os.PathLike], image_size: int = 56, patch_size: int = 14,
                    hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4, intermediate_size: int = 128,
                    seed: int = 0, initializer_range: float = 0.02) -> str:
    """A random ``CLIPModel`` folder (OpenAI's mean/std, shortest edge + centre crop as CLIP's processor);
    returns it. ``initializer_range`` sets the embeddings' std (CLIP scales its layers by the width)."""
    out_dir = os.fspath(out_dir)
    config = CLIPConfig(text_config=dict(_TEXT), projection_dim=16, initializer_range=initializer_range,
                        vision_config=dict(_vision(image_size, patch_size, hidden_size, num_layers, num_heads,
                                                   intermediate_size), initializer_range=initializer_range))
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size},
                       do_center_crop=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                       resample=3).save_pretrained(out_dir)
    return out_dir
