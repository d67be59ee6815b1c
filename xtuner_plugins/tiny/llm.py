"""A tiny Qwen2 causal LM saved with ``save_pretrained``, plus the tiny tokenizer beside it.

Same format as Qwen2.5-Instruct (``Qwen2ForCausalLM``, tied embeddings, an embedding matrix padded past
the tokenizer's length, ChatML tokenizer without InternVL's tokens), at a size that trains in seconds.
"""

from __future__ import annotations

import os

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .tokenizer import build_tiny_tokenizer


def write_tiny_qwen2(out_dir: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, vocab_padding: int = 32,
                     seed: int = 0, initializer_range: float = 0.02) -> str:
    """Write a randomly initialised tiny Qwen2 LLM and its tokenizer to ``out_dir``; returns it.

    The embedding matrix has ``len(tokenizer) + vocab_padding`` rows, as Qwen2.5 pads 151665 tokens
    to 151936 rows; InternVL's tokens are added later, by the model. ``initializer_range`` is the std of
    the random matrices (Qwen2's 0.02 is made for wide models: a 64-wide model that is to learn needs about
    ``hidden_size ** -0.5``).
    """
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + vocab_padding, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
        pad_token_id=tokenizer.pad_token_id, dtype='float32', use_cache=True,
        initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
