"""Tiny, randomly initialised look-alikes of the real checkpoints, built offline for tests and the demo."""

import os
from typing import Dict

from .llm import write_tiny_qwen2
from .tokenizer import build_tiny_tokenizer

__all__ = ['build_tiny_tokenizer', 'write_tiny_qwen2', 'make_tiny_models']


def make_tiny_models(out_dir: str, seed: int = 0, image_size: int = 56) -> Dict[str, str]:
    """Write ``out_dir/internvit`` (official InternViT layout) and ``out_dir/llm`` (Qwen2 + tokenizer)."""
    from .vision import write_tiny_internvit
    return dict(internvit=write_tiny_internvit(os.path.join(out_dir, 'internvit'), image_size=image_size, seed=seed),
                llm=write_tiny_qwen2(os.path.join(out_dir, 'llm'), seed=seed))
