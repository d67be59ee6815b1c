"""Gradient checkpointing that keeps the attention kernels' outputs (``llm_grad_ckpt`` / ``vision_grad_ckpt``).

transformers' gradient checkpointing keeps each layer's input and runs the whole layer again in the backward. The
attention kernel is the dearest part to run again and the cheapest to keep: its output is one ``hidden``-wide row
per token (the same size as the layer's input) plus one fp32 log-sum-exp per head and token, while on the CPU its
flash kernel runs at ~20% of the matmul peak (``benchmarks/RESULTS.md``: one Qwen2.5-0.5B layer's causal
attention over 3,528 tokens takes 0.13 s of forward). ``'keep_attention'`` (what ``True`` means) uses PyTorch's
selective activation checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the layer is
recomputed as before, but the attention kernel's outputs saved in the forward are given back instead of being
computed again. ``'full'`` recomputes everything (transformers' default; the least memory). Both compute the same
gradients. The planner counts what each keeps (``plan_activations.activation_bytes``).

Under DeepSpeed ZeRO-3 ``'keep_attention'`` becomes ``'full'`` (:func:`recompute_mode`, logged): ZeRO-3 gathers
a layer's weights again inside its recomputation, a collective the forward did not run there, and PyTorch's
selective checkpointing replays only the operators it recorded (it stops with ``c10d._allgather_base_ ...
encountered during backward but not found in storage``).

Kernels kept (by their operator names, whichever this build and the installed packages have): SDPA's flash,
memory-efficient and cuDNN kernels (CPU and CUDA), flash-attn's forward where it registers itself as a torch
operator (flash-attn >= 2.7), torch's ``varlen_attn`` and the AVX-512 BF16 kernel (``cpu_attention.py``);
anything else (the math fallback, eager attention) is recomputed.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

from xtuner_plugins.errors import Refused

__all__ = ['RECOMPUTE_MODES', 'recompute_mode', 'checkpointing_kwargs', 'checkpoint_first_layers']

RECOMPUTE_MODES = ('keep_attention', 'full')
KEPT_OPS = frozenset({
    'aten::_scaled_dot_product_flash_attention_for_cpu',
    'aten::_scaled_dot_product_flash_attention',
    'aten::_scaled_dot_product_efficient_attention',
    'aten::_scaled_dot_product_cudnn_attention',
    'aten::_flash_attention_forward',
    'aten::_efficient_attention_forward',
    'flash_attn::_flash_attn_forward',
    'flash_attn::_flash_attn_varlen_forward',
    'torch_attn::_varlen_attn',   # torch.nn.attention.varlen.varlen_attn (``sdpa_varlen``)
    'xtuner_plugins::cpu_bf16_attention_train',   # the AVX-512 BF16 kernel (``cpu_attention.py``)
})


def recompute_mode(flag: Union[bool, str, None], where: str = 'llm_grad_ckpt') -> Optional[str]:
    """None (no checkpointing) for False/None, ``'keep_attention'`` for True, or the mode named; ``'full'``
    instead of ``'keep_attention'`` when DeepSpeed ZeRO-3 is set up (module docstring)."""
    if flag is None or flag is False:
        return None
    mode = 'keep_attention' if flag is True else flag
    if not (isinstance(mode, str) and mode in RECOMPUTE_MODES):
        raise Refused(f'{where}={flag!r}: expected True, False or one of {", ".join(map(repr, RECOMPUTE_MODES))}')
    if mode == 'keep_attention' and zero3_enabled():
        from mmengine.logging import print_log
        print_log(f"{where}: DeepSpeed ZeRO-3 gathers weights inside each layer's recomputation, which checkpointing "
                  "that keeps attention cannot replay: every layer is recomputed whole ('full')", logger='current')
        mode = 'full'
    return mode


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _keep_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    name = op.name() if hasattr(op, 'name') else ''
    return CheckpointPolicy.MUST_SAVE if name in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs(mode: str) -> dict:
    """``gradient_checkpointing_kwargs`` for transformers' ``gradient_checkpointing_enable`` in ``mode``
    (non-reentrant checkpointing, which selective checkpointing and DeepSpeed ZeRO-3 both need)."""
    kwargs = {'use_reentrant': False}
    if mode == 'keep_attention':
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        kwargs['context_fn'] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    elif mode != 'full':
        raise ValueError(f'recompute mode {mode!r}: expected one of {RECOMPUTE_MODES}')
    return kwargs


def checkpoint_first_layers(llm, layers: Optional[int], where: str = 'llm_grad_ckpt_layers') -> Optional[int]:
    """Leave checkpointing on for the first ``layers`` decoder layers of ``llm`` only (None: all, as enabled):
    each layer left out keeps its activations for the backward instead of running again in it (more memory, less
    work: the planner counts both). Returns ``layers``.

    Raises:
        Refused: ``layers`` not a whole number from 0 to the LLM's layer count, or a layer without
            transformers' per-layer switch (``gradient_checkpointing``).
    """
    if layers is None:
        return None
    from .compile import repeated_blocks   # the decoder layers, as compile_blocks finds them
    blocks = [block for block in repeated_blocks(llm) if hasattr(block, 'gradient_checkpointing')]
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= len(blocks):
        raise Refused(f'{where}={layers!r}: expected a whole number of decoder layers to checkpoint, from 0 to '
                      f'{len(blocks)} (this LLM\'s layers), or None for all')
    for block in blocks[layers:]:
        block.gradient_checkpointing = False
    return layers
