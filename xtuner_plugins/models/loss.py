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

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xtuner_plugins.data.template import IGNORE_INDEX

from .attention import sample_index

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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = 'token',
                   global_denominator: bool = True, segments: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shifted cross-entropy of ``logits [B, L, V]`` against ``labels [B, L]`` (``-100`` = not supervised);
    ``segments [B, L]`` are sample ids of packed rows (see :func:`token_weights`).

    ``positions``: the logits are ``[B, K, V]``, those of these ``K`` positions only
    (:func:`supervised_positions` of ``labels``, or any superset); the loss is the same as with all of them.
    """
    labels = labels.to(logits.device)
    if positions is None:
        shift_logits, targets = logits[:, :-1], labels[:, 1:]
        segments = None if segments is None else segments[:, 1:]
    else:
        positions = positions.to(logits.device)
        if logits.shape[1] != positions.numel():
            raise ValueError(f'{logits.shape[1]} positions of logits for {positions.numel()} positions')
        shift_logits, targets = logits, labels[:, positions + 1]
        segments = None if segments is None else segments[:, positions.to(segments.device) + 1]
    shift_logits = shift_logits.float()
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                         targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction='none')
    weights = token_weights(mask, reduction, None if segments is None else segments.to(mask.device))
    numerator = (weights.reshape(-1) * ce).sum()
    denominator = weights.sum().detach()
    scale = 1.0
    if global_denominator and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM)
        scale = float(dist.get_world_size())
    if denominator.item() == 0:
        raise ValueError('the batch has no supervised token on any rank')
    return numerator * scale / denominator
