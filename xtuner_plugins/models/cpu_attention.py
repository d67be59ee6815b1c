"""Attention on CPUs with AVX-512 BF16 and no AMX (AMD Zen 4 and 5, Intel Cooper Lake): forward and backward.

There, torch's SDPA (its CPU flash kernel) runs InternViT-300M's attention (1,025 tokens, 16 heads of 64) at about
a fifth of the bf16 matmul rate, and a Qwen2.5-0.5B layer's causal attention and its backward little faster: the
frozen tower's attention was a fifth of a real-size training step (benchmarks/RESULTS.md, the Zen 5 sections).
``csrc/cpu_attention.c`` is an attention written for ``vdpbf16ps``; its header says how it works and why no
library kernel was taken. On CPUs with AMX torch's kernel packs its blocks for AMX and is left in place; on GPUs
nothing changes.

Where it is used (:class:`~xtuner_plugins.models.internvl.VisionLanguageModel`, ``cpu_attention=True``, the
default; False keeps torch's SDPA for that model: :func:`opt_out`):

* a frozen tower's attention (no LoRA on it), and the LLM's under ``sdpa``: :func:`route` registers
  :func:`attention` with transformers' attention interface under :data:`NAME` (its masks are SDPA's) and names it
  in the part's config (read through :func:`as_sdpa` where the name matters);
* the LLM's under ``sdpa_segments`` (``attention.segment_sdpa``): each sample of a pack (:func:`causal_sdpa`), and
  rows without padding.

Each call takes the kernel only where :func:`takes`: this CPU (:func:`cpu_pays`), CPU tensors in bf16 (or fp32 under
bf16 autocast, which casts SDPA's inputs to bf16 too; not under fp16 autocast), no mask, no dropout, a positive
scale, an even head width, query heads a multiple of the key/value heads, and causal only over as many queries as
keys. Anything else goes to SDPA, so a model moved to a GPU runs as before, and nothing is routed where CUDA trains
(a compiled GPU block would break at the choice). With a gradient wanted it runs :func:`cpu_bf16_attention_train`,
whose backward is the kernel's too; gradient checkpointing that keeps attention keeps its outputs
(``recompute.KEPT_OPS``). A preference run's reference LLM is routed with the policy's.

The kernel is compiled on first use with the system's C compiler (``$CC``, cc or gcc; about a second) and cached
(``cpu_attention_build.py``); without a compiler, or if the build fails, SDPA runs and one warning says why. Its
torch operators are ``cpu_attention_ops.py``. Out of memory for its small per-thread buffers it raises
(``RuntimeError``) rather than falling back. This module holds where it pays and which calls take it.

Check it on this machine: ``python -m xtuner_plugins.models.cpu_attention`` (builds it, compares it with SDPA on
InternViT-300M's and Qwen2.5-0.5B's shapes and times both).
"""

from __future__ import annotations

import functools
import platform
import weakref
from typing import Optional

import torch

from .cpu_attention_build import build, library
from .cpu_attention_ops import cpu_bf16_attention, cpu_bf16_attention_train

NAME = 'xtuner_cpu_bf16_sdpa'
#: modules whose attention stays on SDPA (the model's ``cpu_attention=False``: :func:`opt_out`)
_OPTED_OUT: 'weakref.WeakSet[torch.nn.Module]' = weakref.WeakSet()


@functools.lru_cache(maxsize=None)
def cpu_pays() -> bool:
    """Whether this machine's CPU is one the kernel was written for: x86-64 Linux with AVX-512 BF16 and no AMX."""
    if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
        return False
    bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    amx = getattr(torch.cpu, '_is_amx_tile_supported', None)
    return bf16 is not None and amx is not None and bool(bf16()) and not bool(amx())


def serves_here() -> bool:
    """Whether a model built here runs on the kernel: :func:`cpu_pays`, and no CUDA device (a GPU would train it,
    and a compiled GPU block would break at the choice)."""
    return cpu_pays() and not torch.cuda.is_available()


def _autocast_bf16() -> bool:
    """Whether CPU autocast runs SDPA in bf16 here (it does under bf16 autocast: fp32 inputs are cast)."""
    return torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16


def kernel_attention(query, key, value, scale: float, causal: bool,
                     bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, N, H, D]``: the training op where autograd wants a gradient, else the forward-only one. fp32 inputs
    under bf16 autocast are cast to bf16 first, as autocast casts SDPA's (the recipe's fp32 residual stream makes
    the LLM's queries and keys fp32 through RoPE, its values bf16)."""
    query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))   # no copy when bf16
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return cpu_bf16_attention_train(query, key, value, scale, causal, bounds)[0]
    return cpu_bf16_attention(query, key, value, scale, causal, bounds)


def opt_out(model: torch.nn.Module) -> None:
    """Keep every attention module of ``model`` on SDPA."""
    _OPTED_OUT.update(model.modules())


def takes(module, query, key, value, attention_mask, dropout, is_causal, scale, kwargs) -> bool:
    """Whether the kernel computes this call of ``module`` exactly as SDPA would (the rest goes to SDPA); ``scale``:
    the scores' factor (the kernel's row maximum assumes it positive)."""
    tensors = (query, key, value)
    if module in _OPTED_OUT or not cpu_pays() or attention_mask is not None or dropout or not scale > 0 \
            or kwargs.get('output_attentions') or kwargs.get('head_mask') is not None:
        return False
    if torch.is_autocast_enabled('cpu') and not _autocast_bf16():   # SDPA would run (and return) fp16
        return False
    dtypes = (torch.bfloat16, torch.float32) if _autocast_bf16() else (torch.bfloat16,)
    if any(t.device.type != 'cpu' or t.dtype not in dtypes or t.dim() != 4 for t in tensors):
        return False
    b, h, n, d = query.shape
    kv = key.shape[1]
    return (b > 0 and h > 0 and d > 0 and key.shape[0] == b and kv > 0 and h % kv == 0 and key.shape == value.shape
            and key.shape[-1] == d and d % 2 == 0 and key.shape[2] > 0 and n > 0
            and (not is_causal or n == key.shape[2]) and not _transformed(query)
            # under deterministic algorithms SDPA: the kernel sums grouped heads' dk and dv in the order its
            # threads finish (the last bits differ from run to run)
            and not torch.are_deterministic_algorithms_enabled() and library() is not None)


def _scale(query, scaling: Optional[float]) -> float:
    """The scores' factor: ``scaling``, else one over the root of the head width (0 for no width: SDPA's then)."""
    return float(scaling) if scaling is not None else query.shape[-1] ** -0.5 if query.shape[-1] else 0.0


def _transformed(tensor) -> bool:
    """Whether ``tensor`` is inside a functorch transform (``torch.func.grad``, ``vmap``), which the kernel's
    autograd function does not take (SDPA does)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))
    except (AttributeError, RuntimeError):
        return False


@torch.compiler.disable   # inside a compiled block the choice runs eager (as segment_sdpa's loop): one graph
def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: the kernel where :func:`takes`, else transformers' SDPA."""
    causal = is_causal if is_causal is not None else getattr(module, 'is_causal', True) and query.shape[2] > 1
    scale = _scale(query, scaling)
    if takes(module, query, key, value, attention_mask, dropout, causal, scale, kwargs):
        return kernel_attention(query, key, value, scale, bool(causal)), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def causal_sdpa(module, query, key, value, dropout: float, scaling: Optional[float], gqa: bool) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention`` (``[B, H, N, D]`` in and out; ``gqa``: fewer key/value heads) for
    ``module``, on the kernel where :func:`takes`."""
    scale = _scale(query, scaling)
    if takes(module, query, key, value, None, dropout, True, scale, {}):
        return kernel_attention(query, key, value, scale, True).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                            is_causal=True, enable_gqa=gqa)


def packed_causal(module, query, key, value, dropout: float, scaling: Optional[float],
                  bounds: torch.Tensor) -> Optional[torch.Tensor]:
    """Each sample of packed rows (``bounds``, ``[B, S + 1]``) attended causally on its own in one kernel call,
    ``[B, N, H, D]``; None where the kernel does not compute what SDPA would (:func:`takes`)."""
    scale = _scale(query, scaling)
    if not takes(module, query, key, value, None, dropout, True, scale, {}):
        return None
    return kernel_attention(query, key, value, scale, True, bounds)


def route(part: torch.nn.Module) -> bool:
    """Route a tower's or an LLM's ``sdpa`` attention through :func:`attention` where :func:`cpu_pays`: registered
    under :data:`NAME` with transformers' attention and mask interfaces (its masks are SDPA's) and named in the
    part's config; True when done. Code that reads the implementation's name reads it through :func:`as_sdpa`."""
    config = getattr(part, 'config', None)
    if config is None or getattr(config, '_attn_implementation', None) != 'sdpa' or not serves_here():
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True


def as_sdpa(name: Optional[str]) -> Optional[str]:
    """An attention implementation's name, :data:`NAME` read as the ``'sdpa'`` it stands in for."""
    return 'sdpa' if name == NAME else name


def _best(fn, repeats: int = 3) -> float:
    import time
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    import torch.nn.functional as F
    print(f'CPU with AVX-512 BF16 and no AMX: {cpu_pays()}; kernel: {build()}')
    if not cpu_pays():
        raise SystemExit('not run: the kernel is for CPUs with AVX-512 BF16 and no AMX')
    g = torch.Generator().manual_seed(0)

    def rand(*shape):   # [B, H, N, D] as transformers hands it over: a transposed [B, N, H, D]
        return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).to(torch.bfloat16).transpose(1, 2)

    q, k, v = rand(7, 16, 1025, 64), rand(7, 16, 1025, 64), rand(7, 16, 1025, 64)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    print('InternViT-300M, 7 tiles (q, k, v [7, 16, 1025, 64]), forward, best of 3; largest error against fp32:')
    for name, fn in (('sdpa', lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2)),
                     ('kernel', lambda: cpu_bf16_attention(q, k, v, 0.125))):
        print(f'  {name}: {_best(fn):.1f} ms, {(fn().float() - ref).abs().max().item():.4f}')
    n = 2000
    q, k, v = rand(1, 14, n, 64), rand(1, 2, n, 64), rand(1, 2, n, 64)
    grad = torch.randn(1, n, 14, 64, generator=g).to(torch.bfloat16)

    def step(kernel: bool, dtype=torch.bfloat16):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = kernel_attention(qq, kk, vv, 0.125, True) if kernel else F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=True, enable_gqa=True).transpose(1, 2)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, qq.grad, kk.grad, vv.grad)]
    ref = step(False, torch.float32)
    print(f'Qwen2.5-0.5B, one causal sample of {n} tokens (14 query heads, 2 key/value heads of 64), forward and '
          'backward, best of 3; largest errors of out, dq, dk, dv against fp32:')
    for name, kernel in (('sdpa', False), ('kernel', True)):
        errors = ', '.join(f'{(a - b).abs().max().item():.4f}' for a, b in zip(step(kernel), ref))
        print(f'  {name}: {_best(lambda: step(kernel)):.1f} ms, {errors}')


if __name__ == '__main__':
    main()
