"""The training console: a start line, one short progress line per logging interval, and an end line.

MMEngine's own iteration line (``Iter(train) [10/40]  lr: ...  eta: ...  time: ...  data_time: ...  loss: ...
tokens_per_sec: ...`` with every scalar at four decimals) goes to the run's log file only, once this hook runs
(``engine/console.py``'s ``keep_off_console``; a config without the hook keeps MMEngine's lines); the console gets, from the same message-hub scalars, at the same interval
(``default_hooks.logger.interval``) and at the last iteration::

    training pretrain_mlp: 40 iterations (1 epoch of 40); 4 samples per iteration (batch 4 x 1 process); ...
    iter 10/40  loss 6.267  lr 1.80e-04  18.4k tokens/s  eta 0:00:01  mem 1.04 GiB
    ...
    done: 40 iterations in 0:00:02, loss 6.264 (first logged 6.267); last checkpoint work_dirs/.../iter_40.pth

``xtuner_plugins.outcome.parse_log`` reads both line forms. The numbers are the ones MMEngine logs: the loss is
the mean over the log processor's window (``log_processor.window_size``, 10), the learning rate the current one,
tokens/s and memory ``ThroughputHook``'s (all ranks), the ETA the window's mean iteration time times the
iterations left.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Optional, Sequence

from mmengine.hooks import Hook, LoggerHook
from mmengine.registry import HOOKS

PROGRESS_START = 'iter '
#: preference training's scalars shown after the throughput (DPO/MPO: ``models/preference.py``)
PREFERENCE_SCALARS = ('rewards_accuracy', 'rewards_margin')
#: MMEngine's lines this hook stands in for on the console (the run's log file keeps them)
REPLACED = ('Iter(train) [', 'Exp name: ')


def _scalar(runner, name: str, window: Optional[int] = None) -> Optional[float]:
    hub = runner.message_hub
    if f'train/{name}' not in hub.log_scalars:
        return None
    history = hub.get_scalar(f'train/{name}')
    return float(history.current() if window is None else history.mean(window))


def _duration(seconds: float) -> str:
    if not seconds < 1e9:   # past timedelta's range (max_iters=10**14 ended the run in an OverflowError), or NaN
        return 'over 30 years' if seconds >= 1e9 else '?'
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _iterations(n: int) -> str:
    return f'{n} iteration{"" if n == 1 else "s"}'


def _rate(value: float) -> str:
    return f'{value / 1000:.1f}k' if value >= 1000 else f'{value:.0f}'


def _learning_rates(runner) -> str:
    """``lr R``: the rate most of the optimizer's parameter groups train at, then the others' (``lr 2.00e-04 (1.00e-03
    for 2 groups)``: a LoRA stage's projector at its own ``lr_mult``); MMEngine's scalar (the first group's: the
    projector's rate was shown for a LoRA run) where the optimizer says none."""
    from collections import Counter
    try:
        rates = Counter(float(r) for r in runner.optim_wrapper.get_lr()['lr'])
    except (AttributeError, KeyError, TypeError, ValueError):
        rates = Counter()
    if not rates:
        lr = _scalar(runner, 'lr')
        return '' if lr is None else f'lr {lr:.2e}'
    (most, _), *others = rates.most_common()
    rest = ', '.join(f'{rate:.2e} for {n} group{"s" * (n > 1)}' for rate, n in others)
    return f'lr {most:.2e}' + (f' ({rest})' if rest else '')


def progress_line(runner, window: int = 10) -> str:
    """``iter k/N  loss L  [router_aux_loss X]  lr R  T tokens/s  eta H:MM:SS  [rewards_accuracy A  rewards_margin M]
    mem M GiB`` from the message hub (absent parts left out)."""
    done, total = runner.iter + 1, runner.max_iters
    parts = [f'{PROGRESS_START}{done}/{total}']
    loss = _scalar(runner, 'loss', window)
    if loss is not None:
        parts.append(f'loss {loss:.4g}')
    aux = _scalar(runner, 'router_aux_loss', window)   # a mixture-of-experts LLM's routing balance (models/moe.py)
    if aux is not None:
        parts.append(f'router_aux_loss {aux:.3g}')
    lr = _learning_rates(runner)
    if lr:
        parts.append(lr)
    tokens = _scalar(runner, 'tokens_per_sec', window)
    if tokens is not None:
        parts.append(f'{_rate(tokens)} tokens/s')
    step = _scalar(runner, 'time', window)
    if step is not None:
        parts.append(f'eta {_duration(step * (total - done))}')
    for name in PREFERENCE_SCALARS:  # preference training: how the pairs are told apart
        value = _scalar(runner, name, window)
        if value is not None:
            parts.append(f'{name} {value:.3g}')
    mem = _scalar(runner, 'peak_mem_mb')
    if mem is not None:
        parts.append(f'mem {mem / 1024:.2f} GiB')
    return '  '.join(parts)


@HOOKS.register_module()
class ProgressHook(Hook):
    """The console's start, progress and end lines (see the module's docstring). Runs after every other hook of
    an iteration (``LOWEST``), so the scalars of ``ThroughputHook`` and the checkpoint of ``CheckpointHook`` are
    there when it writes."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        self._started = None
        self._first_loss: Optional[float] = None

    def _interval(self, runner) -> int:
        loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
        return loggers[0].interval if loggers else 10

    def _window(self, runner) -> int:
        return int(getattr(runner.log_processor, 'window_size', 10) or 10)

    def before_train(self, runner) -> None:
        from xtuner_plugins.engine.console import keep_off_console
        self._started, self._first_loss = time.time(), None
        keep_off_console(runner.logger, REPLACED)
        runner.logger.info(start_line(runner))
        note = repeats_note(runner)
        if note:
            runner.logger.warning(note)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        done = runner.iter + 1
        if done % self._interval(runner) and done != runner.max_iters:
            return
        if self._first_loss is None:
            self._first_loss = _scalar(runner, 'loss', self._window(runner))
        runner.logger.info(progress_line(runner, self._window(runner)))

    def after_train(self, runner) -> None:
        elapsed = time.time() - (self._started or time.time())
        line = f'done: {_iterations(runner.iter)} in {_duration(elapsed)}'
        loss = _scalar(runner, 'loss', self._window(runner))
        if loss is not None:
            first = f' (first logged {self._first_loss:.4g})' if self._first_loss is not None else ''
            line += f', loss {loss:.4g}{first}'
        from xtuner_plugins.engine.resume import checkpoint_dirs
        checkpoint = last_checkpoint(runner.work_dir, checkpoint_dirs(runner))
        runner.logger.info(line + (f'; last checkpoint {checkpoint}' if checkpoint else '; no checkpoint saved'))


def last_checkpoint(work_dir: str, out_dirs: Sequence[str] = ()) -> Optional[str]:
    """The checkpoint MMEngine's ``WORK_DIR/last_checkpoint`` names, read as ``resume=True`` reads it
    (``resume.resume_target``; ``out_dirs``: the checkpoint hook's), relative to the current folder when it
    is below it; None when there is none."""
    from xtuner_plugins.engine.resume import ResumeError, resume_target
    try:
        path = resume_target(work_dir, out_dirs)[0]
    except ResumeError:
        return None
    if path is None:
        return None
    relative = os.path.relpath(path)
    return path if relative.startswith('..') else relative


def repeats_note(runner) -> Optional[str]:
    """A warning when the sampler repeats a tenth of the data set or more in each epoch to fill whole iterations
    (a batch larger than the data, or one that divides it badly: 17 samples at 16 an iteration train 32), which it
    did without a word; None otherwise."""
    loader = runner.train_dataloader
    sampler = getattr(loader, 'sampler', None)
    while getattr(sampler, 'total_size', None) is None and getattr(sampler, 'sampler', None) is not None:
        sampler = sampler.sampler   # a wrapper (data/epochs.py's EpochSampler): the sampler it wraps
    total, batch = getattr(sampler, 'total_size', None), getattr(loader, 'batch_size', None)
    try:
        samples = len(loader.dataset)
    except TypeError:   # a stream: no length, no padding
        return None
    if not (isinstance(total, int) and isinstance(batch, int) and samples > 0 and total - samples >= 0.1 * samples):
        return None
    from mmengine.dist import get_world_size
    world = get_world_size()
    per_iteration, iterations = batch * world, -(-total // (batch * world))
    return (f'the data set has {samples} samples and an iteration takes {per_iteration} (batch {batch} x {world} '
            f'process{"" if world == 1 else "es"}): each epoch repeats {total - samples} of them to fill whole '
            f'iterations ({total} samples in {iterations} iteration{"" if iterations == 1 else "s"}, '
            f'{total / samples:.3g}x the data); choose a batch size that fits the data (train_dataloader.batch_size '
            f'and train_dataloader.sampler.per_device_batch_size), or add data')


def start_line(runner) -> str:
    """``training NAME: N iterations (E epochs of I), S samples per iteration (batch B x W processes), an
    optimizer step every A; checkpoint every C -> WORK_DIR; full log FILE``."""
    from mmengine.dist import get_world_size

    from xtuner_plugins.engine.console import log_files
    name = os.path.splitext(os.path.basename(runner.cfg.filename or 'config'))[0] if runner.cfg else 'model'
    total = runner.max_iters
    parts = [f'training {name}: {_iterations(total)}']
    try:
        per_epoch = len(runner.train_dataloader)
    except TypeError:
        per_epoch = None
    if per_epoch:
        epochs = total / per_epoch
        parts[0] += f' ({epochs:g} epoch{"" if epochs == 1 else "s"} of {per_epoch})'
    batch = getattr(runner.train_dataloader, 'batch_size', None)
    world = get_world_size()
    if batch:
        parts.append(f'{batch * world} samples per iteration (batch {batch} x {world} '
                     f'process{"" if world == 1 else "es"})')
    accumulate = getattr(runner.optim_wrapper, '_accumulative_counts', 1) or 1
    if accumulate > 1:
        parts.append(f'an optimizer step every {accumulate} iterations')
    from mmengine.hooks import CheckpointHook
    saves = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
    if saves:
        parts.append(f'checkpoint every {saves[0].interval} and at the end -> {runner.work_dir}')
    files = log_files(runner.logger)
    if files:
        parts.append(f'full log (config, environment, every iteration) {files[0]}')
    return '; '.join(parts)
