"""Where a training step's time goes, by kind: matmul, attention, elementwise, norm, cast/copy, loss, optimizer,
vision forward, data, Python dispatch modes (selective checkpointing's policy, a benchmark's memory reads), and what
no operator accounts for (Python, hooks).

Used by ``benchmarks/realsize.py --profile DIR`` (each row's timed step under ``torch.profiler``)::

    bash benchmarks/realsize.sh --settings a c --rows unpacked packed_segments --profile work_dirs/realsize/profile

Regions come from ``torch.profiler.record_function`` ranges: ``data`` and ``optimizer`` (``train_loop.run``) and,
through :func:`mark_modules`, ``vision`` (the vision tower's forward) and ``norm`` (every RMSNorm / LayerNorm
module: transformers' Qwen2 RMSNorm is a chain of elementwise operators). Each operator's *self* time goes to the
innermost region it runs in (``vision``, ``optimizer``, ``data``, ``norm``); outside those, to the kind its name
says (:func:`kind_of`). Operators under the backward pass run on autograd's engine, outside the forward's regions:
a frozen tower has no backward, a norm's backward counts as elementwise. The profiler's own cost per operator is
in the step: the split is a diagnosis, not a timing (the row's ``s/step`` is taken without it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Optional

import torch

KINDS = ('matmul', 'attention', 'elementwise', 'norm', 'cast/copy', 'loss', 'optimizer', 'vision forward', 'data',
         'Python dispatch modes', 'not in an operator')
REGIONS = {'vision': 'vision forward', 'optimizer': 'optimizer', 'data': 'data', 'norm': 'norm'}
_MATMUL = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::_addmm_activation', 'aten::linear',
           'aten::matmul', 'aten::addbmm', 'onednn', 'mkldnn')
# (``xtuner_plugins::cpu_bf16_attention*``: this project's AVX-512 BF16 kernel, models/cpu_attention.py)
_ATTENTION = ('scaled_dot_product', 'flash_attention', 'efficient_attention', 'flex_attention', 'sdpa',
              'cpu_bf16_attention')
_LOSS = ('cross_entropy', 'log_softmax', 'nll_loss', 'logsumexp')
_NORM = ('rms_norm', 'layer_norm', 'group_norm')
_COPY = ('aten::copy_', 'aten::_to_copy', 'aten::to', 'aten::clone', 'aten::contiguous', 'aten::cat',
         'aten::index', 'aten::index_put', 'aten::index_select', 'aten::gather', 'aten::scatter', 'aten::fill_',
         'aten::zero_', 'aten::zeros', 'aten::empty', 'aten::empty_strided', 'aten::masked_scatter',
         'aten::masked_fill', 'aten::stack', 'aten::pad', 'aten::constant_pad_nd', 'aten::slice', 'aten::select',
         'aten::view', 'aten::reshape', 'aten::transpose', 'aten::permute', 'aten::expand', 'aten::as_strided',
         'aten::t', 'aten::unsqueeze', 'aten::squeeze', 'aten::split', 'aten::chunk', 'aten::narrow',
         'aten::_unsafe_view', 'aten::detach', 'aten::resize_', 'aten::new_zeros', 'aten::new_empty',
         'aten::embedding')


def kind_of(name: str) -> str:
    """The kind of an operator outside the regions, by its name."""
    low = name.lower()
    if 'dispatchmode' in low:   # TorchDispatchMode's Python: selective checkpointing's policy, the rows' memory reads
        return 'Python dispatch modes'
    if any(k in low for k in _ATTENTION):
        return 'attention'
    if any(k in low for k in _LOSS):
        return 'loss'
    if any(k in low for k in _NORM):
        return 'norm'
    if 'adam' in low:
        return 'optimizer'
    if low.startswith(_MATMUL) or 'mmbackward' in low:
        return 'matmul'
    if low.split('(')[0] in _COPY or low.startswith(('aten::_to', 'aten::copy', 'aten::index', 'aten::slice')):
        return 'cast/copy'
    return 'elementwise'


def mark_modules(model: torch.nn.Module, vision: Optional[torch.nn.Module] = None) -> None:
    """Profiler ranges around ``vision``'s forward (``vision``) and every norm module's (``norm``)."""
    def mark(module, name):
        ranges = []

        def enter(*_):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            ranges.append(rf)

        def leave(*_):
            if ranges:
                ranges.pop().__exit__(None, None, None)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    if vision is not None:
        mark(vision, 'vision')
    for module in model.modules():
        if type(module).__name__.endswith(('RMSNorm', 'LayerNorm')) and module is not vision:
            mark(module, 'norm')


def _region(event) -> Optional[str]:
    """The region an event runs in (itself or an ancestor), by priority: the vision tower's forward holds its own
    norms; ``untimed`` (the check, ``after_step``) is left out."""
    names = set()
    while event is not None:
        names.add('optimizer' if event.name.startswith('Optimizer.') else event.name)
        event = event.cpu_parent
    return next((r for r in ('untimed', 'vision', 'optimizer', 'data', 'norm') if r in names), None)


def split(events: Iterable, wall_us: float, device: bool = False) -> Dict[str, float]:
    """Seconds per kind (:data:`KINDS`) of a profile's events (``prof.events()``) over ``wall_us``, the timed
    steps' wall time (microseconds). ``device``: a GPU's time instead of the host's, each operator's own kernels
    (its self device time; the kernels' own events are not counted again), and ``'not in an operator'`` is then
    the time the GPU ran no kernel of the step (waiting for the host)."""
    out: Dict[str, float] = defaultdict(float)
    counted = 0.0
    for event in events:
        if device and event.device_type != torch.autograd.DeviceType.CPU:
            continue   # a kernel's or a GPU annotation's event: its time is its launching operator's
        region = _region(event)
        if region == 'untimed':
            continue
        kind = REGIONS[region] if region else kind_of(event.name)
        spent = event.self_device_time_total if device else event.self_cpu_time_total
        out[kind] += spent
        counted += spent
    out['not in an operator'] = max(0.0, wall_us - counted)
    return {k: out.get(k, 0.0) / 1e6 for k in KINDS}


def table(shares: Dict[str, Dict[str, float]]) -> str:
    """A Markdown table: one column per row name of ``shares`` (seconds per kind), seconds and percent."""
    names = list(shares)
    lines = ['| kind | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for kind in KINDS:
        cells = []
        for name in names:
            total = sum(shares[name].values()) or 1.0
            cells.append(f'{shares[name][kind]:.2f} s ({100 * shares[name][kind] / total:.0f}%)')
        lines.append(f'| {kind} | ' + ' | '.join(cells) + ' |')
    lines.append('| step | ' + ' | '.join(f'{sum(shares[n].values()):.2f} s' for n in names) + ' |')
    return '\n'.join(lines)
