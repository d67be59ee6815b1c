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


#: peft refuses LoRA on a Mamba layer's ``out_proj`` and ``conv1d`` (the fused kernels read their weights) in these
#: model types; their 'all-linear' leaves them out (Falcon-H1's was a ValueError traceback at start-up)
MAMBA_TYPES = ('falcon_h1', 'mamba', 'mamba2', 'falcon_mamba', 'nemotron_h')
MAMBA_UNADAPTED = ('out_proj', 'conv1d')


def apply_lora(model: nn.Module, lora: dict, task_type: Optional[str] = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters described by ``lora`` (peft ``LoraConfig`` arguments)."""
    from peft import LoraConfig, get_peft_model
    cfg = {k: v for k, v in dict(lora).items() if k != 'type'}
    cfg.setdefault('target_modules', 'all-linear')
    config = getattr(model, 'config', None)
    if cfg['target_modules'] == 'all-linear' and getattr(config, 'model_type', None) in MAMBA_TYPES:
        cfg.setdefault('exclude_modules', list(MAMBA_UNADAPTED))
    if task_type is not None:
        cfg.setdefault('task_type', task_type)
    from .dropout import use_cpu_dropout
    check_target_modules(model, cfg['target_modules'])
    model = get_peft_model(model, LoraConfig(**cfg))
    if cfg.get('lora_bias'):
        check_lora_bias(model)
    use_cpu_dropout(model)
    return model


def check_target_modules(model: nn.Module, targets) -> None:
    """Refuse a ``target_modules`` list naming a layer the model has not (peft adapts the names it finds and drops a
    misspelt one without a word, as long as one other matches: ``['qproj', 'v_proj']`` trained ``v_proj`` alone)."""
    if isinstance(targets, str) or not isinstance(targets, (list, tuple, set)):
        return  # 'all-linear', or a regular expression: peft's own
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith('.' + str(t)) for n in names)]
    if missing:
        import difflib

        from xtuner_plugins.errors import Refused
        linear = sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        near = {t: difflib.get_close_matches(str(t), linear, n=1) for t in missing}
        hint = '; '.join(f'{t!r}: closest {near[t][0]}' for t in missing if near[t])
        raise Refused(f'target_modules {list(targets)}: {", ".join(map(repr, missing))} name no layer of the model, so '
                      f'no adapter would train there (its linear layers: {", ".join(linear)})'
                      + (f'; {hint}' if hint else ''))


def check_lora_bias(model: nn.Module) -> None:
    """Refuse ``lora_bias=True`` on layers without a bias of their own: the adapters' bias would train but no
    exported model could hold it (a merge adds it to the layer's bias; transformers' Qwen2 has biases on
    ``q_proj``/``k_proj``/``v_proj`` only, Llama on none)."""
    from peft.tuners.lora import LoraLayer
    bare = sorted({name.rsplit('.', 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, LoraLayer) and getattr(module.get_base_layer(), 'bias', None) is None})
    if bare:
        from xtuner_plugins.errors import Refused
        with_bias = sorted({name.rsplit('.', 1)[-1] for name, module in model.named_modules()
                            if isinstance(module, LoraLayer) and name.rsplit('.', 1)[-1] not in bare})
        raise Refused(f'lora_bias=True: the adapted layers {", ".join(bare)} have no bias of their own, so the bias '
                      f'their adapters would train could not be merged into any exported model; set target_modules to '
                      f'layers with a bias ({", ".join(with_bias) or "none here"}) or leave lora_bias off')
