"""The LM head a loss runs itself, outside the LLM's forward (``loss.py``'s chunked loss, Liger's fused loss):
which module it is, and what the LLM's own forward would do to the logits after it that such a loss leaves out.
"""

from __future__ import annotations

import torch
from torch import nn

from xtuner_plugins.errors import Refused


def head_of(llm: nn.Module) -> nn.Linear:
    """The LM head whose weight the fused loss multiplies by: a plain ``nn.Linear`` (not LoRA-wrapped)."""
    base = llm.get_base_model() if hasattr(llm, 'get_base_model') else llm
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise Refused(f"liger_kernel's 'fused_loss' multiplies by the LM head's weight, and this LM head is a "
                      f'{type(head).__name__} (LoRA on lm_head?): leave lm_head out of the adapters, or '
                      "liger_kernel's parts without 'fused_loss'")
    return head


def refuse_logit_transform(llm: torch.nn.Module, setting: str) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`, naming ``setting``: the loss that runs the LM head itself,
    ``loss_chunk`` or Liger's ``'fused_loss'``) an LLM that transforms its logits after the head (soft-capping, a
    logit scale), which its own forward would apply and that loss does not."""
    base = llm.get_base_model() if hasattr(llm, 'get_base_model') else llm
    config = base.config.get_text_config() if hasattr(base.config, 'get_text_config') else base.config
    for name in ('final_logit_softcapping', 'logit_scale'):
        if getattr(config, name, None):
            fix = "leave 'fused_loss' out of liger_kernel" if 'fused_loss' in setting else 'use loss_chunk=0'
            raise Refused(f'{setting}: {type(base).__name__} transforms its logits after the LM head '
                          f'({name}={getattr(config, name)}), which this loss would leave out; {fix}')
