"""Exact mid-epoch resume of a streaming training data set (``data/streaming.py``: online packing, tar shards).

MMEngine resumes an iteration-based run by drawing, and throwing away, every batch the run had trained on. For a
stream that is exact but as slow as the training's data loading. :class:`StreamStateHook` instead:

* keeps, from each batch trained on (``data['stream_state']``, put there by ``stream_collate_fn``), the last state
  of each reading unit of this rank;
* saves them with each checkpoint (``checkpoint['stream_state']``: every rank's, gathered after each iteration,
  with the number of ranks and of DataLoader workers);
* refuses a run of ``max_epochs`` over a stream that cannot count its epoch's batches (online packing);
* on a resume, gives this rank's states back to the data set (``StreamingDataset.resume_from``), starts its
  DataLoader workers over with them, and answers MMEngine's replay of the trained batches without drawing them.

A checkpoint of a run with another number of ranks or workers cannot be continued exactly: start-up stops with one
line naming both. Nor can one whose data changed since (an annotation file of another size or other samples kept, a
shard set of other shards: ``dataagree.data_fingerprint``, saved with the states): its positions would name other
samples, so start-up stops saying what changed. With ``on_data_change='restart'`` such a resume goes on instead:
the weights, optimizer, schedule and iteration count come from the checkpoint, and the stream starts again from its
beginning over the data as it is now (a warning says so; the epoch's position is lost). A checkpoint without stream
states (a run without this hook) is replayed as MMEngine does.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from .signatures import hook_option

__all__ = ['StreamStateHook']

KEY = 'stream_state'


class _Replayed:
    """MMEngine's replay of ``n`` trained batches answered with None, then the data loader's own batches."""

    def __init__(self, iterator, n: int):
        self.iterator, self.n = iterator, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n > 0:
            self.n -= 1
            return None
        return next(self.iterator)


def _order(dataset) -> dict:
    """What draws a stream's epochs (``streaming.epoch_order``): its seed and shuffling."""
    return {k: getattr(dataset, k, None) for k in ('seed', 'shuffle')}


def _streaming(runner):
    from xtuner_plugins.data.streaming import StreamingDataset
    loop = getattr(runner, 'train_loop', None)
    dataloader = getattr(loop, 'dataloader', None)
    dataset = getattr(dataloader, 'dataset', None)
    return (loop, dataloader, dataset) if isinstance(dataset, StreamingDataset) else (None, None, None)


@HOOKS.register_module()
class StreamStateHook(Hook):
    """Saves and restores where a streaming data set's units stand (module docstring)."""

    priority = 'VERY_HIGH'

    def __init__(self, on_data_change: str = 'stop') -> None:
        if on_data_change not in ('stop', 'restart'):
            from xtuner_plugins.errors import Refused
            raise Refused(f"StreamStateHook: on_data_change={on_data_change!r}; use 'stop' or 'restart'")
        self.on_data_change = on_data_change
        self.states: Dict[int, Any] = {}
        self.gathered: Optional[Dict[int, Any]] = None  # every rank's states (after_train_iter)
        self.loaded: Optional[dict] = None

    def before_run(self, runner) -> None:
        loop, dataloader, dataset = _streaming(runner)
        epochs = (getattr(runner, 'cfg', None) or {}).get('train_cfg', {}).get('max_epochs')
        if dataset is not None and not getattr(dataset, 'counts_epochs', True) and epochs is not None:
            from xtuner_plugins.engine.runstart import refuse
            refuse(f'max_epochs={epochs}: {type(dataset).__name__} does not know how many batches an epoch gives '
                   f'before it makes them; give the training length as max_iters=N (iterations)')
        if dataset is None:
            return
        from xtuner_plugins.data.streaming import empty_units
        world, workers = dataset.dist_info()[1], max(1, dataloader.num_workers)
        folder = getattr(getattr(dataset, 'source', dataset), 'folder', None)   # a unit with nothing to read waits
        problem = empty_units(dataset, world, workers, f'the shard set {folder}' if folder else 'the data set')
        if problem:
            from xtuner_plugins.engine.runstart import refuse
            refuse(problem)
        if epochs is not None and hasattr(dataset, 'epoch_parts'):
            from xtuner_plugins.data.shards import balance_note
            note = balance_note(dataset, world, workers)
            if note:
                print_log(note, logger='current', level=logging.WARNING)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        data = data_batch.get('data') if isinstance(data_batch, dict) else None
        for unit, state in (data or {}).get(KEY) or ():
            self.states[int(unit)] = state

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Every rank's states, gathered on every rank after each iteration: MMEngine's ``Runner`` saves on rank 0
        alone (no collective can run there), and every save (the checkpoint hook's, the preemption hook's) comes
        after this hook's ``after_train_iter``. One all-gather of a few small dicts per iteration."""
        from mmengine.dist import all_gather_object, get_world_size
        if _streaming(runner)[2] is None:
            return
        parts = all_gather_object(self.states) if get_world_size() > 1 else [self.states]
        self.gathered = {u: s for states in parts for u, s in states.items()}

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        loop, dataloader, dataset = _streaming(runner)
        if dataset is None:
            return
        from mmengine.dist import get_world_size

        from xtuner_plugins.engine.dataagree import data_fingerprint
        checkpoint[KEY] = dict(world_size=get_world_size(), workers=max(1, dataloader.num_workers),
                               units=dict(self.gathered if self.gathered is not None else self.states),
                               data=data_fingerprint(dataset), order=_order(dataset))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.loaded = checkpoint.get(KEY)

    def before_train(self, runner) -> None:
        loop, dataloader, dataset = _streaming(runner)
        if dataset is None or not getattr(loop, 'iter', 0):
            return
        if self.loaded is None:
            print_log('the checkpoint holds no data stream state (saved without StreamStateHook): the trained '
                      'batches are drawn again to skip them', logger='current', level=logging.WARNING)
            return
        from mmengine.dist import get_dist_info
        rank, world = get_dist_info()
        workers = max(1, dataloader.num_workers)
        saved = (self.loaded['world_size'], self.loaded['workers'])
        if saved != (world, workers):
            self._cannot_continue(runner, f'the checkpoint\'s data stream was read by {saved[0]} rank(s) x {saved[1]} '
                                          f'DataLoader worker(s), this run has {world} x {workers}', 'resume with '
                                          'the same numbers (the stream\'s parts are cut by them)')
            return self._restart(loop, dataloader)
        then, now = self.loaded.get('order'), _order(dataset)
        if then is not None and then != now:   # a checkpoint saved before it was recorded: not compared
            drawn = ', '.join(f'{k} {then.get(k)!r} -> {now.get(k)!r}' for k in sorted(now) if then.get(k) != now[k])
            self._cannot_continue(runner, f'the data stream\'s {drawn}: its epochs are drawn in another order, so '
                                          f'its saved positions would name other samples (some of the epoch seen '
                                          f'twice and others not at all)', 'resume with the same seed and shuffling')
            return self._restart(loop, dataloader)
        changed = data_change(self.loaded.get('data'), dataset)
        if changed:
            self._cannot_continue(runner, f'the data changed since the checkpoint\'s data stream state was saved (the '
                                          f'checkpoint\'s against this run\'s: {changed}): its positions would name '
                                          f'other samples now, some of the epoch seen twice and others not at all',
                                  'resume with the data it was saved with')
            return self._restart(loop, dataloader)
        mine = {u: s for u, s in self.loaded['units'].items() if rank * workers <= int(u) < (rank + 1) * workers}
        self.states = dict(mine)
        dataset.resume_from(mine, consumed=loop.iter)
        restart_loader(loop, dataloader, loop.iter)
        print_log(f'data stream resumed at iteration {loop.iter} from the checkpoint\'s state of {len(mine)} '
                  f'reading unit(s) of this rank (no batch drawn again)', logger='current')


    def _cannot_continue(self, runner, why: str, remedy: str) -> None:
        """Stop start-up (``on_data_change='stop'``), naming the setting that goes on anyway; or warn."""
        if self.on_data_change == 'restart':
            print_log(f'resume: {why}; on_data_change=\'restart\': the weights, optimizer and schedule are the '
                      f'checkpoint\'s, the data stream starts again from its beginning', logger='current',
                      level=logging.WARNING)
            return
        from xtuner_plugins.engine.runstart import refuse
        option = hook_option(runner, 'StreamStateHook', 'on_data_change=restart')
        refuse(f'resume: {why}; {remedy}, or go on with the checkpoint\'s weights, optimizer and schedule and the '
               f'stream started again from its beginning ({option}), or start a new run from its weights '
               f'(model.pretrained_pth=CHECKPOINT)')

    def _restart(self, loop, dataloader) -> None:
        """The stream from its beginning; MMEngine's replay of the trained batches answered without drawing."""
        self.states = {}
        restart_loader(loop, dataloader, loop.iter)


def data_change(saved: Optional[dict], dataset) -> str:
    """What differs between the data a checkpoint's stream state was saved with (``saved``: its
    ``dataagree.data_fingerprint``; None in a checkpoint older than it) and ``dataset``'s, in words ('' when
    nothing)."""
    from xtuner_plugins.engine.dataagree import data_fingerprint, difference
    return difference(saved, data_fingerprint(dataset)) if saved else ''


def restart_loader(loop, dataloader, trained: int) -> None:
    """Stop the loop's DataLoader workers (started with the data set as it was before the resume), start new ones
    from the resumed data set, and answer the ``trained`` batches MMEngine replays without drawing them."""
    from mmengine.runner.loops import _InfiniteDataloaderIterator
    old = getattr(getattr(loop, 'dataloader_iterator', None), '_iterator', None)
    if old is not None and hasattr(old, '_shutdown_workers'):
        old._shutdown_workers()
    dataloader._iterator = None  # persistent workers: built anew, not reused
    loop.dataloader_iterator = _Replayed(_InfiniteDataloaderIterator(dataloader), trained)
