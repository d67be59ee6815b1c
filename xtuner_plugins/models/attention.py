"""The LLM's attention mask for a batch: padded rows, or packed rows whose samples never see each other.

:func:`llm_attention` picks the mask for the LLM's attention implementation:

* padded rows (one sample each): the collate function's ``[B, L]`` padding mask, which transformers turns into
  a causal one (``sdpa``, ``eager``, ``flash_attention_2``), or a document-causal ``BlockMask`` (``flex_attention``);
* packed rows (``seq_lens``, see ``data/packing.py``): :func:`packed_segments` gives each token its sample,
  then a dense block-diagonal causal mask (``sdpa``, ``eager``: ``L x L`` per row), FlexAttention's
  ``BlockMask`` (blocks across samples skipped), or no mask at all for flash attention's varlen kernels, which
  read the samples from the restarting ``position_ids``, and for ``sdpa_segments`` (:func:`segment_sdpa`: causal
  SDPA on each sample of the row in turn, memory linear in the row's length; the CPU's packed attention) and
  ``sdpa_varlen`` (:func:`varlen_sdpa`: every sample of the batch in one call of PyTorch's ``varlen_attn``, its
  FlashAttention varlen kernel, on a CUDA GPU; elsewhere :func:`segment_sdpa`).

The segments also tell the loss which sample a token belongs to: :func:`sample_index` numbers the samples of
the whole batch (``loss.token_weights``, ``preference.sequence_logps``).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Dict, Iterator, Optional, Tuple

import torch

from xtuner_plugins.errors import Refused

from . import cpu_attention

__all__ = ['ATTN_IMPLEMENTATIONS', 'SEGMENT_ATTENTION', 'VARLEN_ATTENTION', 'SEGMENTED', 'cudnn_attention_off',
           'segment_sdpa', 'varlen_sdpa', 'segment_bounds', 'block_causal_mask', 'document_block_mask',
           'llm_attention', 'packed_segments', 'sample_index']

SEGMENT_ATTENTION = 'sdpa_segments'
VARLEN_ATTENTION = 'sdpa_varlen'
SEGMENTED = (SEGMENT_ATTENTION, VARLEN_ATTENTION)   # the implementations that read packed rows' segment_bounds
ATTN_IMPLEMENTATIONS = ('sdpa', 'flash_attention_2', 'eager', 'flex_attention', *SEGMENTED)


def cudnn_attention_off() -> None:
    """Turn PyTorch's cuDNN SDPA backend off, process-wide (the model's ``cudnn_attention=False``): it builds
    kernels for every sequence length new to the machine, 3-4 s each on an H100 (benchmarks/RESULTS.md)."""
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        if torch.cuda.is_available():
            from mmengine.logging import print_log
            print_log("cuDNN SDPA off (cudnn_attention=False): attention on PyTorch's flash kernel",
                      logger='current')


def segment_bounds(seq_lens, length: int) -> torch.Tensor:
    """Per row, the token offsets where its samples (and its padding tail) start and end, ``[0, n1, n1 + n2, ...,
    length]``, as one CPU ``int64`` tensor ``[B, S + 1]`` (rows with fewer samples repeat ``length``: empty
    segments). A tensor and not Python lists: a compiled block (``compile.py``) passes it through as one input
    whatever the packing, where lists would be guarded on, element by element, and compiled again."""
    rows = []
    for lens in seq_lens:
        bounds = [0]
        for n in lens:
            bounds.append(bounds[-1] + int(n))
        if bounds[-1] < length:
            bounds.append(length)
        rows.append(bounds)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [length] * (width - len(r)) for r in rows], dtype=torch.int64)


#: set while an LLM runs packed rows under sdpa_segments / sdpa_varlen (:func:`packed_rows`): each of its attention
#: calls must then get the rows' ``segment_bounds`` and no mask
_PACKED: contextvars.ContextVar = contextvars.ContextVar('xtuner_plugins_packed_rows', default=False)


@contextlib.contextmanager
def packed_rows(packed: bool) -> Iterator[None]:
    """While the LLM runs packed rows (``packed``: its call carries ``segment_bounds``), an attention call of
    :func:`segment_sdpa` / :func:`varlen_sdpa` that gets no bounds, or a mask, is refused: the LLM's code did not
    pass the attention interface's keywords on (GPT-2, Falcon-H1) or built its own causal mask (OPT, Persimmon), and
    the samples of a row would have attended to each other without a word."""
    token = _PACKED.set(bool(packed))
    try:
        yield
    finally:
        _PACKED.reset(token)


def _refuse_unbounded(module, bounds, attention_mask) -> None:
    if _PACKED.get() and (bounds is None or attention_mask is not None):
        why = 'gets no segment_bounds from its model' if bounds is None else 'gets a mask its model built'
        raise Refused(f'{type(module).__name__} {why}, so under {SEGMENT_ATTENTION} / {VARLEN_ATTENTION} the samples '
                      f"of a packed row would attend to each other: set model.attn_implementation='sdpa' (a block "
                      f'mask per row), or train unpacked')


@torch.compiler.disable   # the loop over samples stays eager inside a compiled block: one graph for any packing
def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                 **kwargs):
    """transformers' attention interface for ``sdpa_segments``: with ``segment_bounds`` (packed rows) causal SDPA
    on each sample's own queries, keys and values, so no ``L x L`` mask and no score across samples is ever made;
    without (padded rows, right padding as the collate function pads) plain causal SDPA."""
    bounds = kwargs.pop('segment_bounds', None)
    _refuse_unbounded(module, bounds, attention_mask)
    window = kwargs.pop('sliding_window', None)   # this layer's (transformers passes it; None for a full layer)
    gqa = query.shape[1] != key.shape[1]   # grouped heads read in place: no copy of the keys and values per group
    if bounds is None or attention_mask is not None:   # SDPA, or the CPU kernel where it computes the same
        if window and attention_mask is None and query.shape[2] > window:   # padded rows longer than the window
            return windowed_sdpa(query, key, value, dropout, scaling, gqa, window).transpose(1, 2).contiguous(), None
        return cpu_attention.attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       is_causal=True if attention_mask is None else is_causal, **kwargs)
    slides = bool(window) and int((bounds[:, 1:] - bounds[:, :-1]).max()) > window   # a sample longer than it
    whole = None if slides else cpu_attention.packed_causal(module, query, key, value, dropout, scaling, bounds)
    if whole is not None:   # every sample in one call of the CPU kernel
        return whole, None
    rows = []
    # split, not slices: a slice's backward writes its gradient into a zero-filled copy of the whole input, once
    # per sample and input, where split's backward concatenates the pieces once
    for cuts, q_row, k_row, v_row in zip(bounds.tolist(), query.split(1), key.split(1), value.split(1)):
        sizes = [end - start for start, end in zip(cuts[:-1], cuts[1:])]
        parts = [windowed_sdpa(q, k, v, dropout, scaling, gqa, window) if slides and q.shape[2] > window else
                 cpu_attention.causal_sdpa(module, q, k, v, dropout, scaling, gqa)
                 for q, k, v in zip(q_row.split(sizes, 2), k_row.split(sizes, 2), v_row.split(sizes, 2))
                 if q.shape[2]]   # a row with fewer samples than the widest has empty segments
        rows.append(torch.cat(parts, dim=2))
    if not rows:   # an empty batch
        return query.transpose(1, 2).new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def windowed_sdpa(query, key, value, dropout: float, scaling: Optional[float], gqa: bool,
                  window: int) -> torch.Tensor:
    """Causal SDPA within a sliding ``window`` (``[B, H, N, D]`` in and out): a query attends to the keys fewer
    than ``window`` positions before it and itself, as transformers' sliding-window mask allows
    (``kv_idx > q_idx - window``). The queries go in blocks of ``window``, each with the keys its window reaches
    (at most ``2 * window - 1``): scores and mask for a block and its keys only, not ``N x N``."""
    length, step, outs = query.shape[2], max(int(window), 1), []
    for start in range(0, length, step):
        end, first = min(length, start + step), max(0, start - step + 1)
        behind = (torch.arange(start, end, device=query.device)[:, None]
                  - torch.arange(first, end, device=query.device)[None, :])
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, first:end], value[:, :, first:end], attn_mask=(behind >= 0) & (
                behind < window), dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


#: the device whose ``varlen_attn`` :func:`varlen_sdpa` calls (tests point it at the CPU, with a reference kernel)
VARLEN_DEVICE = 'cuda'


def varlen_dtype(query: torch.Tensor, dropout: float) -> Optional[torch.dtype]:
    """The precision :func:`varlen_sdpa` gives ``query``'s attention to ``varlen_attn`` in, or None where that
    FlashAttention kernel cannot take it: half-precision CUDA tensors, and fp32 ones under CUDA autocast to a half
    precision, which casts SDPA's inputs alike (a recipe that trains fp32 weights under bf16 autocast has fp32
    queries after RoPE); no dropout."""
    device = query.device.type
    if dropout or device != VARLEN_DEVICE:
        return None
    dtype = query.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def varlen_attn(query, key, value, *args, enable_gqa: bool = False, **kwargs):
    """PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (imported on use; tests put a reference in its place).
    Its ``enable_gqa`` came after torch 2.11, whose kernel takes as many key/value heads as query heads: there the
    key/value heads are repeated for it."""
    from torch.nn.attention.varlen import varlen_attn as kernel
    if not enable_gqa:
        return kernel(query, key, value, *args, **kwargs)
    if 'enable_gqa' in inspect.signature(kernel).parameters:
        return kernel(query, key, value, *args, enable_gqa=True, **kwargs)
    key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    return kernel(query, key, value, *args, **kwargs)


@torch.compiler.disable
def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """transformers' attention interface for ``sdpa_varlen``: packed rows (``segment_bounds``) flattened into one
    sequence of samples, ``[B x L, heads, D]`` with their cumulative bounds, and attended in one call of
    ``varlen_attn`` (causal within each sample, within a sliding layer's window; grouped key/value heads read in
    place), where
    :func:`segment_sdpa` calls SDPA once per sample: no Python loop over samples and no small kernels. A row's
    padding tail is one more sample, as in :func:`segment_sdpa`. Where the kernel cannot run
    (:func:`varlen_dtype`: a CPU, fp32 outside autocast, dropout) and for padded rows, :func:`segment_sdpa`."""
    bounds = kwargs.get('segment_bounds')
    dtype = varlen_dtype(query, dropout)
    if bounds is None or attention_mask is not None or dtype is None:
        return segment_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
    rows, heads, length, width = query.shape
    # [B, heads, L, D] -> [B x L, heads, D] in the kernel's precision, in at most one copy each (``to`` returns a
    # tensor already in that precision as it is, strides and all: then ``reshape`` copies, where ``view`` failed)
    flat = [t.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).reshape(rows * length, t.shape[1],
                                                                                       width)
            for t in (query, key, value)]
    # each row's bounds shifted to where the row starts in the flat sequence; a row's end is the next one's start,
    # and a row with fewer samples than the widest repeats its end: both collapse to one bound
    cuts = torch.unique_consecutive((bounds + torch.arange(rows)[:, None] * length).reshape(-1))
    longest = int((bounds[:, 1:] - bounds[:, :-1]).max())
    cuts = cuts.to(device=query.device, dtype=torch.int32)
    # a sliding layer's window (transformers passes it; None for a full layer): a query sees itself and the
    # window - 1 keys before it (transformers' kv_idx > q_idx - window), FlashAttention's left window
    window = kwargs.get('sliding_window')
    out = varlen_attn(*flat, cuts, cuts, longest, longest, scale=scaling,
                      window_size=(int(window) - 1 if window else -1, 0), enable_gqa=key.shape[1] != heads)
    return out.view(rows, length, heads, width), None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa)


_register()


def sliding_window(config) -> Optional[int]:
    """The window of an LLM whose layers (some of them) attend to the last N tokens only (Mistral v0.1, Gemma-2
    and 3, Qwen2 with ``use_sliding_window``), read as transformers reads it; None for full attention."""
    window = getattr(config, 'sliding_window', None)
    if not window:
        return None
    kinds = getattr(config, 'layer_types', None)
    if kinds is not None:
        return int(window) if 'sliding_attention' in kinds else None
    return None if getattr(config, 'use_sliding_window', True) is False else int(window)


#: the attention implementations that apply an LLM's attention-logit soft-capping (transformers passes ``softcap``
#: to each; its SDPA, and this project's segment and varlen kernels, take no such argument and drop it)
SOFTCAPPING = ('eager', 'flex_attention', 'flash_attention_2')


def check_softcap(cap: Optional[float], attn: str) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`) an LLM that caps its attention logits at ``cap`` (Gemma 2's
    ``attn_logit_softcapping``: ``cap * tanh(score / cap)``) under an attention implementation that would train it
    without the cap, which its converted folders (run eager for it), vLLM and llama.cpp apply."""
    if cap and attn not in SOFTCAPPING:
        raise Refused(f'the LLM caps its attention logits (attn_logit_softcapping {cap}), which '
                      f'attn_implementation={attn!r} does not apply: it would train attention the model never runs; '
                      f"set model.attn_implementation to 'eager' (or 'flex_attention' / 'flash_attention_2' on a GPU)")


def check_window(data: Dict[str, torch.Tensor], embeds: torch.Tensor, attn: str, window: Optional[int]) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`) a batch whose attention would ignore the LLM's sliding
    ``window``: packed rows under ``sdpa`` and ``eager`` (their block-causal masks attend over the whole sample) and
    ``flex_attention`` (the same), with a sample longer than the window. It trained silently on attention the model
    never runs: a tiny Mistral's converted folder answered otherwise, logits 4.8 off. ``sdpa_segments`` applies each
    layer's window (:func:`windowed_sdpa`), as flash attention's varlen kernel does, and so does ``sdpa_varlen``
    (its kernel's ``window_size``; as segments off its kernel's device)."""
    packed = data.get('seq_lens') is not None
    if not window or attn in ('flash_attention_2', *SEGMENTED) or (not packed and attn != 'flex_attention'):
        return
    if packed:
        longest = max((int(n) for lens in data['seq_lens'] for n in lens), default=0)
    else:
        mask = data.get('attention_mask')
        longest = int(mask.sum(1).max()) if mask is not None else embeds.shape[1]
    if longest > window:
        from xtuner_plugins.errors import Refused
        how = 'packed rows' if packed else f'attn_implementation={attn!r}'
        raise Refused(f'the LLM attends through a sliding window of {window} tokens, which {how} do not apply: a '
                      f'sample of {longest} tokens would train attention the model never runs; set '
                      f'attn_implementation=\'{SEGMENT_ATTENTION}\', which applies it (or flash_attention_2 on a GPU), '
                      f'or keep samples within {window} tokens (max_length)')


#: the layers whose state runs along a row from token to token, whatever the attention mask (Mamba's in Falcon-H1,
#: Bamba, Jamba; short convolutions; gated delta nets; RWKV), by their class names
RECURRENT_LAYERS = ('Mamba', 'Mixer', 'ShortConv', 'GatedDeltaNet', 'RecurrentBlock', 'Rwkv')


def recurrent_layer(llm: torch.nn.Module) -> Optional[str]:
    """The class name of the LLM's first layer of :data:`RECURRENT_LAYERS`, or None."""
    return next((type(m).__name__ for m in llm.modules()
                 if any(mark in type(m).__name__ for mark in RECURRENT_LAYERS)), None)


def llm_attention(data: Dict[str, torch.Tensor], embeds: torch.Tensor, attn: str, window: Optional[int] = None,
                  recurrent: Optional[str] = None) -> Tuple[object, Optional[torch.Tensor]]:
    """``(attention_mask for the LLM, [B, L] sample ids of packed rows or None)`` for a batch (see the module
    docstring); ``attn`` the LLM's attention implementation, ``window`` its sliding window (:func:`check_window`);
    ``recurrent`` its :func:`recurrent_layer`, whose state would run from one packed sample into the next: packed rows
    refused."""
    check_window(data, embeds, attn, window)
    attention_mask = data.get('attention_mask')
    if data.get('seq_lens') is not None and recurrent:
        raise Refused(f'packed rows: the LLM\'s {recurrent} layers carry their state along the row, from one sample '
                      f'into the next, whatever the attention keeps apart; train it unpacked (a config without '
                      f'_packed, or without its packing wrapper)')
    if data.get('seq_lens') is not None:  # packed rows: attention never crosses samples
        segments = packed_segments(data['seq_lens'], embeds.shape[1], embeds.device)
        if attn in ('flash_attention_2', *SEGMENTED):
            return None, segments  # varlen kernels from the restarting position ids; ours from segment_bounds
        if attn == 'flex_attention':
            return document_block_mask(segments), segments
        return block_causal_mask(segments, embeds.dtype), segments
    if attn == 'flex_attention' and attention_mask is not None:  # padded rows: one sample each
        real = attention_mask.to(embeds.device).bool()
        return document_block_mask(torch.where(real, 0, -1)), None
    return attention_mask, None


def packed_segments(seq_lens, length: int, device) -> torch.Tensor:
    """``[B, L]`` sample ids of packed rows from per-row sample lengths; padding is -1."""
    rows = []
    for lens in seq_lens:
        lens = torch.as_tensor(lens, device=device)
        ids = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
        rows.append(torch.cat([ids, ids.new_full((length - ids.numel(),), -1)]))
    return torch.stack(rows)


def sample_index(segments: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(each token's sample numbered over the batch, row after row, -1 on padding [B, L]; samples per row
    [B])`` for packed rows' ``segments`` (sample ids 0, 1, ... within each row, -1 on padding)."""
    per_row = segments.max(-1).values.clamp(min=-1) + 1
    first = per_row.cumsum(0) - per_row
    return torch.where(segments >= 0, segments + first[:, None], -1), per_row


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, L, L]`` mask: a token sees the earlier tokens of its own sample only (padding sees
    itself, so no row is empty)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def document_block_mask(segments: torch.Tensor, block: int = 128):
    """FlexAttention's ``BlockMask`` of :func:`block_causal_mask` from ``[B, L]`` sample ids: a token sees the
    earlier tokens of its own sample; padding (-1) sees the earlier padding, so no row is empty.

    Built from each ``block``-token tile's first and last sample, with no ``L x L`` pass: sample ids never
    decrease along a row (padding comes last), so a query tile sees a key tile at or before it iff the key
    tile's last sample is at least the query tile's first, and every pair of the two is allowed (the kernel
    skips the mask function there) when both tiles hold one and the same sample and the key tile is earlier.
    Hand-written because ``create_block_mask`` evaluates the mask on every pair: compiled, on an H100 with
    torch 2.11 its Triton build took over two minutes for a 16384-token pack (measured, benchmarks/RESULTS.md);
    eagerly it materialises ``L x L`` tensors."""
    from torch.nn.attention.flex_attention import BlockMask

    def same_sample_causal(b, h, q, kv):
        return (segments[b, q] == segments[b, kv]) & (kv <= q)
    batch, length = segments.shape
    tiles = -(-length // block)
    ids = torch.where(segments >= 0, segments, segments.max() + 1)  # padding: one more sample, last
    ids = torch.cat([ids, ids[:, -1:].expand(batch, tiles * block - length)], dim=1).view(batch, tiles, block)
    first, last = ids.amin(-1), ids.amax(-1)
    causal = torch.ones(tiles, tiles, dtype=torch.bool, device=segments.device).tril()
    seen = causal & (last[:, None, :] >= first[:, :, None])  # [B, query tile, key tile]
    one = (first == last)
    one[:, -1] &= length % block == 0  # a tile past the row's end is masked by the mask function
    full = seen & causal.tril(-1) & one[:, :, None] & one[:, None, :]  # seen: then both hold the same sample
    partial = seen & ~full

    def blocks(allowed):  # counts and indices (allowed ones first, in order) per query tile, one head
        order = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True)
        return allowed.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=same_sample_causal,
                                    seq_lengths=(length, length))
