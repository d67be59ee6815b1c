"""A mixture-of-experts LLM's router load-balancing loss (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, ...).

transformers' MoE causal LMs add ``router_aux_loss_coef`` x the Switch Transformer's load-balancing loss to their
loss when their config says ``output_router_logits``, computed inside their forward with the attention mask they
were given. This project computes the loss outside the LLM's forward (``loss.py``), so that addition never reached
it: a config asking for it trained without it, without a word; and packed rows, whose mask is a 4-D block mask
(``sdpa``, ``eager``) or none (``sdpa_segments``), failed in it (``too many values to unpack``) or would have
counted their padding. Here the LLM's own function (its module's ``load_balancing_loss_func``) is called on the
router logits its decoder returns, with the real tokens of the batch (padding out, every packed sample in), and the
LLM's forward is always asked for no router logits of its own.

``model.router_aux_loss_coef`` chooses it: ``None`` (the default) takes the LLM's config: its
``router_aux_loss_coef`` when ``output_router_logits`` is true, else off (Qwen3-30B-A3B's config says false, and
InternVL 3.5's training follows the config); a number turns it on at that coefficient (0: off). It is logged as
``router_aux_loss``, beside ``loss``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from xtuner_plugins.errors import Refused

from .head import unwrapped


@dataclass
class RouterAux:
    """A mixture-of-experts LLM's routing: its experts, how many each token goes to, and the load-balancing loss's
    coefficient (0: off) and function."""

    name: str
    experts: int
    top_k: int
    coef: float
    balance: Callable

    def loss(self, router_logits, real: Optional[torch.Tensor]) -> torch.Tensor:
        """``coef`` x the load-balancing loss of the router logits of every layer over the ``real`` tokens (a
        ``[B, L]`` mask; None: all of them)."""
        logits = tuple(router_logits)
        mask = None if real is None else real.to(logits[0].device)
        return self.coef * self.balance(logits, self.experts, self.top_k, mask)

    def describe(self) -> str:
        switch = ('model.router_aux_loss_coef=0 turns it off' if self.coef else
                  'model.router_aux_loss_coef=0.001 (say) turns it on')
        state = f'on, coefficient {self.coef:g}, logged as router_aux_loss' if self.coef else 'off'
        return (f'the LLM {self.name} routes each token to {self.top_k} of its {self.experts} experts; its router\'s '
                f'load-balancing loss is {state} ({switch})')


def router_aux(llm: nn.Module, coef: Optional[float]) -> Optional[RouterAux]:
    """The routing of ``llm`` (a transformers causal LM, or a PEFT wrapper of one), None for a dense LLM.
    ``coef``: ``model.router_aux_loss_coef`` (module docstring).

    Raises:
        Refused: ``coef`` is no finite number >= 0, or given for an LLM that has no load-balancing loss.
    """
    check_coef(coef)
    base = unwrapped(llm)
    config = base.config
    routed = routing(config)
    balance = getattr(sys.modules.get(type(base).__module__), 'load_balancing_loss_func', None)
    if not (routed and callable(balance) and hasattr(config, 'router_aux_loss_coef')):
        if coef:
            raise Refused(f'model.router_aux_loss_coef={coef}: the LLM {type(base).__name__} has no router '
                          f'load-balancing loss (not a mixture of experts, or one balanced otherwise); leave it out')
        return None
    if coef is None:
        coef = float(config.router_aux_loss_coef) if getattr(config, 'output_router_logits', False) else 0.0
    return RouterAux(type(base).__name__, routed[1], routed[0], float(coef), balance)


def routing(config) -> Optional[Tuple[int, int]]:
    """``(experts each token goes to, experts)`` of a mixture of experts' LLM config (Qwen's ``num_experts``,
    Mixtral's ``num_local_experts``), or None for a dense one."""
    top_k = getattr(config, 'num_experts_per_tok', None)
    experts = getattr(config, 'num_experts', None) or getattr(config, 'num_local_experts', None)
    return (int(top_k), int(experts)) if top_k and experts else None


def check_coef(coef) -> None:
    """Refuse a ``model.router_aux_loss_coef`` that is neither None nor a finite number >= 0 (before loading)."""
    if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef)
                             or coef < 0):
        raise Refused(f'model.router_aux_loss_coef={coef!r}: give a number >= 0 (0: off), or None for the LLM '
                      f'config\'s own')


def no_router_logits(router: Optional[RouterAux]) -> Dict[str, bool]:
    """The keyword that keeps an MoE LLM's own forward from computing the load-balancing loss (with this project's
    masks: a 4-D block mask failed in it); {} for a dense LLM, whose forward may not take it."""
    return {} if router is None else {'output_router_logits': False}


def real_tokens(data: Dict[str, torch.Tensor], segments: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[B, L]`` mask of a batch's real tokens: packed rows' samples (``segments`` >= 0), padded rows' attention
    mask, or None (no padding)."""
    if segments is not None:
        return segments >= 0
    mask = data.get('attention_mask')
    return mask if mask is not None and mask.dim() == 2 else None


def routed_logits(llm: nn.Module, embeds: torch.Tensor, positions: Optional[torch.Tensor], router: RouterAux,
                  real: Optional[torch.Tensor], **llm_kwargs):
    """``(logits at positions, router loss)`` of a causal LM whose load-balancing loss is on: its decoder with its
    router logits, then its LM head (what its own forward does, without its loss of them)."""
    from .loss import decoder_hidden
    base, hidden, aux = decoder_hidden(llm, embeds, positions, 'the router load-balancing loss', router, real,
                                       **llm_kwargs)
    return base.get_output_embeddings()(hidden), aux
