"""``llm_grad_ckpt_layers='auto'`` (the stage configs'): on a CUDA GPU, only as many of the LLM's decoder layers
checkpointed as its memory needs, chosen at start-up from the planner (``xtuner_plugins/planner.py``).

Why: a layer left out of checkpointing keeps its activations instead of running again in the backward. On an H100
(``benchmarks/RESULTS.md``, 2026-11-27) InternViT-300M + Qwen2.5-1.5B on packs of 16,384 tokens, blocks compiled,
trained 24.7k tokens/s with all 28 layers checkpointed (28.8 GiB), 27.0k with 14 (43.2 GiB) and 31.8k with none
(58.6 GiB); the planner is 2.8%, 2.0% and 0.1% over those peaks (replanned with the fp32 residual stream's
count measured for compiled layers; 2.6%, 4.1% and 5.3% before).

How (:class:`CheckpointFitHook`, before the first step): the model as the config builds it, on the meta device
(``plan_configs/meta.py``: no weight read), and the config's largest batch (``plan_configs/batch.py``: every pack
full, every text token supervised; unpacked rows also with as many tiles as ``max_length`` holds, as videos and
many images can pass ``max_dynamic_patch``) are planned with the run's DeepSpeed stage and number of ranks (DDP's
gradient buckets, a copy of every gradient, on several ranks without DeepSpeed), against :data:`FRACTION` of the
GPU's memory (of what torch holds plus what is free now, where another process uses the GPU too). The fewest first
layers that keep the plan within it stay checkpointed. Every rank takes the largest count any rank chose: ranks
recompute the same layers (under ZeRO-3 a recomputed layer gathers its weights again, a collective). All layers
stay checkpointed, and the log says why:

* on a CPU (the memory is the machine's, shared with the data loader's workers);
* with LoRA or QLoRA on the LLM (a LoRA step's peak measured 1.58x the plan on an H100);
* under DeepSpeed ZeRO-1 and from an ``official_checkpoint`` (neither is planned);
* when the plan cannot be made (a config the planner cannot read; the reason is logged, as a warning).

``--cfg-options model.llm_grad_ckpt_layers=None`` checkpoints every layer without asking; a number sets it;
``tools/plan.py`` prints the fewest that fit 85% of its ``--gpu-mem``, as ``'auto'`` plans.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.quiet import quiet_mmengine_info

__all__ = ['CheckpointFitHook', 'FRACTION', 'choose_layers']

#: the share of the GPU's memory the plan may fill (the planner is 0.1-2.8% over the H100's measured peaks; the
#: rest is for what it does not count: NCCL's and DeepSpeed's buffers, fragmentation, its error elsewhere)
FRACTION = 0.85
GIB = 2 ** 30


def choose_layers(cfg, model, budget: float, zero: int = 0, gpus: int = 1) -> Tuple[Optional[int], str]:
    """``(layers, why)``: how many first LLM layers to checkpoint for the config ``cfg`` within ``budget`` bytes
    per device (None: all, ``why`` says why), with DeepSpeed ZeRO stage ``zero`` (0: none) over ``gpus``."""
    from xtuner_plugins.plan_configs.batch import model_batch, optimizer_settings, planned_batches
    from xtuner_plugins.plan_configs.meta import build_meta_model
    from xtuner_plugins.plan_activations import llm_layers
    from xtuner_plugins.planner import fewest_checkpointed_layers, plan_memory
    if hasattr(model.language_model, 'peft_config'):
        return None, ('LoRA on the LLM: the planner was under a LoRA step\'s measured peak (1.58x on an H100, '
                      'benchmarks/RESULTS.md)')
    if zero not in (0, 2, 3):
        return None, f'DeepSpeed ZeRO-{zero}: the planner counts no DeepSpeed, ZeRO-2 and ZeRO-3'
    if cfg.model.get('official_checkpoint') is not None:
        return None, 'an official_checkpoint: the planner builds models from vision_encoder and llm folders'
    bf16 = model.autocast_dtype is not None or model.language_model.dtype == torch.bfloat16
    try:
        with quiet_mmengine_info():   # its start-up lines (compile_blocks) are the real model's, said once
            meta = build_meta_model(cfg.model, 'bfloat16' if bf16 else 'float32')
        batch, per_tile = model_batch(cfg, meta)
        batches = planned_batches(batch, per_tile)   # unpacked rows: with the most tiles max_length holds too
        fused, accumulation = optimizer_settings(cfg)
        plans = {}

        def fits(m) -> bool:
            plans[m.llm_ckpt_layers] = max(plan_memory(m, b, 'bf16' if bf16 else 'fp32', zero, gpus, fused=fused,
                                                       accumulation=accumulation)['total'] for b in batches)
            return plans[m.llm_ckpt_layers] <= budget

        layers = fewest_checkpointed_layers(meta, fits)
    except Exception as exc:   # any config the planner cannot read: the run goes on as configured
        return None, f'the plan could not be made ({type(exc).__name__}: {exc})'
    total = llm_layers(meta)
    what = (f'{batch.rows} {"pack" if batch.packed else "row"}{"s" if batch.rows > 1 else ""} of {batch.length} '
            f'tokens and up to {batches[-1].tiles} tiles')
    if layers is None:
        return None, (f'even all checkpointed, the plan ({plans.get(total, 0) / GIB:.1f} GiB for {what}) is over '
                      f'the {budget / GIB:.1f} GiB allowed')
    return layers, f'planned {plans[layers] / GIB:.1f} GiB of the {budget / GIB:.1f} GiB allowed for {what}'


def device_budget() -> float:
    """Bytes the plan may fill on this rank's GPU (module docstring)."""
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    return FRACTION * min(total, free + torch.cuda.memory_reserved(device))


def _wrapped(model):
    """The runner's model and what it wraps, outside in (MMEngine's DeepSpeed wrapper's ``model``, DDP's and
    DeepSpeed's ``module``), followed through each one's own attributes: those wrappers pass unknown attribute
    reads on to the model, so an attribute set through them would land on the wrapper."""
    for _ in range(5):
        if model is None:
            return
        yield model
        own = dict(getattr(model, '_modules', None) or {}, **vars(model))
        model = own.get('module', own.get('model'))


def inner_model(wrapped):
    """Our model inside the runner's wrappers, or None."""
    return next((m for m in _wrapped(wrapped) if 'llm_ckpt_auto' in vars(m)), None)


def zero_stage(wrapped) -> int:
    """DeepSpeed's ZeRO stage of the runner's model (0 without DeepSpeed)."""
    return next((int(m.zero_optimization_stage()) for m in _wrapped(wrapped)
                 if callable(getattr(m, 'zero_optimization_stage', None))), 0)


def agree(layers: int, why: str) -> Tuple[int, str, Optional[int]]:
    """``(layers, why, rank)``: the largest of the ranks' ``layers`` (every rank recomputes the same layers), the
    reason of the first rank that chose it and that rank (None: this one's own), so rank 0's log says why another
    rank needs more (MMEngine's ``all_gather_object``: ``[(layers, why)]`` on one rank)."""
    from mmengine.dist import all_gather_object
    wants = all_gather_object((layers, why))
    rank = max(range(len(wants)), key=lambda r: wants[r][0])   # the first of those that need the most
    if wants[rank][0] == layers:
        return layers, why, None
    return wants[rank][0], wants[rank][1], rank


class CheckpointFitHook(Hook):
    """Resolves ``llm_grad_ckpt_layers='auto'`` before the first step (module docstring)."""

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        model = inner_model(runner.model)
        if model is None or not model.llm_ckpt_auto:
            return
        from xtuner_plugins.models.recompute import checkpoint_first_layers
        from xtuner_plugins.plan_activations import llm_layers
        total = llm_layers(model)
        layers, why = None, 'on a CPU'
        if torch.cuda.is_available():
            try:   # every rank reaches agree() below, whatever its plan met
                from mmengine.dist import get_world_size
                layers, why = choose_layers(runner.cfg, model, device_budget(), zero_stage(runner.model),
                                            get_world_size())
            except Exception as exc:
                layers, why = None, f'the plan could not be made ({type(exc).__name__}: {exc})'
        chosen, why, rank = agree(total if layers is None else layers, why)
        warn = why.startswith(('even', 'the plan'))
        why = why if rank is None else f'rank {rank} needs {chosen}: {why}'
        model.llm_ckpt_layers = chosen
        model.llm_ckpt_auto = False
        checkpoint_first_layers(model.language_model, chosen)
        rest = '; the others keep their activations instead of running again in the backward' if chosen < total \
            else ''
        print_log(f"llm_grad_ckpt_layers='auto': {chosen} of the LLM's {total} decoder layers checkpointed ({why})"
                  f'{rest}', logger='current', level=logging.WARNING if warn else
                  logging.INFO)
