"""Epochs of an iteration-based run: the data loader's restart is how the next epoch begins.

A run of ``max_iters`` iterations over a data set shorter than that (``max_epochs`` too: XTuner's ``TrainLoop``
turns it into iterations) runs in MMEngine's ``IterBasedTrainLoop``, whose ``_InfiniteDataloaderIterator`` starts
the data loader over at its end and gives the sampler the next epoch (``set_epoch``). At each restart MMEngine
warns ``Reach the end of the dataloader, it will be restarted and continue to iterate. It is recommended to use
`mmengine.dataset.InfiniteSampler` ...``. For this project's data sets that advice is wrong: their sampler is an
``EpochSampler`` (``data/epochs.py``, wrapped in by ``engine/derive.py``) whose ``set_epoch`` is what gives each
epoch its own order and video frames, and ``InfiniteSampler`` never calls it. There the restart is the design, so
that line is dropped, by its exact text, from the logger of the run that builds such a loop
(:func:`apply_epoch_patches`, applied when ``runtime`` is imported). A data loader with any other sampler keeps
MMEngine's warning.

A fractional ``max_epochs`` (1.3) is that many passes in iterations, ``max_epochs`` times the data loader's
batches: XTuner's loop handed MMEngine's the product (5.2), which it refused with an ``AssertionError`` after the
model had loaded. It is rounded to the nearest whole iteration (at least 1), said in the log
(:func:`_patch_fractional_iterations`), and the learning-rate schedule, left in fractions of the run
(``schedule_unit = 'loop'``, ``engine/length.py``), is stretched over those iterations there: MMEngine's
conversion from epochs truncated 0.1 epoch of 6 iterations to a cosine ending at iteration 0, a traceback.
"""

from __future__ import annotations

import functools
from typing import List

__all__ = ['RESTART_WARNING', 'apply_epoch_patches', 'restarts_are_epochs']

#: MMEngine's warning at each restart of an iteration-based loop's data loader (``mmengine/runner/loops.py``)
RESTART_WARNING = ('Reach the end of the dataloader, it will be restarted and continue to iterate. It is recommended '
                   'to use `mmengine.dataset.InfiniteSampler` to enable the dataloader to iterate infinitely.')
_PATCH_MARK = '_xtuner_plugins_epochs_patch'
_applied: List[str] = []


def restarts_are_epochs(dataloader) -> bool:
    """Whether the data loader's sampler takes its epoch from the restarts (an ``EpochSampler``)."""
    from xtuner_plugins.data.epochs import EpochSampler
    batch_sampler = getattr(dataloader, 'batch_sampler', None)
    return any(isinstance(s, EpochSampler) for s in (getattr(dataloader, 'sampler', None),
                                                     getattr(batch_sampler, 'sampler', None)))


def _quiet_restarts() -> None:
    """Drop :data:`RESTART_WARNING` from the current MMEngine logger (the runner's), once."""
    from mmengine.logging import MMLogger

    from xtuner_plugins.quiet import DropMessages
    logger = MMLogger.get_current_instance()
    if not any(isinstance(f, DropMessages) and f.starts == (RESTART_WARNING,) for f in logger.filters):
        logger.addFilter(DropMessages((RESTART_WARNING,)))


def _patch_infinite_iterator() -> bool:
    from mmengine.runner.loops import _InfiniteDataloaderIterator
    original = _InfiniteDataloaderIterator.__init__
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def __init__(self, dataloader, *args, **kwargs):
        original(self, dataloader, *args, **kwargs)
        if restarts_are_epochs(dataloader):
            _quiet_restarts()

    setattr(__init__, _PATCH_MARK, True)
    _InfiniteDataloaderIterator.__init__ = __init__
    return True


def whole_iterations(max_iters):
    """``max_iters`` as MMEngine's loop takes it: a fractional count (``max_epochs`` times the batches of an epoch)
    rounded to the nearest whole iteration, at least 1; anything else as it is."""
    if isinstance(max_iters, float) and max_iters > 0 and not max_iters.is_integer():
        return max(1, round(max_iters))
    return max_iters


def _patch_fractional_iterations() -> bool:
    from mmengine.logging import print_log
    from mmengine.runner.loops import IterBasedTrainLoop
    original = IterBasedTrainLoop.__init__
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def __init__(self, runner, dataloader, max_iters, *args, **kwargs):
        whole = whole_iterations(max_iters)
        if whole != max_iters:
            print_log(f'max_epochs gives {max_iters:g} iterations: {whole} run (whole iterations)', logger='current')
        original(self, runner, dataloader, whole, *args, **kwargs)
        cfg = getattr(runner, 'cfg', None)
        if cfg is not None and cfg.get('schedule_unit') == 'loop' and runner.param_schedulers is not None:
            from xtuner_plugins.engine.length import schedule_over_loop
            schedule_over_loop(runner.param_schedulers, self.max_iters)

    setattr(__init__, _PATCH_MARK, True)
    IterBasedTrainLoop.__init__ = __init__
    return True


def apply_epoch_patches() -> List[str]:
    """Apply the patches once (see the module docstring); returns the names newly applied."""
    newly = [name for name, patch in (('infinite_iterator', _patch_infinite_iterator),
                                      ('fractional_iterations', _patch_fractional_iterations)) if patch()]
    _applied.extend(newly)
    return newly
