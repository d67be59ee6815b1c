"""Whether bf16 pays on this CPU: what ``torch_dtype='auto'`` (models/precision.py), ``--dtype auto`` and
``compile_blocks='auto'`` (models/compile.py) ask before they choose bf16 on a machine without a GPU.

The CPU's flags alone do not answer it. Without ``amx_bf16`` or ``avx512_bf16`` bf16 is emulated (1 GFLOP/s on an
AVX2 Zen 3), but with them bf16 products can still be slower than fp32: an Emerald Rapids Xeon whose hypervisor
hides AMX (``avx512_bf16`` only) multiplied bf16 at 0.17 TFLOP/s and fp32 at 0.31 (oneDNN's ``avx512_core_bf16``
kernel against MKL's fp32 one), and the stage configs trained InternViT-300M + Qwen2.5-0.5B look-alikes under
bf16 autocast at 0.54-0.59x fp32's tokens/s there (benchmarks/RESULTS.md, 2026-11-28). Where bf16 paid, it paid
by far more: 4.5x fp32 on a Xeon with AMX, 2.1x on a Zen 4 and 4.2x on a Zen 5 (AVX-512 BF16). So with the flags present one bf16 and one fp32
``torch.mm`` are timed, once a process (about a tenth of a second), and bf16 is chosen when it runs at
:data:`MIN_SPEEDUP` times fp32 or more: far from every ratio measured, so a shared host's swings do not flip it.
"""

from __future__ import annotations

import functools
import time
from typing import Optional, Tuple

import torch

__all__ = ['MIN_SPEEDUP', 'has_flags', 'rates', 'why_not']

#: bf16 products must run this many times the fp32 rate for bf16 to be chosen (measured: 0.50-0.60x where it
#: lost, 2.1x and more where it paid)
MIN_SPEEDUP = 1.3


def has_flags() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX-512 BF16, from /proc/cpuinfo)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'amx_bf16' in flags or 'avx512_bf16' in flags


def _rate(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start) / 1e12


@functools.lru_cache(maxsize=None)
def rates(size: int = 1024, reps: int = 3) -> Tuple[float, float]:
    """This process's bf16 and fp32 ``torch.mm`` rates (TFLOP/s): the best of ``reps`` each after a warm-up, the
    two dtypes alternated so that a machine whose speed moves meets both alike."""
    fp32 = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    bf16 = fp32.to(torch.bfloat16)
    torch.mm(bf16, bf16), torch.mm(fp32, fp32)
    best = [0.0, 0.0]
    for _ in range(reps):
        best = [max(best[0], _rate(bf16, bf16)), max(best[1], _rate(fp32, fp32))]
    return best[0], best[1]


def _here() -> Optional[str]:
    if not has_flags():
        return 'no native bf16 on this CPU'
    bf16, fp32 = rates()
    if bf16 < MIN_SPEEDUP * fp32:
        return (f'bf16 products at {bf16 / fp32:.2f}x the fp32 rate on this CPU (measured {bf16:.2f} against '
                f'{fp32:.2f} TFLOP/s; bf16 is chosen from {MIN_SPEEDUP}x)')
    return None


#: the answer the ranks of a process group agreed on (:func:`why_not`): ``(group, answer)``
_agreed: list = []


def why_not() -> Optional[str]:
    """Why bf16 does not pay on this CPU, in a few words for a log line; None when it does. In a distributed run
    every rank takes rank 0's answer: ranks that timed their products near the bar, or ran on CPUs of other
    kinds, would otherwise build their models in different dtypes, which DDP cannot join. The first rank to ask
    asks at the same point of building the same model as the others, so the broadcast meets on all of them; the
    answer is then kept for the process group (building a model asks two or three times: one broadcast)."""
    answer = _here()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.distributed_c10d._get_default_group()
        if _agreed and _agreed[0][0] is group:
            return _agreed[0][1]
        shared = [answer]
        dist.broadcast_object_list(shared, src=0)
        agreed = f'rank 0: {shared[0]}' if shared[0] is not None and answer is None else shared[0]
        _agreed[:] = [(group, agreed)]
        return agreed
    return answer
