"""Will it fit: per-device training memory of a stage config, from the model built on the meta device.

:func:`~xtuner_plugins.plan_configs.meta.build_meta_model` runs ``VisionLanguageModel``'s own constructor with
the towers built from their ``config.json`` on the ``meta`` device (no weights read, no memory), so freezing,
LoRA, the untied and resized embeddings are the config's. :func:`plan_memory` then counts per device, in bytes:

* **weights**: frozen parameters in the weights' dtype (4-bit NF4 linear weights of a QLoRA LLM at 0.5 byte plus
  their fp32 block scales, 1/64 per value... double quantisation makes it ~1/128); trained ones without DeepSpeed
  in the dtype the model keeps them in (fp32 by default, autocast casting on the fly; the dtype with
  ``trainable_fp32=False``), in the dtype with DeepSpeed (its fp32 master copy is an optimizer state); ZeRO-3
  divides every weight by the device count;
* **gradients**: trained parameters, in their own dtype without DeepSpeed; in the dtype, divided by the devices,
  under ZeRO-2/3. Without DeepSpeed and without gradient accumulation they live from the backward to the
  optimizer step only: MMEngine's loop frees them after each step (``zero_grad``, ``set_to_none``), so the
  forward runs without them and the backward makes them as it goes, the LM head's first; DeepSpeed and
  accumulation keep them through the forward (:func:`plan_memory`);
* **optimizer states**: AdamW's two moments in the trained parameters' dtype (8 bytes per fp32 parameter), the
  fp32 moments and master copy (12) under DeepSpeed; ZeRO-2/3 divide them by the devices;
* **activations** of one step (``plan_activations.activation_bytes``), from the batch shape: ``rows`` rows of ``length``
  tokens (a pack, or padded samples), ``tiles`` tiles, ``supervised`` tokens with logits;
* a fixed ``reserve`` (the CUDA context, allocator slack) that is not torch's memory.

The activations (per part, from the batch shape and the model as built, and which of them live at once) are
``plan_activations.py``'s.

Two transients that are not activations come on top, and the step's peak is the largest of the forward's
(activations + autocast copies), the backward's (activations + the copies autograd saved) and the optimizer
step's (its temporaries): without DeepSpeed, autocast keeps a bf16 copy of every trained fp32 weight it casts
until the forward ends (2 bytes per trained parameter; lookup tables, which it does not cast, excluded; in
checkpointed compiled blocks, ``compile_blocks``, only the running block's, made and dropped inside its graph:
measured on a CPU when the LM head ran, 30.1 MiB eager against 0.9 compiled, tests/test_planner.py), and into
the backward those autograd saved (the weights outside checkpointed layers); torch's AdamW on CUDA
(foreach) makes one fp32 temporary per trained parameter (4 bytes; on the CPU, single-tensor, two of the largest
parameter: 2 x 0.51 GiB for Qwen2.5-0.5B's embedding, measured by benchmarks/realsize_scaling.py), its fused kernel
(``fused=True``, our configs' default) none; DeepSpeed keeps bf16 weights and updates its fp32 partition in place
(neither counted). The gradients come on top where they live (``gradients`` above; :func:`plan_memory`):
checked against real-size CPU steps (benchmarks/realsize.sh) with MMEngine's order, the gradients freed after
each step (full fine-tuning of Qwen2.5-0.5B: the peak is the backward's end, every gradient made).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from xtuner_plugins.models.compile import is_compiled
from xtuner_plugins.plan_activations import (DTYPE_BYTES, RECOMPUTED, Batch, activation_bytes, llm_layers, phases,
                                             unchecked_layers)

GIB = 2 ** 30


def parameter_bytes(model, dtype: str = 'bf16', zero: int = 0, gpus: int = 1,
                    device: str = 'cuda', fused: bool = False) -> Dict[str, float]:
    """Per-device bytes of weights, gradients and optimizer states, autocast's copies and AdamW's temporaries
    on ``device`` (``'cuda'`` or ``'cpu'``; ``fused``: AdamW's fused kernel, no temporaries; module docstring)."""
    if zero not in (0, 2, 3):
        raise ValueError(f'zero must be 0, 2 or 3, got {zero}')
    if device not in ('cuda', 'cpu'):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    b = DTYPE_BYTES[dtype]
    frozen = trained = quant = 0.0
    lm = model.language_model
    head = lm.get_output_embeddings().weight
    # lookup tables autocast does not cast (an embedding is not a matmul); a table tied to the LM head is cast
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    cast = saved = largest = 0
    held = 0   # bytes of the trained parameters as the model keeps them (without DeepSpeed)
    checkpointed = [prefix for prefix, module in (('language_model.', lm), ('vision_model.', model.vision_model))
                    if getattr(module, 'is_gradient_checkpointing', False)]
    left_out = unchecked_layers(model)   # LLM layers past llm_grad_ckpt_layers: not recomputed
    compiled = tuple(f'{name}.' for name, m in model.named_modules() if is_compiled(m))
    in_blocks: Dict[str, int] = {}   # casts in each compiled, checkpointed block: made and dropped in its graph
    # a preference run's frozen copies keep what autocast does not cast (norms, embeddings) in the dtype the policy
    # keeps its trained parts in (preference.autocast_alike): fp32 beside bf16 matrices, without DeepSpeed
    from xtuner_plugins.models.preference import kept_as_stored   # (here: that module imports transformers)
    policy = dict(model.named_parameters()) if zero == 0 else {}
    uncast = kept_as_stored(model) if policy else set()
    kept_wider = 0.0   # bytes of those copies past b a parameter
    for name, p in model.named_parameters():
        if p.requires_grad:
            trained += p.numel()
            held += p.numel() * p.element_size()
            largest = max(largest, p.numel() * p.element_size())
            if id(p) not in lookups and p.dtype == torch.float32:   # what autocast casts to a 2-byte dtype
                recast = any(name.startswith(prefix) and '.layers.' in name for prefix in checkpointed) and not (
                    name.startswith('language_model.') and _layer_index(name) in left_out)
                block = next((prefix for prefix in compiled if name.startswith(prefix)), None) if recast else None
                if block is None:
                    cast += p.numel()
                else:
                    in_blocks[block] = in_blocks.get(block, 0) + p.numel()
                # autograd keeps the cast copy for the backward, but in a checkpointed layer (recast there)
                if not recast:
                    saved += p.numel()
        elif getattr(model, 'planned_4bit', False) and name.startswith('language_model.') and p.dim() == 2 \
                and 'lora_' not in name and 'embed' not in name and p is not head:
            quant += p.numel()
        else:
            frozen += p.numel()
            twin = policy.get(name[len('reference.'):]) if name.startswith('reference.') else None
            if twin is not None and id(p) in uncast:
                kept_wider += p.numel() * max(0, twin.element_size() - b)
    shard = gpus if zero == 3 else 1
    opt_shard = gpus if zero in (2, 3) else 1
    deepspeed = zero > 0
    weights = (frozen * b + kept_wider + quant * (0.5 + 4 / 128) + (trained * b if deepspeed else held)) / shard
    grads = trained * b / opt_shard if deepspeed else held
    optim = trained * 12 / opt_shard if deepspeed else 2 * held
    # autocast's cache keeps every cast until the forward ends; a compiled block's casts live in its graph only,
    # and its checkpointed forward saves none (without checkpointing the graph saves some or all: counted all)
    copies = 0 if deepspeed or b == 4 else (cast + max(in_blocks.values(), default=0)) * 2
    saved_copies = 0 if deepspeed or b == 4 else saved * 2
    # torch's AdamW: on CUDA the foreach path, one temporary of every trained parameter at once (its sqrt(v));
    # elsewhere the single-tensor path, two of one parameter at a time (sqrt(v), then its division); the fused
    # kernel (our configs' choice) none
    temporaries = 0 if deepspeed or fused else held if device == 'cuda' else largest * 2
    # the LM head's gradient: the first the backward makes (without DeepSpeed, where gradients come and go)
    head_grads = head.numel() * head.element_size() if head.requires_grad and not deepspeed else 0
    return dict(weights=weights, gradients=grads, optimizer=optim, trained=trained, frozen=frozen + quant,
                autocast_copies=copies, saved_copies=saved_copies, optimizer_temporaries=temporaries,
                head_gradients=head_grads)


def _layer_index(name: str) -> Optional[int]:
    """The decoder layer a parameter's name is in (``...layers.3.mlp...`` -> 3), or None."""
    found = re.search(r'\.layers\.(\d+)\.', name)
    return int(found.group(1)) if found else None


def plan_memory(model, batch: Batch, dtype: str = 'bf16', zero: int = 0, gpus: int = 1,
                reserve_gib: float = 1.0, device: str = 'cuda', fused: bool = False,
                accumulation: int = 1) -> Dict[str, float]:
    """Per-device bytes: ``weights``, ``gradients``, ``optimizer``, ``activations`` (the larger phase's; its parts
    under ``parts``), ``autocast_copies``, ``saved_copies``, ``optimizer_temporaries``, ``forward_peak`` and
    ``backward_peak`` (activations and copies, gradients apart), ``step_peak`` (over the weights and optimizer
    states; where the gradients are kept between steps, ``gradients_kept``, they and the largest of the
    forward's, the backward's and the optimizer step's; otherwise the largest of the forward's, the backward's
    with the LM head's gradient (``head_gradients``), the backward's end (every gradient, and the larger of the
    layer recomputed and the input side's activations) and the optimizer step's with the gradients),
    ``reserve`` and ``total`` (weights + optimizer + step peak + reserve).
    ``device``: ``'cuda'`` (the GPUs it plans for) or ``'cpu'`` (the benchmarks that check it on this machine);
    ``fused``: the optimizer is AdamW with ``fused=True`` (no temporaries); ``accumulation``: the config's
    ``optim_wrapper.accumulative_counts`` (above 1 the gradients are kept from one micro-step's forward to the
    next, as DeepSpeed keeps its partitions; otherwise MMEngine frees them after each step). On several ranks
    without DeepSpeed, ``ddp_buckets``: DDP's gradient buckets, a copy of every gradient held from the first
    backward on (MMEngine's DDP wrapper leaves ``gradient_as_bucket_view`` off), in the total."""
    p = parameter_bytes(model, dtype, zero, gpus, device, fused)
    parts = activation_bytes(model, batch, dtype, zero, device)
    phase = phases(model, parts)
    forward = phase['forward'] + p['autocast_copies']
    backward = phase['backward'] + p['saved_copies']
    kept = zero > 0 or accumulation > 1
    grads = p['gradients']
    if kept:
        step = grads + max(forward, backward, p['optimizer_temporaries'])
    else:   # the gradients come during the backward: at its start the LM head's beside its activations, at its
        # end all of them beside the last layer recomputed or the input side's (embeddings, projector, a trained
        # tower's) activations
        inputs = parts.get('embeddings', 0.0) + parts.get('projector', 0.0) + (
            0.0 if model.freeze_vision else parts.get('vision tower', 0.0))
        step = max(forward, backward + p['head_gradients'], grads + max(parts.get(RECOMPUTED, 0.0), inputs),
                   grads + p['optimizer_temporaries'])
    out = dict(weights=p['weights'], gradients=grads, optimizer=p['optimizer'],
               activations=max(phase.values()), autocast_copies=p['autocast_copies'],
               saved_copies=p['saved_copies'], optimizer_temporaries=p['optimizer_temporaries'],
               forward_peak=forward, backward_peak=backward, step_peak=step, gradients_kept=kept,
               head_gradients=p['head_gradients'], reserve=reserve_gib * GIB,
               ddp_buckets=grads if zero == 0 and gpus > 1 else 0.0)
    out['total'] = p['weights'] + p['optimizer'] + step + out['ddp_buckets'] + out['reserve']
    out.update(parts=parts, trained=p['trained'], frozen=p['frozen'])
    return out


def largest_fitting(fits, low: int, high: int) -> Optional[int]:
    """The largest ``x`` in ``[low, high]`` with ``fits(x)`` (monotone), or None."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def fewest_checkpointed_layers(model, fits) -> Optional[int]:
    """The fewest of the LLM's first decoder layers ``llm_grad_ckpt_layers`` can checkpoint with
    ``fits(model)`` still true (the others keep their activations: the least recomputation that fits); None when
    not even all checkpointed fits. ``model`` plans with checkpointing on; its ``llm_ckpt_layers`` is restored."""
    layers = llm_layers(model)
    before = getattr(model, 'llm_ckpt_layers', None)

    def fits_leaving_out(n: int) -> bool:
        model.llm_ckpt_layers = layers - n
        return fits(model)

    try:
        left_out = largest_fitting(fits_leaving_out, 0, layers)
    finally:
        model.llm_ckpt_layers = before
    return None if left_out is None else layers - left_out
