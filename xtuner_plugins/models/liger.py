"""Liger Kernel (``liger_kernel``): the LLM's elementwise work and its loss as fused Triton kernels on a CUDA GPU.

On a GPU whose matmuls are fast, a training step waits on the work around them: the H100 run of
``benchmarks/gpu.sh`` had the device busy 43% of the step, the rest host overhead and one kernel per elementwise
operation (benchmarks/RESULTS.md). ``VisionLanguageModel(liger_kernel=True)`` puts the LLM on Liger Kernel's kernels
(the ``liger-kernel`` package; transformers' Trainer offers the same as ``use_liger_kernel``); a list picks parts:

* ``'rms_norm'``, ``'swiglu'``, ``'rope'``: each norm, MLP activation and rotary embedding one kernel. Liger's own
  patching does it (``_apply_liger_kernel_to_instance``, what transformers' Trainer calls): this LLM's norms and MLPs
  in place, and, process-wide, the rotary function and the classes of the LLM's family built later in the process.
* ``'fused_loss'``: the LM head and the cross-entropy in one chunked kernel (Liger's fused linear cross-entropy):
  no logits in memory at all, and no second LM head matmul in the backward (``loss_chunk`` makes them again);
  ``loss_reduction`` and the denominator summed over ranks are ``loss.py``'s (``loss.fused_causal_lm_loss``).

Weights and their names do not change: a checkpoint trained with Liger loads without it, and the other way round.
Needs CUDA (Triton's GPU kernels); Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported) runs
them on a CPU, slowly: the tests use it. Refused with ``compile_blocks`` (both fuse the same work; Liger's kernels
under ``torch.compile`` are not measured) and under ZeRO-3 (the fused loss reads the LM head's weight outside the
head's forward, where ZeRO-3 has not gathered it). On a CPU ``compile_blocks`` does this job.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from torch import nn

from xtuner_plugins.errors import Refused

from .head import head_of, refuse_logit_transform, unwrapped

LIGER_PARTS = ('rms_norm', 'swiglu', 'rope', 'fused_loss')
KERNEL_PARTS = LIGER_PARTS[:3]   # patched into the LLM by Liger; 'fused_loss' is called by loss.py


def liger_parts(flag: Union[bool, str, Sequence[str], None], preference: bool = False) -> Tuple[str, ...]:
    """``liger_kernel`` -> the parts used: False/None (or 0) none, True (or 1) all of :data:`LIGER_PARTS`, or
    those named (one name, or a list of them); ``preference``: without ``'fused_loss'``, which computes the SFT loss
    only, where preference training needs the whole logits (``preference.pair_loss``)."""
    if flag is None or flag is False or (type(flag) is int and flag == 0):
        return ()
    if flag is True or (type(flag) is int and flag == 1):   # --cfg-options model.liger_kernel=1 reads as an int
        parts = LIGER_PARTS
    elif isinstance(flag, str):
        parts = (flag,)
    elif isinstance(flag, (list, tuple)):   # not a dict (its keys, whatever their values) nor a number
        parts = tuple(flag)
    else:
        parts = None
    unknown = None if parts is None else [p for p in parts if p not in LIGER_PARTS]
    if parts is None or unknown or not parts:
        raise Refused(f'liger_kernel={flag!r}: expected True, False or some of {", ".join(LIGER_PARTS)} '
                      "(one name, or a list: ['rope', 'fused_loss'])")
    return tuple(p for p in parts if p != 'fused_loss') if preference else parts


def interpreted() -> bool:
    """Whether Triton runs its kernels in its interpreter, on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def check_liger(flag: Union[bool, str, Sequence[str], None], zero3: bool = False,
                compile_blocks: Union[bool, str, Sequence[str], None] = False, preference: bool = False,
                device: bool = True) -> Tuple[str, ...]:
    """The parts of ``flag`` (:func:`liger_parts`) this run can use, checked before any weight loads (the model
    calls it first, so a refusal costs seconds, not the LLM's loading). Under ``preference`` ``'fused_loss'`` is
    left out, and logged. ``compile_blocks``: the model's setting (``'auto'`` gives way to Liger; asked for, it is
    refused). ``device=False``: not this machine's GPU and package (the planner, ``tools/plan.py``, runs where the
    training does not).

    Raises:
        ValueError: ``compile_blocks`` asked for, ``'fused_loss'`` under ``zero3``, no CUDA device.
        ImportError: ``liger-kernel`` is not installed.
    """
    parts = liger_parts(flag, preference=preference)
    if preference and 'fused_loss' in liger_parts(flag):
        print_log("liger_kernel: 'fused_loss' left out: it computes the SFT loss, and preference training's "
                  'log-probabilities need the whole logits', logger='current')
    if not parts:
        return parts
    if compile_blocks not in ('auto', False, None):
        raise Refused(f'liger_kernel={flag!r} and compile_blocks fuse the same work: set one of them')
    if zero3 and 'fused_loss' in parts:
        raise Refused("liger_kernel's 'fused_loss' reads the LM head's weight outside the head's forward, where "
                      "DeepSpeed ZeRO-3 has not gathered it: leave 'fused_loss' out under ZeRO-3")
    if not device:
        return parts
    if not torch.cuda.is_available() and not interpreted():
        raise Refused(f'liger_kernel={flag!r} needs a CUDA GPU (Liger\'s kernels are Triton GPU kernels); on a '
                      'CPU leave it False: compile_blocks fuses the same work there')
    if importlib.util.find_spec('liger_kernel') is None:
        raise ImportError(f'liger_kernel={flag!r} needs the liger-kernel package (requirements.txt pins it): '
                          'pip install liger-kernel')
    return parts


def apply_liger(llm: nn.Module, parts: Tuple[str, ...]) -> Tuple[str, ...]:
    """Put ``llm`` (a transformers causal LM, or a PEFT wrapper of one) on the Liger kernels of ``parts``, what
    :func:`check_liger` answered (``()``: none); returns them, which the model's forward reads for ``'fused_loss'``.

    Raises:
        ValueError: a LoRA-wrapped LM head, or logits soft-capped or scaled after it, under ``'fused_loss'``; or
            the LLM's family or a part it lacks in Liger.
    """
    if not parts:
        return parts
    if 'fused_loss' in parts:   # refused now, not at the first step
        head_of(llm)
        refuse_logit_transform(llm, "liger_kernel's 'fused_loss'")
    base = unwrapped(llm)
    kernels = [p for p in parts if p in KERNEL_PARTS]
    if kernels:
        from liger_kernel.transformers.monkey_patch import (MODEL_TYPE_TO_APPLY_LIGER_FN,
                                                            _apply_liger_kernel_to_instance)
        family = base.config.model_type
        if family not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise Refused(f'liger_kernel: Liger has no kernels for {type(base).__name__} (model_type {family!r}); '
                          f'it has {", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}. Use '
                          "liger_kernel=['fused_loss'], which any causal LM takes")
        offered = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[family]).parameters
        missing = [p for p in kernels if p not in offered]
        if missing:
            raise Refused(f'liger_kernel: Liger offers no {", ".join(missing)} for {family}; name the parts '
                          f'it has: {", ".join(p for p in LIGER_PARTS if p in offered or p == "fused_loss")}')
        _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False,
                                        **{p: p in kernels for p in KERNEL_PARTS if p in offered})
    print_log(f'liger_kernel: {", ".join(parts)} on Liger Kernel\'s Triton kernels', logger='current')
    return parts


def fused_linear_ce(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, ignore_index: int,
                    reduction: str) -> torch.Tensor:
    """Liger's fused linear cross-entropy of ``head(hidden [N, H])`` against ``targets [N]``: the sum over
    non-ignored tokens (``reduction='sum'``) or each token's (``'none'``), fp32. Under autocast the inputs are cast
    to its dtype, as the head's own forward would run, and the kernel runs outside it (its backward recomputes in
    the dtype it was given); the weight's gradient accumulates in fp32."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return liger_fused_linear_cross_entropy(hidden.to(dtype), head.weight.to(dtype), targets, bias=bias,
                                                ignore_index=ignore_index, reduction=reduction,
                                                accum_dtype=torch.float32).float()

