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

The kernel is compiled on first use with the system's C compiler (``$CC``, cc or gcc; about a second) into
``$XDG_CACHE_HOME/xtuner_plugins/kernels`` (``~/.cache`` without it), named by a hash of its source, compiler and
flags, moved into place whole (ranks building at once each write their own file); a cached build that does not load
is built again. Without a compiler, or if the build fails, SDPA runs and one warning says why. Out of memory for its
small per-thread buffers it raises (``RuntimeError``) rather than falling back.

Check it on this machine: ``python -m xtuner_plugins.models.cpu_attention`` (builds it, compares it with SDPA on
InternViT-300M's and Qwen2.5-0.5B's shapes and times both).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
import weakref
from typing import List, Optional, Tuple

import torch

NAME = 'xtuner_cpu_bf16_sdpa'
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_attention.c')
#: modules whose attention stays on SDPA (the model's ``cpu_attention=False``: :func:`opt_out`)
_OPTED_OUT: 'weakref.WeakSet[torch.nn.Module]' = weakref.WeakSet()
FLAGS = ('-O3', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mavx512bf16', '-mfma', '-fPIC', '-shared',
         '-pthread')


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


def cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'xtuner_plugins', 'kernels')


def _compiler() -> Optional[List[str]]:
    """The C compiler's command: ``$CC`` (which may carry arguments, ``ccache gcc``), else cc or gcc."""
    try:
        given = shlex.split(os.environ.get('CC', ''))
    except ValueError as e:
        raise RuntimeError(f'$CC ({os.environ["CC"]!r}) does not read as a command: {e}') from e
    for command in (given, ['cc'], ['gcc']):
        if command and shutil.which(command[0]):
            return [shutil.which(command[0]), *command[1:]]
    return None


def build(directory: Optional[str] = None) -> str:
    """The compiled kernel's path, compiled first if this source and these flags were not yet
    (``RuntimeError`` naming the compiler's message when it fails)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError('no C compiler found ($CC, cc or gcc)')
    with open(SOURCE, 'rb') as f:
        source = f.read()
    key = hashlib.sha256(source + ' '.join(compiler + list(FLAGS)).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    path = os.path.join(directory, f'cpu_attention-{key}.so')
    if os.path.isfile(path):
        _check_private(path)
        return path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _check_private(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.cpu_attention-', suffix='.so')
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *FLAGS, '-o', tmp, SOURCE], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f'{" ".join(compiler)} failed on {SOURCE}: {done.stderr.strip()[-2000:]}')
        os.replace(tmp, path)   # whole or not at all: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check_private(path: str) -> None:
    """A library this process loads runs as it: refused (``RuntimeError``) where another user could have put it
    there, its file or its folder another user's or writable by others (a shared ``$XDG_CACHE_HOME``). One of
    this user's that others may write (an earlier version made the folder under umask 002) is made private
    first."""
    for where in (path, os.path.dirname(path)) if os.path.isfile(path) else (path,):
        st = os.stat(where)
        if st.st_uid == os.getuid() and st.st_mode & 0o022:
            try:
                os.chmod(where, st.st_mode & ~0o022)
                st = os.stat(where)
            except OSError:
                pass
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeError(f'{where} is {"not yours" if st.st_uid != os.getuid() else "writable by others"}: '
                               'a kernel built there is not loaded (set XDG_CACHE_HOME to a folder of your own)')


def _load(path: str) -> ctypes.CDLL:
    """The kernel at ``path``; ``AttributeError`` for a library without its functions, closed again (``dlopen`` of
    the same path would otherwise return that one, not the kernel built in its place)."""
    lib = ctypes.CDLL(path)
    if not all(hasattr(lib, name) for name in ('attn_fwd', 'attn_bwd')):
        import _ctypes
        _ctypes.dlclose(lib._handle)
        raise AttributeError(f'{path} is a library without the kernel\'s functions')
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (with one warning) when it cannot be built here. A cached build that does not load
    (cut short by a crash) is built again once."""
    try:
        path = build()
        try:
            lib = _load(path)
        except (OSError, AttributeError):
            os.remove(path)
            lib = _load(build())
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"the CPU attention kernel is not available ({e}); attention runs on torch's SDPA")
        return None
    p, i, a, f, n = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.c_int
    lib.attn_fwd.argtypes = [p, p, p, p, p, i, i, i, i, i, i, a, a, a, a, f, n, n, p, i]
    lib.attn_bwd.argtypes = [p, p, p, p, p, p, p, p, p, i, i, i, i, i, i, a, a, a, a, a, a, f, n, n, p, i]
    lib.attn_fwd.restype = lib.attn_bwd.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError('the CPU attention kernel is not available (see the warning above)')
    return lib


def _strides(*tensors):
    return [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in tensors]


def _rows(*tensors):
    """The tensors with a contiguous last dimension (the kernel's one requirement on strides)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _check(rc: int, query, key, bounds) -> None:
    if rc:
        raise RuntimeError(f'the CPU attention kernel refused q {tuple(query.shape)}, k {tuple(key.shape)}'
                           f'{"" if bounds is None else f", bounds {bounds.tolist()}"} '
                           f'({"out of memory" if rc == 2 else "sizes it does not take"})')


def _bounds(bounds: Optional[torch.Tensor], query, key):
    """``bounds`` as the kernel reads them (int64, contiguous, ``[B, S + 1]``: one row for each of ``query``'s) and
    their pointer and row length; the kernel checks each row's values."""
    if bounds is None:
        return None, None, 0
    bounds = bounds.to(torch.int64).contiguous()
    if bounds.dim() != 2 or bounds.shape[0] != query.shape[0]:
        _check(1, query, key, bounds)
    return bounds, bounds.data_ptr(), bounds.shape[-1]


def _check_inputs(query, key, value, bounds, *more) -> None:
    """``ValueError`` for inputs the kernel would read wrongly (it reads raw pointers: fp32 read as bf16, a smaller
    key batch past its end, bounds on another device as host memory); ``more``: ``(name, tensor, shape, dtype)``."""
    named = [('query', query), ('key', key), ('value', value)]
    for name, t in named:
        if t.dtype != torch.bfloat16 or t.device.type != 'cpu' or t.dim() != 4:
            raise ValueError(f'the CPU attention kernel takes 4-D bf16 CPU tensors: {name} is {t.dim()}-D '
                             f'{t.dtype} on {t.device}')
    b, h, n, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[-1] != d or key.shape[1] == 0 \
            or h % key.shape[1]:
        raise ValueError(f'the CPU attention kernel takes q [B, H, N, D] with k and v [B, KVH, M, D], H a multiple '
                         f'of KVH: got q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}')
    for name, t, shape, dtype in more:
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device.type != 'cpu':
            raise ValueError(f'the CPU attention kernel\'s backward takes {name} {tuple(shape)} {dtype} on the '
                             f'CPU: got {tuple(t.shape)} {t.dtype} on {t.device}')
    if bounds is not None and (bounds.device.type != 'cpu' or bounds.dtype.is_floating_point
                               or bounds.dtype.is_complex or bounds.dtype == torch.bool):
        raise ValueError(f'the CPU attention kernel takes bounds as whole numbers on the CPU: got {bounds.dtype} on '
                         f'{bounds.device}')


def _forward(query, key, value, scale: float, causal: bool, lse: bool, bounds: Optional[torch.Tensor]):
    _check_inputs(query, key, value, bounds)
    query, key, value = _rows(query, key, value)
    b, h, n, d = query.shape
    out = torch.empty(b, n, h, d, dtype=query.dtype)
    sums = torch.empty(b, h, n, dtype=torch.float32) if lse else None
    kept, pointer, nb = _bounds(bounds, query, key)
    rc = _lib().attn_fwd(query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(),
                         sums.data_ptr() if lse else None, b, h, key.shape[1], n, key.shape[2], d,
                         *_strides(query, key, value, out.transpose(1, 2)), scale, int(causal),
                         torch.get_num_threads(), pointer, nb)
    _check(rc, query, key, kept)
    return out, sums


@torch.library.custom_op('xtuner_plugins::cpu_bf16_attention', mutates_args=())
def cpu_bf16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       causal: bool = False, bounds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q ``[B, H, N, D]``, k and v ``[B, KVH, M, D]`` (bf16, CPU; the query heads
    a multiple of the key/value heads, which serve ``H / KVH`` query heads each), returned as ``[B, N, H, D]``
    (the layout transformers' attention functions return); causal: ``N == M``, query i sees keys 0..i.
    ``bounds`` (``[B, S + 1]``, each row's samples: 0, ends ascending, N; ``N == M``): each sample of a packed row
    attended on its own, in one call (no Python loop over samples). No gradient: :func:`cpu_bf16_attention_train`
    is the one autograd goes through."""
    return _forward(query, key, value, scale, causal, lse=False, bounds=bounds)[0]


def _same_device(query, bounds) -> None:
    if bounds is not None and bounds.device != query.device:   # bounds on the meta device ran this, unchecked
        raise ValueError(f'the CPU attention kernel takes bounds on the query\'s device ({query.device}): got '
                         f'{bounds.device}')


@cpu_bf16_attention.register_fake
def _(query, key, value, scale, causal=False, bounds=None):
    _same_device(query, bounds)
    b, h, n, d = query.shape
    return query.new_empty(b, n, h, d)


@torch.library.custom_op('xtuner_plugins::cpu_bf16_attention_train', mutates_args=())
def cpu_bf16_attention_train(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                             causal: bool, bounds: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`cpu_bf16_attention` and each query's log-sum-exp of its scaled scores (``[B, H, N]`` fp32), which
    its backward reads; differentiable in q, k and v."""
    return _forward(query, key, value, scale, causal, lse=True, bounds=bounds)


@cpu_bf16_attention_train.register_fake
def _(query, key, value, scale, causal, bounds=None):
    _same_device(query, bounds)
    b, h, n, d = query.shape
    return query.new_empty(b, n, h, d), query.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op('xtuner_plugins::cpu_bf16_attention_backward', mutates_args=())
def cpu_bf16_attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                                bounds: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`cpu_bf16_attention_train` for ``grad`` (``[B, N, H, D]``, as its output)."""
    b, h, n, d = query.shape
    _check_inputs(query, key, value, bounds, ('grad', grad, (b, n, h, d), query.dtype),
                  ('out', out, (b, n, h, d), query.dtype), ('lse', lse, (b, h, n), torch.float32))
    query, key, value, out, grad = _rows(query, key, value, out, grad)
    kept, pointer, nb = _bounds(bounds, query, key)
    dq = torch.empty(b, n, h, d, dtype=query.dtype).transpose(1, 2)
    dk = torch.zeros(key.shape, dtype=torch.float32)
    dv = torch.zeros(value.shape, dtype=torch.float32)
    rc = _lib().attn_bwd(query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), grad.data_ptr(),
                         lse.contiguous().data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), b, h,
                         key.shape[1], n, key.shape[2], d,
                         *_strides(query, key, value, out.transpose(1, 2), grad.transpose(1, 2), dq), scale,
                         int(causal), torch.get_num_threads(), pointer, nb)
    _check(rc, query, key, kept)
    return dq, dk.to(key.dtype), dv.to(value.dtype)


@cpu_bf16_attention_backward.register_fake
def _(grad, query, key, value, out, lse, scale, causal, bounds=None):
    b, h, n, d = query.shape   # as the real one: dq a transposed [B, N, H, D], dk and dv contiguous
    return (query.new_empty(b, n, h, d).transpose(1, 2), key.new_empty(key.shape, dtype=key.dtype),
            value.new_empty(value.shape, dtype=value.dtype))


def _setup(ctx, inputs, output):
    query, key, value, scale, causal, bounds = inputs
    ctx.save_for_backward(query, key, value, *output, bounds)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(output[1])   # the log-sum-exp: its gradient is not computed (it was taken as 0)


def _backward(ctx, grad, _grad_lse):
    query, key, value, out, lse, bounds = ctx.saved_tensors
    dq, dk, dv = cpu_bf16_attention_backward(grad, query, key, value, out, lse, ctx.scale, ctx.causal, bounds)
    return dq, dk, dv, None, None, None


torch.library.register_autograd('xtuner_plugins::cpu_bf16_attention_train', _backward, setup_context=_setup)


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
