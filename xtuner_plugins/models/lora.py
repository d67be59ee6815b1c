"""LoRA adapters through peft, for the LLM and (optionally) the vision tower.

Settings are peft ``LoraConfig`` arguments as a plain dict (``type=LoraConfig`` is accepted and
ignored, as in XTuner configs); ``target_modules`` defaults to ``'all-linear'`` (for a causal LM peft
leaves ``lm_head`` out). The base weights are frozen by peft; the adapters stay in fp32 when the base is
bf16/fp16 (peft's ``autocast_adapter_dtype``). Their input dropout draws its mask 16 bits an element on a CPU
(``dropout.CpuDropout``: the draws a third of ``nn.Dropout``'s; dropout was half a CPU LoRA step).

``init_lora_weights`` (:func:`check_init`): a checkpoint holds the trained parameters only, and every later use (a
resume, the next stage, the converter) rebuilds the base weights from the source folders and earlier stages. peft's
inits that rewrite the base layers' weights at init (``'pissa'``, ``'pissa_niter_N'``, ``'corda'``, ``'olora'``,
``'loftq'``, ``'lora_ga'``: the adapters take a part of the weight, the base keeps the rest) lost that residual: the
converted model added the principal components twice (39% off on a layer), and a LoRA preference run's reference
(the adapters off) was the residual, not the previous stage. ``'mica'`` freezes ``lora_B`` at an SVD of the base
(in no checkpoint, redrawn on each load), ``'eva'`` needs a data pass training does not run. They are refused when
the model is built, before anything loads; ``True`` (the default) and ``'gaussian'`` keep the base as it is with the
adapters' product 0, and ``False`` / ``'orthogonal'`` (the base kept, the adapters not 0 at the start) are refused
with ``preference`` only, where the policy must start as its reference.
"""

from __future__ import annotations

from typing import Optional

from torch import nn


#: peft refuses LoRA on a Mamba layer's ``out_proj`` and ``conv1d`` (the fused kernels read their weights) in these
#: model types; their 'all-linear' leaves them out (Falcon-H1's was a ValueError traceback at start-up)
MAMBA_TYPES = ('falcon_h1', 'mamba', 'mamba2', 'falcon_mamba', 'nemotron_h')
MAMBA_UNADAPTED = ('out_proj', 'conv1d')


#: peft's ``init_lora_weights`` values that rewrite the base layer's weight (a prefix for pissa's and corda's forms)
REWRITES_BASE = ('pissa', 'corda', 'olora', 'loftq', 'lora_ga')
_INSTEAD = ("use init_lora_weights=True (the default: lora_B starts at 0, the base weights unchanged) or "
            "'gaussian'")


def check_init(lora: Optional[dict], key: str, preference: bool = False) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`) a ``key`` (``model.llm_lora``, ``model.vision_lora``) whose
    ``init_lora_weights`` the checkpoints and the converter cannot rebuild (module docstring); ``preference``: the
    run's policy must start as its reference (the adapters off), so the adapters' product must start at 0."""
    if not isinstance(lora, dict) or 'init_lora_weights' not in lora:
        return
    value = lora['init_lora_weights']
    name = value.lower() if isinstance(value, str) else value
    if value is True or name == 'gaussian':   # the base kept, the adapters' product 0: the model is its previous stage
        return
    if isinstance(name, str) and name.startswith(REWRITES_BASE):
        why = ('peft rewrites the base layers\' weights at init (the adapters take their principal part), and a '
               'checkpoint holds the adapters only: the base is rebuilt unchanged from the source folders, so the '
               'converted model and the next stage are wrong, and a LoRA preference run\'s reference (the adapters '
               'off) is not the previous stage')
    elif name == 'mica':
        why = ('its lora_B is frozen at an SVD of the base weights: it is in no checkpoint (only trained parameters '
               'are saved) and is redrawn at each load')
    elif name == 'eva':
        why = ("its data-driven init needs peft's initialize_lora_eva_weights over batches, which training does not "
               'run: the adapters would start as with True')
    elif name is False or name == 'orthogonal':
        if not preference:
            return
        why = ('the adapters\' product does not start at 0, so the policy does not start as its reference (the model '
               'with its adapters off): the rewards are not 0 at the first step')
    else:
        why = "not an init peft has (True, False, 'gaussian', or the ones that need more than a config)"
    from xtuner_plugins.errors import Refused
    raise Refused(f'{key}.init_lora_weights={value!r}: {why}; {_INSTEAD}')


def apply_lora(model: nn.Module, lora: dict, task_type: Optional[str] = None, key: str = 'lora') -> nn.Module:
    """Wrap ``model`` with LoRA adapters described by ``lora`` (peft ``LoraConfig`` arguments; ``key``: where they
    are set, named in a refusal of their ``init_lora_weights``, :func:`check_init`)."""
    check_init(lora, key)
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


def _hidden_size(folder: str, inner: str) -> Optional[int]:
    """The hidden size a model folder's ``config.json`` gives (at its top, or in its ``inner`` config: a CLIP's
    ``vision_config``, a multimodal LLM's ``text_config``), or None."""
    import json
    import os
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None   # (not a folder: the model's own loading names it)
    for part in (config, config.get(inner)) if isinstance(config, dict) else ():
        size = part.get('hidden_size') if isinstance(part, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


def check_rank(lora: Optional[dict], key: str, folder: Optional[str], inner: str) -> None:
    """Warn of a ``key`` (``model.llm_lora``) whose rank ``r`` is past the hidden size of the model in ``folder`` it
    adapts (read from its ``config.json``, before any weight loads): an adapter of that rank is no low-rank update
    (more parameters than a square layer it adapts), peft builds it without a word. A warning, not a refusal: a
    stage config's rank (LLaVA's 128) on a tiny look-alike of the same family trains as it should. Other settings'
    ranges are checked with ``--cfg-options`` (``engine/option_values.py``)."""
    r = lora.get('r', 8) if isinstance(lora, dict) else None   # (peft's default)
    if not isinstance(folder, str) or not isinstance(r, int) or isinstance(r, bool):
        return
    hidden = _hidden_size(folder, inner)
    if hidden is not None and r > hidden:
        import logging

        from mmengine.logging import print_log
        print_log(f'{key}.r={r} is past the hidden size of {folder} ({hidden}): an adapter of that rank is no '
                  f'low-rank update (more parameters than the layers it adapts; r from 1 to {hidden} is one); '
                  'trained as given',
                  logger='current', level=logging.WARNING)
