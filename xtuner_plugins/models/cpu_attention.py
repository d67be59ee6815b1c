"""A frozen vision tower's attention on CPUs with AVX-512 BF16 and no AMX (AMD Zen 4 and 5, Intel Cooper Lake).

There, torch's SDPA (its CPU flash kernel) runs InternViT-300M's attention (1,025 tokens, 16 heads of 64) at about
a fifth of the bf16 matmul rate: a fifth of a real-size training step was the frozen tower's attention
(benchmarks/RESULTS.md, the Zen 5 sections). ``csrc/cpu_attention.c`` is a forward-only attention written for
``vdpbf16ps``; its header says how it works and why no library kernel was taken. On CPUs with AMX torch's kernel
packs its blocks for AMX and is left in place; on GPUs nothing changes.

How it is used: :class:`~xtuner_plugins.models.internvl.VisionLanguageModel` routes a frozen tower's attention
(no LoRA on it) through :func:`attention` where :func:`cpu_pays` (``vision_cpu_attention=True``, the default;
False keeps torch's SDPA). :func:`attention` is registered with transformers' attention interface under
:data:`NAME`; each call takes the kernel only for what it computes exactly (CPU tensors in bf16, no mask, no
dropout, not causal, no gradient wanted, an even head width) and hands anything else to transformers' SDPA
function, so a tower moved to a GPU, or run with gradients, runs as before.

The kernel is compiled on first use with the system's C compiler (``$CC``, cc or gcc; about a second) into
``$XDG_CACHE_HOME/xtuner_plugins/kernels`` (``~/.cache`` without it), named by a hash of its source and flags.
Without a compiler, or if the build fails, SDPA runs and one warning says why.

Check it on this machine: ``python -m xtuner_plugins.models.cpu_attention`` (builds it, compares it with SDPA on
InternViT-300M's shapes and times both).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

import torch

NAME = 'xtuner_cpu_bf16_sdpa'
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_attention.c')
FLAGS = ('-O3', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mavx512bf16', '-mfma', '-fPIC', '-shared',
         '-pthread')


def cpu_pays() -> bool:
    """Whether this machine's CPU is one the kernel was written for: x86-64 Linux with AVX-512 BF16 and no AMX."""
    if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
        return False
    bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    amx = getattr(torch.cpu, '_is_amx_tile_supported', None)
    return bf16 is not None and amx is not None and bool(bf16()) and not bool(amx())


def cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'xtuner_plugins', 'kernels')


def _compiler() -> Optional[str]:
    return next((shutil.which(c) for c in (os.environ.get('CC', ''), 'cc', 'gcc') if c and shutil.which(c)), None)


def build(directory: Optional[str] = None) -> str:
    """The compiled kernel's path, compiled first if this source and these flags were not yet
    (``RuntimeError`` naming the compiler's message when it fails)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError('no C compiler found ($CC, cc or gcc)')
    with open(SOURCE, 'rb') as f:
        source = f.read()
    key = hashlib.sha256(source + ' '.join((compiler,) + FLAGS).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    path = os.path.join(directory, f'cpu_attention-{key}.so')
    if os.path.isfile(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.cpu_attention-', suffix='.so')
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, '-o', tmp, SOURCE], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f'{compiler} failed on {SOURCE}: {done.stderr.strip()[-2000:]}')
        os.replace(tmp, path)   # whole or not at all: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (with one warning) when it cannot be built here."""
    try:
        lib = ctypes.CDLL(build())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f'the CPU attention kernel is not available ({e}); the vision tower uses torch\'s SDPA')
        return None
    p, i, a = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    lib.attn_fwd.argtypes = [p, p, p, p, i, i, i, i, i, a, a, a, a, ctypes.c_float, ctypes.c_int]
    lib.attn_fwd.restype = ctypes.c_int
    return lib


@torch.library.custom_op('xtuner_plugins::cpu_bf16_attention', mutates_args=())
def cpu_bf16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q ``[B, H, N, D]``, k and v ``[B, H, M, D]`` (bf16, CPU), returned as
    ``[B, N, H, D]`` (the layout transformers' attention functions return)."""
    lib = library()
    if lib is None:
        raise RuntimeError('the CPU attention kernel is not available (see the warning above)')
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    b, h, n, d = query.shape
    out = torch.empty(b, n, h, d, dtype=query.dtype)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (query, key, value, out.transpose(1, 2))]
    rc = lib.attn_fwd(query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), b, h, n, key.shape[2], d,
                      *strides, scale, torch.get_num_threads())
    if rc:
        raise RuntimeError(f'the CPU attention kernel refused q {tuple(query.shape)}, k {tuple(key.shape)} '
                           f'({"out of memory" if rc == 2 else "sizes it does not take"})')
    return out


@cpu_bf16_attention.register_fake
def _(query, key, value, scale):
    b, h, n, d = query.shape
    return query.new_empty(b, n, h, d)


def takes(query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether the kernel computes this call exactly as SDPA would (the rest goes to SDPA)."""
    tensors = (query, key, value)
    if attention_mask is not None or dropout or is_causal or kwargs.get('output_attentions') \
            or kwargs.get('head_mask') is not None:
        return False
    if any(t.device.type != 'cpu' or t.dtype != torch.bfloat16 or t.dim() != 4 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    b, h, _, d = query.shape
    return (key.shape[:2] == (b, h) and key.shape == value.shape and key.shape[-1] == d and d % 2 == 0
            and key.shape[2] > 0 and query.shape[2] > 0 and library() is not None)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: the kernel where :func:`takes`, else transformers' SDPA."""
    causal = is_causal if is_causal is not None else getattr(module, 'is_causal', True) and query.shape[2] > 1
    if takes(query, key, value, attention_mask, dropout, causal, kwargs):
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        return cpu_bf16_attention(query, key, value, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def route_tower(tower: torch.nn.Module) -> bool:
    """Route a frozen tower's SDPA attention through :func:`attention` where :func:`cpu_pays` (True when done)."""
    config = getattr(tower, 'config', None)
    if config is None or getattr(config, '_attn_implementation', None) != 'sdpa' or not cpu_pays():
        return False
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attention)
    config._attn_implementation = NAME
    return True


def main() -> None:
    import time
    import torch.nn.functional as F
    print(f'CPU with AVX-512 BF16 and no AMX: {cpu_pays()}; kernel: {build()}')
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 1025, 16, 64).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    for name, fn in (('sdpa', lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2)),
                     ('kernel', lambda: cpu_bf16_attention(q, k, v, 0.125))):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        print(f'{name}: best of 3 {min(times) * 1e3:.1f} ms (q, k, v [7, 16, 1025, 64] bf16), '
              f'largest error against fp32 {(out.float() - ref).abs().max().item():.4f}')


if __name__ == '__main__':
    main()
