"""LoRA adapters through peft, for the LLM and (optionally) the vision tower.

Settings are peft ``LoraConfig`` arguments as a plain dict (``type=LoraConfig`` is accepted and
ignored, as in XTuner configs); ``target_modules`` defaults to ``'all-linear'`` (for a causal LM peft
leaves ``lm_head`` out). The base weights are frozen by peft; the adapters stay in fp32 when the base is
bf16/fp16 (peft's ``autocast_adapter_dtype``). Their input dropout draws its mask 16 bits an element on a CPU
(``dropout.CpuDropout``: the draws a third of ``nn.Dropout``'s; dropout was half a CPU LoRA step).
"""

from __future__ import annotations

from typing import Optional

from torch import nn


def apply_lora(model: nn.Module, lora: dict, task_type: Optional[str] = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters described by ``lora`` (peft ``LoraConfig`` arguments)."""
    from peft import LoraConfig, get_peft_model
    cfg = {k: v for k, v in dict(lora).items() if k != 'type'}
    cfg.setdefault('target_modules', 'all-linear')
    if task_type is not None:
        cfg.setdefault('task_type', task_type)
    from .dropout import use_cpu_dropout
    model = get_peft_model(model, LoraConfig(**cfg))
    use_cpu_dropout(model)
    return model
