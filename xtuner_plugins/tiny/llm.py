"""Tiny causal LMs saved with ``save_pretrained``, plus the tiny tokenizer beside them.

``qwen2`` is Qwen2.5-Instruct's format (``Qwen2ForCausalLM``, tied embeddings, an embedding matrix padded past
the tokenizer's length, ChatML tokenizer without InternVL's tokens); ``qwen3`` Qwen3's (InternVL 3.5's LLM
family: q/k RMSNorm, an explicit head_dim, tied embeddings as Qwen3-0.6B); ``llama`` a Llama-architecture LLM
(untied embeddings, no attention bias); ``gemma3`` Gemma 3's text LLM (``Gemma3ForCausalLM`` as gemma-3-1b-it: scaled
embeddings, q/k RMSNorm, sliding-window layers with one full-attention layer in six, tied embeddings); ``qwen3_moe``
Qwen3-MoE's (InternVL 3.5's mixture-of-experts LLMs, Qwen3-30B-A3B's family: each token routed to 2 of 4 experts,
the router's load-balancing loss on in its config at 0.001). All at a size that trains in seconds, with the same
tokenizer.
"""

from __future__ import annotations

import os

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from .tokenizer import build_tiny_tokenizer

TINY_LLM_ARCHS = ('qwen2', 'qwen3', 'llama', 'gemma3', 'qwen3_moe')
_CLASSES = {'qwen2': (Qwen2Config, Qwen2ForCausalLM), 'qwen3': (Qwen3Config, Qwen3ForCausalLM),
            'llama': (LlamaConfig, LlamaForCausalLM), 'gemma3': (Gemma3TextConfig, Gemma3ForCausalLM),
            'qwen3_moe': (Qwen3MoeConfig, Qwen3MoeForCausalLM)}


def write_tiny_llm(out_dir: str, arch: str = 'qwen2', hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, vocab_padding: int = 32,
                   seed: int = 0, initializer_range: float = 0.02, chat: str = 'chatml') -> str:
    """Write a randomly initialised tiny LLM of ``arch`` (one of :data:`TINY_LLM_ARCHS`) and its tokenizer to
    ``out_dir``; returns it. ``chat``: the tokenizer's chat family (``chatml``, ``llama3``, ``phi3`` or ``gemma``:
    :data:`~xtuner_plugins.tiny.tokenizer.CHAT_FAMILIES`), whose bos and eos the model's config names.

    The embedding matrix has ``len(tokenizer) + vocab_padding`` rows, as Qwen2.5 pads 151665 tokens
    to 151936 rows; InternVL's tokens are added later, by the model. ``initializer_range`` is the std of
    the random matrices (0.02 is made for wide models: a 64-wide model that is to learn needs about
    ``hidden_size ** -0.5``).
    """
    if arch not in _CLASSES:
        raise ValueError(f'unknown tiny LLM arch {arch!r}; use one of {TINY_LLM_ARCHS}')
    if num_heads < 1 or hidden_size % num_heads or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f'hidden_size {hidden_size} must be a multiple of num_heads {num_heads} and num_heads a '
                         f'multiple of num_kv_heads {num_kv_heads}')
    config_class, model_class = _CLASSES[arch]
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False, chat=chat)
    kwargs = dict(
        vocab_size=len(tokenizer) + vocab_padding, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=arch != 'llama',
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype='float32', use_cache=True, initializer_range=initializer_range)
    if arch in ('qwen3', 'gemma3', 'qwen3_moe'):
        kwargs['head_dim'] = hidden_size // num_heads
    if arch == 'qwen3_moe':   # each expert a quarter of the dense width, 2 of 4 a token
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate_size // 4,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, output_router_logits=True,
                      router_aux_loss_coef=0.001)
    if arch == 'gemma3':   # gemma-3-1b-it's: its window (512) and the attention scale of its head width
        kwargs.update(sliding_window=512, query_pre_attn_scalar=hidden_size // num_heads, rope_local_base_freq=10000.0,
                      layer_types=['full_attention' if (i + 1) % 6 == 0 or i == num_layers - 1 else 'sliding_attention'
                                   for i in range(num_layers)])   # the last full, so a tiny one has both kinds
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tiny_qwen2(out_dir: str, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, vocab_padding: int = 32,
                     seed: int = 0, initializer_range: float = 0.02) -> str:
    """A tiny Qwen2 (Qwen2.5's format): :func:`write_tiny_llm` with ``arch='qwen2'``."""
    return write_tiny_llm(out_dir, 'qwen2', hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                          vocab_padding, seed, initializer_range)
