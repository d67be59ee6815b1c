"""Tiny, randomly initialised look-alikes of the real checkpoints, built offline for tests and the demo."""

import os
from typing import Dict

from xtuner_plugins.filemodes import as_plain_files

from .llm import TINY_LLM_ARCHS, write_tiny_llm, write_tiny_qwen2
from .tokenizer import build_tiny_tokenizer

TINY_VISION_TYPES = ('internvit', 'siglip', 'clip')
LLM_WIDTH = VISION_WIDTH = 64  # the hidden sizes make_tiny_models writes: heads must divide them

__all__ = ['LLM_WIDTH', 'TINY_LLM_ARCHS', 'TINY_VISION_TYPES', 'VISION_WIDTH', 'build_tiny_tokenizer', 'write_tiny_llm', 'write_tiny_qwen2',
           'make_tiny_models']


def make_tiny_models(out_dir: str, seed: int = 0, image_size: int = 56, vision: str = 'internvit',
                     llm: str = 'qwen2', llm_heads: int = 4, llm_kv_heads: int = 2,
                     vision_heads: int = 4, chat: str = 'chatml') -> Dict[str, str]:
    """Write ``out_dir/<vision>`` (the encoder in its real layout) and ``out_dir/llm`` (an LLM of arch ``llm``
    with a tokenizer of the chat family ``chat``: ``chatml``, ``llama3``, ``phi3`` or ``gemma``), both
    :data:`LLM_WIDTH` / :data:`VISION_WIDTH` wide with the given heads (the default LLM's heads are 16 wide, narrower
    than vLLM's CPU build takes: ``llm_heads=2, llm_kv_heads=1`` makes them 32); returns
    ``{vision: path, 'llm': path}``."""
    from . import vision as writers
    if vision not in TINY_VISION_TYPES:
        raise ValueError(f'unknown tiny vision encoder {vision!r}; use one of {TINY_VISION_TYPES}')
    write_vision = getattr(writers, f'write_tiny_{vision}')
    written = {vision: write_vision(os.path.join(out_dir, vision), image_size=image_size, seed=seed,
                                    hidden_size=VISION_WIDTH, num_heads=vision_heads),
               'llm': write_tiny_llm(os.path.join(out_dir, 'llm'), arch=llm, seed=seed, hidden_size=LLM_WIDTH,
                                     num_heads=llm_heads, num_kv_heads=llm_kv_heads, chat=chat)}
    for folder in written.values():
        as_plain_files(folder)   # safetensors 0.8 writes its files 0600 (filemodes.py)
    return written
