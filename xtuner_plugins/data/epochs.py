"""The epoch a training item is loaded for, carried with its index to the process that loads it.

What a sample gives may depend on the epoch: a video's ``'rand'`` frame positions are drawn from the seed, the epoch
and the sample (``data/video.py``). The training loop's only word of a new epoch is the sampler's ``set_epoch``
(MMEngine's ``_InfiniteDataloaderIterator`` calls it each time the data loader is exhausted, ``DistSamplerSeedHook``
before training; a resumed run replays its iterations, so the epochs come back the same). The data set that draws
the frames, though, lives in the DataLoader's worker processes, copies made when they started: with
``persistent_workers`` they never see an attribute set later on the main process's data set.

So :class:`EpochSampler` wraps the configured sampler and hands out each index as an :class:`EpochIndex`, an ``int``
that also carries the epoch; the data set's ``__getitem__`` (``InternVLDataset``, ``PackedInternVLDataset``) calls
its own ``set_epoch`` with it (:func:`take_epoch`), in whichever process loads the item. The training data loader's
sampler of an ``InternVLDataset`` (or a wrapper of one) is wrapped when the runner builds the training loop
(``engine/derive.py``), so configs and ``--cfg-options`` keep naming the sampler itself
(``train_dataloader.sampler.seed``).
"""

from __future__ import annotations

from typing import Iterator, Optional

from torch.utils.data import Sampler

__all__ = ['EpochIndex', 'EpochSampler', 'take_epoch']


class EpochIndex(int):
    """An item index (an ``int`` in every other respect) and the ``epoch`` it is drawn in."""

    def __new__(cls, value: int, epoch: int):
        self = super().__new__(cls, value)
        self.epoch = int(epoch)
        return self

    def __reduce__(self):  # to the DataLoader's workers, attribute and all
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f'EpochIndex({int(self)}, epoch={self.epoch})'


def take_epoch(dataset, index) -> None:
    """``dataset.set_epoch(index.epoch)`` when ``index`` carries an epoch (an :class:`EpochIndex`)."""
    epoch = getattr(index, 'epoch', None)
    if epoch is not None and epoch != getattr(dataset, 'epoch', None):
        dataset.set_epoch(epoch)


class EpochSampler(Sampler):
    """``sampler``'s indices as :class:`EpochIndex` of the epoch last given to :meth:`set_epoch` (0 until then).

    Args:
        dataset: the data set (given by the runner, as to any sampler).
        sampler: the sampler to wrap, or its config (built with ``dataset`` and ``seed``, as MMEngine builds one).
        seed: the run's sampler seed, handed on to ``sampler``'s config.
    """

    def __init__(self, dataset, sampler, seed: Optional[int] = None) -> None:
        if isinstance(sampler, dict):
            from mmengine.registry import DATA_SAMPLERS
            sampler = DATA_SAMPLERS.build(sampler, default_args=dict(dataset=dataset, seed=seed))
        self.dataset, self.sampler, self.epoch = dataset, sampler, 0

    def set_epoch(self, epoch: int) -> None:
        """The wrapped sampler's epoch (its order), the main process's data set's, and the one indices carry."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[EpochIndex]:
        epoch = self.epoch
        return (EpochIndex(i, epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
