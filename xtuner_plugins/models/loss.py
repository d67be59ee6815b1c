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

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xtuner_plugins.data.template import IGNORE_INDEX

REDUCTIONS = ('token', 'sample', 'square')


def token_weights(mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token weights ``[B, L]`` for a supervision mask ``[B, L]`` (one row per sample)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f'unknown loss reduction {reduction!r}; use one of {REDUCTIONS}')
    mask = mask.float()
    if reduction == 'token':
        return mask
    n = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask / n if reduction == 'sample' else mask * n.rsqrt()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = 'token',
                   global_denominator: bool = True) -> torch.Tensor:
    """Shifted cross-entropy of ``logits [B, L, V]`` against ``labels [B, L]`` (``-100`` = not supervised)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                         shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction='none')
    weights = token_weights(mask, reduction)
    numerator = (weights.reshape(-1) * ce).sum()
    denominator = weights.sum().detach()
    scale = 1.0
    if global_denominator and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM)
        scale = float(dist.get_world_size())
    if denominator.item() == 0:
        raise ValueError('the batch has no supervised token on any rank')
    return numerator * scale / denominator
