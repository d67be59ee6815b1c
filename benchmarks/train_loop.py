"""The timed training loop of every benchmark row (:func:`run`), and the checks that make two rows comparable: the
loss and every trained tensor's gradient norm of one step (:func:`check_step`, :func:`compare_checks`; ours
against XTuner's) and bf16 autocast against an fp32 reference (:func:`precision_check`).
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from benchmarks.flops import ModelShapes, batch_samples, train_step_flops
from xtuner_plugins.data.template import IGNORE_INDEX


def ours_loss(model, batch: dict) -> torch.Tensor:
    return model(batch, mode='loss')['loss']


def trained_parameters(module: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Trained parameters by name (``VisionLanguageModel`` and ``InternVL_V1_5.model``, the official
    ``InternVLChatModel``, share the names of ``mlp1.*`` and ``language_model.*``)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def check_step(loss_fn, params: Dict[str, torch.nn.Parameter], batch: dict, device: str,
               autocast: Optional[bool] = None) -> dict:
    """One forward and backward as in training, without an optimizer step: the loss and the gradient norm of
    every trained tensor (gradients are cleared afterwards). ``autocast``: bf16 autocast (default: on cuda)."""
    for p in params.values():
        p.grad = None
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda' if autocast is None else autocast):
        loss = loss_fn(batch)
    loss.backward()
    result = checked(loss, params)
    for p in params.values():
        p.grad = None
    return result


def checked(loss: torch.Tensor, params: Dict[str, torch.nn.Parameter]) -> dict:
    """:func:`check_step`'s record of a backward that has run: the loss and each trained tensor's gradient norm,
    in fp32 a block at a time (no fp32 copy of a whole gradient: the embedding's is 0.5 GB at 151k x 896, and
    :func:`run` takes this inside a step whose memory is measured)."""
    norms = {}
    for name, p in params.items():
        if p.grad is not None:
            blocks = p.grad.detach().reshape(-1).split(1 << 22)
            norms[name] = math.sqrt(sum(float(b.float().square().sum()) for b in blocks))
    return dict(loss=float(loss.detach()), grad_norms=norms, trained=sorted(params))


def compare_checks(ours: dict, theirs: dict, tolerance: float) -> dict:
    """Whether two :func:`check_step` results are the same computation: the same trained tensors, losses within
    ``tolerance`` relative, and every tensor's gradient norm within ``tolerance`` of the largest norm."""
    same_trained = ours['trained'] == theirs['trained'] and set(ours['grad_norms']) == set(theirs['grad_norms'])
    loss_diff = abs(ours['loss'] - theirs['loss'])
    loss_rel = loss_diff / max(abs(ours['loss']), 1e-12)
    common = set(ours['grad_norms']) & set(theirs['grad_norms'])
    scale = max([ours['grad_norms'][k] for k in common] + [1e-12])
    grad_rel = max([abs(ours['grad_norms'][k] - theirs['grad_norms'][k]) for k in common] + [0.0]) / scale
    ok = same_trained and bool(common) and loss_rel <= tolerance and grad_rel <= tolerance
    return dict(ok=ok, loss_ours=ours['loss'], loss_xtuner=theirs['loss'], loss_diff=loss_diff, loss_rel=loss_rel,
                grad_rel=grad_rel, tensors=len(common), trained_ours=len(ours['trained']),
                trained_xtuner=len(theirs['trained']), same_trained=same_trained, tolerance=tolerance)


def format_check(c: dict) -> str:
    trained = (f'the same {c["trained_ours"]} trained tensors' if c['same_trained'] else
               f'DIFFERENT trained tensors (ours {c["trained_ours"]}, xtuner {c["trained_xtuner"]})')
    return (f'loss check (first batch, before training): ours {c["loss_ours"]:.6f}, xtuner {c["loss_xtuner"]:.6f} '
            f'(|diff| {c["loss_diff"]:.2e}, rel {c["loss_rel"]:.2e}); gradient norms of {c["tensors"]} tensors: '
            f'max diff {c["grad_rel"]:.2e} of the largest; {trained} -> {"OK" if c["ok"] else "FAILED"} '
            f'(tolerance {c["tolerance"]:g})')


# Relative tolerances of bf16 autocast against fp32: each step's loss; the first step's gradient norms (of the
# largest norm).


PRECISION_TOLERANCE = dict(loss=5e-3, grad=5e-2)


def precision_check(model, batches: Sequence[dict], device: str, tolerance: Optional[dict] = None) -> dict:
    """Trains ``model`` (built in fp32) one step per batch twice from its current weights: the fp32 reference
    (every weight fp32, no autocast, no TF32) and then as the timed rows train (frozen parts cast to bf16,
    trained parts fp32, bf16 autocast; on a CPU too). Before the first step each run's loss and gradient norms
    on the first batch are taken (:func:`check_step`) and compared (:func:`compare_checks`). ``ok``: those
    agree, and every step's loss is finite and within ``tolerance`` relative of the reference's."""
    tolerance = dict(PRECISION_TOLERANCE, **(tolerance or {}))
    params = trained_parameters(model)  # the frozen ones do not change (the fp32 run goes first)
    initial = {k: v.detach().to('cpu', copy=True) for k, v in params.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    runs = {}
    for name, bf16 in (('fp32', False), ('bf16', True)):
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(initial[k])
        if bf16:
            for module, frozen in ((model.vision_model, model.freeze_vision), (model.mlp1, model.freeze_projector),
                                   (model.language_model, model.freeze_llm)):
                if frozen:
                    module.to(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16 and tf32[0]
        try:
            check = check_step(lambda b: ours_loss(model, b), params, batches[0], device, autocast=bf16)
            opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
            losses = []
            for batch in batches:
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = ours_loss(model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        runs[name] = dict(check=check, losses=losses)
        del opt
    ref, low = runs['fp32']['losses'], runs['bf16']['losses']
    loss_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, low))
    first = compare_checks(runs['fp32']['check'], runs['bf16']['check'], tolerance['grad'])
    finite = bool(np.all(np.isfinite(ref + low)))
    ok = first['same_trained'] and first['grad_rel'] <= tolerance['grad'] and finite and loss_rel <= tolerance['loss']
    return dict(ok=bool(ok), steps=len(batches), losses_fp32=ref, losses_bf16=low,
                loss_rel=loss_rel if finite else float('nan'), grad_rel=first['grad_rel'], tensors=first['tensors'],
                same_trained=first['same_trained'], tolerance=tolerance)


def format_precision(c: dict) -> str:
    def losses(key):
        return ', '.join(f'{x:.5f}' for x in c[key])
    return (f'bf16 against fp32 ({c["steps"]} steps from the same weights on the same batches): losses fp32 '
            f'{losses("losses_fp32")}; bf16 {losses("losses_bf16")}; '
            f'max rel diff {c["loss_rel"]:.2e} (tolerance {c["tolerance"]["loss"]:g}); first step gradient norms of '
            f'{c["tensors"]} tensors: max diff {c["grad_rel"]:.2e} of the largest (tolerance '
            f'{c["tolerance"]["grad"]:g}) -> {"OK" if c["ok"] else "FAILED"}')


def peak_memory_mib(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ours_adamw() -> dict:
    """The AdamW options our configs set beyond the rates (``configs/_base_/schedules/cosine.py``: ``fused``), for
    the rows that stand for our training; XTuner's rows keep torch's defaults, as its configs do."""
    from mmengine.config import Config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    opt = Config.fromfile(os.path.join(root, 'configs', '_base_', 'schedules', 'cosine.py')).optim_wrapper.optimizer
    return {k: opt[k] for k in ('fused',) if k in opt}


def run(model, loader, steps, device, shapes: ModelShapes, step_loss=None, freeze: Optional[dict] = None,
        img_context_token_id: Optional[int] = None, autocast: Optional[bool] = None,
        warmup_batch: Optional[dict] = None, adamw: Optional[dict] = None, profile: Optional[str] = None,
        warmup: int = 1, check: Optional[Dict[str, torch.nn.Parameter]] = None,
        after_step: Optional[Callable[[], None]] = None, graphs: Optional[Callable[[], int]] = None) -> dict:
    """``steps`` timed training steps (after ``warmup`` untimed ones) of ``model`` on ``loader``'s batches.
    ``step_loss(batch on the device) -> loss`` defaults to our model's; ``freeze`` (what is frozen, for the
    FLOPs) and ``img_context_token_id`` default to the model's attributes; ``autocast``: bf16 autocast (default:
    on cuda only); ``warmup_batch`` (a collated batch): the warm-up step's, in place of the loader's first;
    ``adamw``: options of torch's AdamW beyond the rate (``ours_adamw()`` for our rows; default torch's own);
    ``profile``: a path to write torch.profiler's table of the timed steps' operators by device time to (a
    diagnosis: the profiled row's timings are not figures); ``warmup``: 2 for compiled attention, which
    ``torch.compile`` builds for the first shape and again, with dynamic shapes, at the second; ``check`` (the
    trained parameters by name): the warm-up steps run at rate 0 (AdamW's states are made, no weight moves) and
    the first timed step's loss and gradient norms, taken before its optimizer step and outside its time, are
    returned as ``check`` (:func:`check_step`'s record, of the weights the run started from) - the check costs
    no step of its own; ``after_step()``: called at the end of every step, its gradients freed (as MMEngine's
    ``OptimWrapper.update_params`` frees them after the optimizer step), outside the step's time. ``warmup_batch``
    may be a list, one batch per warm-up step; ``graphs()`` (compiled rows: the graphs compiled so far): the
    graphs compiled during the timed steps are returned as ``graphs_in_timed``, which must be 0 for the time to
    hold no compilation."""
    step_loss = step_loss or (lambda batch: ours_loss(model, batch))
    if freeze is None:
        freeze = dict(freeze_vision=model.freeze_vision, freeze_projector=model.freeze_projector,
                      freeze_llm=model.freeze_llm)
    if img_context_token_id is None:
        img_context_token_id = model.img_context_token_id
    rate = 1e-5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate, **(adamw or {}))
    tokens = samples = flops = padded = 0
    data_time, step_s, untimed, record = 0.0, [], 0.0, None   # untimed: the check's and after_step's seconds
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == 'cuda' else [])) if profile else None
    it = iter(loader)
    warmups = list(warmup_batch) if isinstance(warmup_batch, (list, tuple)) else (
        [] if warmup_batch is None else [warmup_batch])
    graphs_at = None
    for step in range(steps + warmup):  # the warm-up steps are not counted
        t0 = time.perf_counter()
        with torch.profiler.record_function('data'):
            batch = (warmups[step] if step < len(warmups) else next(it))['data']
        t1 = time.perf_counter()
        seq_lens, tiles = batch_samples(batch, img_context_token_id, shapes.image_tokens_per_tile)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda' if autocast is None else autocast):
            loss = step_loss(batch)
        loss.backward()
        skip = 0.0
        if check is not None and step == warmup:   # the first timed step: its batch, the run's first weights
            c0 = time.perf_counter()
            with torch.profiler.record_function('untimed'):
                record = checked(loss, check)
            skip = time.perf_counter() - c0
        for group in opt.param_groups:   # with a check: no weight moves before it
            group['lr'] = 0.0 if check is not None and step < warmup else rate
        with torch.profiler.record_function('optimizer'):
            opt.step()
            opt.zero_grad()   # as MMEngine's OptimWrapper.update_params: no gradients held through the next forward
        if device == 'cuda':
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0 - skip)
        if after_step is not None:
            c0 = time.perf_counter()
            with torch.profiler.record_function('untimed'):
                after_step()
            skip += time.perf_counter() - c0
        if step < warmup:
            graphs_at = graphs() if graphs is not None else None
            start = time.perf_counter()
            warmup_s = sum(step_s)
            if prof is not None and step == warmup - 1:
                prof.start()
            continue
        untimed += skip
        data_time += t1 - t0
        tokens += sum(seq_lens)
        samples += len(seq_lens)
        padded += batch['input_ids'].numel() - sum(seq_lens)
        supervised = int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())
        flops += train_step_flops(shapes, seq_lens, tiles, **freeze, supervised=supervised)['total']
    total = time.perf_counter() - start - untimed
    kinds = None
    if prof is not None:
        prof.stop()
        averages = prof.key_averages()
        with open(profile, 'w') as f:   # on a GPU, by device time and then by host time (what keeps it waiting)
            f.write(f'{steps} profiled steps, {total:.3f} s\n')
            for key in (['self_cuda_time_total'] if device == 'cuda' else []) + ['self_cpu_time_total']:
                f.write(f'\nby {key}:\n' + averages.table(sort_by=key, row_limit=40, max_name_column_width=70))
        from benchmarks.profile_kinds import split   # on a GPU by the kernels' time, else the operators' CPU time
        kinds = split(prof.events(), total * 1e6, device=device == 'cuda')
    return dict(tokens=tokens, samples=samples, tokens_per_s=tokens / total, samples_per_s=samples / total,
                data_share=data_time / total,
                flops_per_step=flops / steps, tflops=flops / total / 1e12, pad_share=padded / (tokens + padded),
                peak_mib=peak_memory_mib(device), warmup_s=warmup_s, s_per_step=total / steps,
                step_s=[round(x, 3) for x in step_s], **({'check': record} if check is not None else {}),
                **({'kinds': kinds} if kinds is not None else {}),
                **({'graphs_in_timed': graphs() - graphs_at} if graphs is not None else {}))
