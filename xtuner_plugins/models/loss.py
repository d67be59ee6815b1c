"""Next-token cross-entropy with a choice of reduction, normalised globally across ranks.

``reduction``:

* ``'token'``: every supervised token weighs the same (the usual mean over tokens);
* ``'sample'``: every sample weighs the same (mean over samples of each sample's token mean);
* ``'square'``: InternVL 2.5's square averaging, each supervised token of a sample with ``n`` supervised
  tokens weighs ``n ** -0.5``, a middle ground that neither drowns short answers nor long ones.

The loss is ``sum(w * CE) / sum(w)``. In distributed training ``sum(w)`` is all-reduced over the ranks
and the local loss is scaled by the world size, so that after DDP/DeepSpeed average the gradients over
ranks the result is the gradient of the global ``sum(w * CE) / sum(w)``, whatever each rank's batch holds.
(Hand-written: no library offers these weightings with a global denominator.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xtuner_plugins.data.template import IGNORE_INDEX

from .attention import sample_index
from .head import decoder_of, head_of, refuse_logit_transform, unwrapped

REDUCTIONS = ('token', 'sample', 'square')


def token_weights(mask: torch.Tensor, reduction: str, segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token weights ``[B, L]`` for a supervision mask ``[B, L]``. A sample is a row, or with
    ``segments`` (``[B, L]`` sample ids within each row, for packed sequences) a segment of a row."""
    if reduction not in REDUCTIONS:
        raise ValueError(f'unknown loss reduction {reduction!r}; use one of {REDUCTIONS}')
    maskf = mask.float()
    if reduction == 'token':
        return maskf
    if segments is None:
        index = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    else:  # padding (-1) has no supervised token: any sample's slot serves
        index = sample_index(segments)[0].clamp(min=0)
    counts = maskf.new_zeros(int(index.max()) + 1).index_add_(0, index.reshape(-1), maskf.reshape(-1))
    n = counts[index].clamp(min=1)
    return maskf / n if reduction == 'sample' else maskf * n.rsqrt()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions ``p`` whose next token ``p + 1`` is supervised in some row of ``labels [B, L]``: the
    only positions whose logits the loss reads (1-D, ascending)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def _targets_and_weights(states: torch.Tensor, labels: torch.Tensor, reduction: str,
                         segments: Optional[torch.Tensor], positions: Optional[torch.Tensor]):
    """``(states, targets, weights)``: ``states [B, L or K, ...]`` (logits or hidden states) without the last
    position (``positions`` None) or as given (those ``K`` positions), the targets ``[B, n]`` they predict and
    the tokens' weights (:func:`token_weights`)."""
    labels = labels.to(states.device)
    if positions is None:
        states, targets = states[:, :-1], labels[:, 1:]
        segments = None if segments is None else segments[:, 1:]
    else:
        positions = positions.to(states.device)
        if states.shape[1] != positions.numel():
            raise ValueError(f'{states.shape[1]} positions of logits for {positions.numel()} positions')
        targets = labels[:, positions + 1]
        segments = None if segments is None else segments[:, positions.to(segments.device) + 1]
    mask = targets != IGNORE_INDEX
    return states, targets, token_weights(mask, reduction, None if segments is None else segments.to(mask.device))


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction='none')
    return (weights.reshape(-1) * ce).sum()


_COMPILED_CE = None


def weighted_ce(compiled: bool = False):
    """The weighted cross-entropy of logits, eager or ``torch.compile``'d (dynamic shapes: a new number of
    supervised tokens reuses the graph). Compiled, the fp32 upcast, log-softmax, pick and their backward are one
    pass over the logits instead of fp32 copies of them written and read again (a 150k vocabulary: 600 KB a
    token each); the model compiles it where it compiles its LLM's blocks (``compile_blocks``). On the AMX Xeon
    (benchmarks/RESULTS.md) forward and backward of 1,000 bf16 tokens took 0.92 s against 1.41 eager, of 3,000
    2.7 s against 5.8-7.3 s, and the fp32 log-probabilities kept for the backward are not kept."""
    global _COMPILED_CE
    if not compiled:
        return _weighted_ce
    if _COMPILED_CE is None:
        _COMPILED_CE = torch.compile(_weighted_ce, dynamic=True)
    return _COMPILED_CE


def _normalised(numerator: torch.Tensor, weights: torch.Tensor, global_denominator: bool) -> torch.Tensor:
    denominator = weights.sum().detach()
    scale = 1.0
    if global_denominator and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM)
        scale = float(dist.get_world_size())
    if denominator.item() == 0:
        raise ValueError('the batch has no supervised token on any rank')
    return numerator * scale / denominator


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = 'token',
                   global_denominator: bool = True, segments: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None, compiled: bool = False) -> torch.Tensor:
    """Shifted cross-entropy of ``logits [B, L, V]`` against ``labels [B, L]`` (``-100`` = not supervised);
    ``segments [B, L]`` are sample ids of packed rows (see :func:`token_weights`).

    ``positions``: the logits are ``[B, K, V]``, those of these ``K`` positions only
    (:func:`supervised_positions` of ``labels``, or any superset); the loss is the same as with all of them.
    ``compiled``: the cross-entropy through ``torch.compile`` (:func:`weighted_ce`).
    """
    logits, targets, weights = _targets_and_weights(logits, labels, reduction, segments, positions)
    return _normalised(weighted_ce(compiled)(logits, targets, weights), weights, global_denominator)


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int,
                           reduction: str = 'token', global_denominator: bool = True,
                           segments: Optional[torch.Tensor] = None,
                           positions: Optional[torch.Tensor] = None, compiled: bool = False) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``head(hidden)`` without its logits: ``hidden [B, K, H]`` (the last hidden
    states at ``positions``, or at every position) goes through ``head`` (the LM head) and the cross-entropy
    ``chunk`` positions at a time, each chunk checkpointed (its logits made again in the backward), so that at
    most ``B x chunk x V`` logits exist at once instead of ``B x K x V``. The same loss and gradients.
    (Hand-written: transformers has no chunked loss; Liger's fused linear cross-entropy, :func:`fused_causal_lm_loss`,
    is Triton, GPU-only.)
    """
    if chunk < 1:
        raise ValueError(f'chunk must be >= 1, got {chunk}')
    hidden, targets, weights = _targets_and_weights(hidden, labels, reduction, segments, positions)
    numerator, ce = hidden.new_zeros((), dtype=torch.float32), weighted_ce(compiled)
    for start in range(0, hidden.shape[1], chunk):
        piece = slice(start, start + chunk)
        numerator = numerator + checkpoint(lambda h, t, w: ce(head(h), t, w), hidden[:, piece],
                                           targets[:, piece], weights[:, piece], use_reentrant=False)
    return _normalised(numerator, weights, global_denominator)


def fused_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, reduction: str = 'token',
                         global_denominator: bool = True, segments: Optional[torch.Tensor] = None,
                         positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`chunked_causal_lm_loss` through Liger Kernel's fused linear cross-entropy (``liger.fused_linear_ce``,
    a CUDA GPU): the logits are never whole, nor made twice. With ``'token'`` weights the kernel sums and computes
    the gradients in the forward; other reductions take each token's loss and weigh it here."""
    from .liger import fused_linear_ce
    hidden, targets, weights = _targets_and_weights(hidden, labels, reduction, segments, positions)
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if reduction == 'token':   # weights are the supervision mask: the kernel's sum is the numerator
        numerator = fused_linear_ce(flat, head, targets, IGNORE_INDEX, 'sum')
    else:
        numerator = (weights.reshape(-1) * fused_linear_ce(flat, head, targets, IGNORE_INDEX, 'none')).sum()
    return _normalised(numerator, weights, global_denominator)


def decoder_chunked_loss(llm: torch.nn.Module, embeds: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                         chunk: int, reduction: str = 'token', segments: Optional[torch.Tensor] = None,
                         fused: bool = False, compiled: bool = False, router=None, real: Optional[torch.Tensor] = None,
                         **llm_kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(loss, router loss)``: the SFT loss of a causal LM (a transformers model, or a PEFT wrapper of one) on
    ``embeds`` without its whole logits: its decoder gives the last hidden states, and :func:`chunked_causal_lm_loss`
    runs its LM head and the cross-entropy on those at ``positions`` (:func:`supervised_positions` of ``labels``),
    ``chunk`` at a time (0: at once); ``fused``: :func:`fused_causal_lm_loss` instead (Liger's kernel, which chunks
    on its own). ``router`` (a ``moe.RouterAux`` whose loss is on): the decoder's router logits give its
    load-balancing loss over the ``real`` tokens (``moe.real_tokens``); else the router loss is None.

    Raises:
        ValueError: the LLM transforms its logits after the head (soft-capping, a logit scale), which its own
            forward would apply and this does not.
    """
    setting = "liger_kernel's 'fused_loss'" if fused else 'loss_chunk' if chunk else 'the router load-balancing loss'
    base, hidden, aux = decoder_hidden(llm, embeds, positions, setting, router, real, **llm_kwargs)
    if fused:
        loss = fused_causal_lm_loss(hidden, head_of(base), labels, reduction, segments=segments, positions=positions)
    elif chunk:
        loss = chunked_causal_lm_loss(hidden, base.get_output_embeddings(), labels, chunk, reduction,
                                      segments=segments, positions=positions, compiled=compiled)
    else:
        loss = causal_lm_loss(base.get_output_embeddings()(hidden), labels, reduction, segments=segments,
                              positions=positions, compiled=compiled)
    return loss, aux


def decoder_hidden(llm: torch.nn.Module, embeds: torch.Tensor, positions: Optional[torch.Tensor], setting: str,
                   router=None, real: Optional[torch.Tensor] = None, **llm_kwargs):
    """``(the causal LM under its wrapper, its decoder's last hidden states at positions, router loss or None)`` for a
    loss that runs the LM head itself (``setting`` names it in the refusal of an LLM that transforms its logits after
    the head); ``router`` (a ``moe.RouterAux`` whose loss is on): the decoder's router logits give its
    load-balancing loss over the ``real`` tokens."""
    base = unwrapped(llm)
    refuse_logit_transform(base, setting)
    llm_kwargs = {k: v for k, v in llm_kwargs.items() if k != 'logits_to_keep'}
    llm_kwargs.update(use_cache=False, return_dict=True)
    if router is not None:
        llm_kwargs['output_router_logits'] = True
    out = decoder_of(base)(inputs_embeds=embeds, **llm_kwargs)
    hidden = out.last_hidden_state if positions is None else out.last_hidden_state[:, positions]
    return base, hidden, None if router is None else router.loss(out.router_logits, real)
