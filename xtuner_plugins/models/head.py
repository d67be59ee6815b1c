"""The LM head a loss runs itself, outside the LLM's forward (``loss.py``'s chunked loss, Liger's fused loss):
which module it is, and what the LLM's own forward would do to the logits after it that such a loss leaves out.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from xtuner_plugins.errors import Refused


def unwrapped(llm: nn.Module) -> nn.Module:
    """The causal LM under a PEFT wrapper (its base model, LoRA layers in place), or ``llm`` itself."""
    return llm.get_base_model() if hasattr(llm, 'get_base_model') else llm


def head_of(llm: nn.Module) -> nn.Linear:
    """The LM head whose weight the fused loss multiplies by: a plain ``nn.Linear`` (not LoRA-wrapped)."""
    base = unwrapped(llm)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise Refused(f"liger_kernel's 'fused_loss' multiplies by the LM head's weight, and this LM head is a "
                      f'{type(head).__name__} (LoRA on lm_head?): leave lm_head out of the adapters, or '
                      "liger_kernel's parts without 'fused_loss'")
    return head


def decoder_of(base: nn.Module) -> nn.Module:
    """The decoder under a causal LM's head (its ``base_model_prefix`` module: ``model`` for Llama's family,
    ``transformer`` for GPT-2's, whose ``get_decoder()`` gives the whole causal LM back)."""
    decoder = getattr(base, getattr(base, 'base_model_prefix', ''), None)
    return decoder if isinstance(decoder, nn.Module) and decoder is not base else base.get_decoder()


#: what an LLM's own forward does to its logits after the LM head, by its config's setting, and the value that does
#: nothing: Gemma-2's soft-capping, Cohere's logit scale (both off when 0 or None), Granite's division
#: (``logits_scaling``), Falcon-H1's multiplier (``lm_head_multiplier``)
LOGIT_TRANSFORMS = (('final_logit_softcapping', None), ('logit_scale', None), ('logits_scaling', 1.0),
                    ('lm_head_multiplier', 1.0))


def logit_transform(llm: torch.nn.Module) -> Optional[Tuple[str, float]]:
    """``(setting, value)`` of what ``llm`` (a causal LM, a PEFT wrapper of one) does to its logits after its LM
    head (:data:`LOGIT_TRANSFORMS`), or None."""
    base = unwrapped(llm)
    config = base.config.get_text_config() if hasattr(base.config, 'get_text_config') else base.config
    for name, neutral in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != neutral and (neutral is not None or value):
            return name, value
    return None


def refuse_logit_transform(llm: torch.nn.Module, setting: str) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`, naming ``setting``: the loss that runs the LM head itself,
    ``loss_chunk``, Liger's ``'fused_loss'`` or a mixture of experts' load-balancing loss) an LLM that transforms
    its logits after the head (:func:`logit_transform`), which its own forward would apply and that loss does not."""
    found = logit_transform(llm)
    if found:
        base = unwrapped(llm)
        fix = ("leave 'fused_loss' out of liger_kernel" if 'fused_loss' in setting else 'use loss_chunk=0'
               if 'loss_chunk' in setting else 'set model.router_aux_loss_coef=0')
        raise Refused(f'{setting}: {type(base).__name__} transforms its logits after the LM head '
                      f'({found[0]}={found[1]}), which this loss would leave out; {fix}')
