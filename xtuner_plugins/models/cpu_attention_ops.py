"""The AVX-512 BF16 attention kernel as torch operators: forward, forward with log-sum-exp, backward, autograd.

:func:`cpu_bf16_attention` (no gradient), :func:`cpu_bf16_attention_train` (differentiable in q, k and v) and
:func:`cpu_bf16_attention_backward` are ``torch.library`` custom ops (``xtuner_plugins::cpu_bf16_attention*``, with
fake implementations for tracing) over the C library of ``cpu_attention_build.py``; inputs the kernel would read
wrongly (it reads raw pointers) are refused with ``ValueError`` first. Which calls take them: ``cpu_attention.py``.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import torch

from .cpu_attention_build import library


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
                                bounds: Optional[torch.Tensor] = None
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
