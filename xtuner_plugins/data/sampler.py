"""``LengthGroupedSampler`` without a Python object per sample: XTuner's sampler, the same order, in numpy.

XTuner 0.2's ``xtuner.dataset.samplers.LengthGroupedSampler`` asserts that the data set's lengths are a Python
``list`` and, every epoch, builds lists of every index (megabatches, the flat order, the rank's share) and a
``set`` of them: at 16M samples about 1.6 GiB a rank (benchmarks/RESULTS.md, "Data at scale"), where the data set
itself holds a few numpy arrays. This class takes the same arguments and yields the same indices in the same order
for the same seed and epoch (``tests/data/test_sampler.py`` compares them), holding int64 arrays instead:

* a random permutation (``torch.randperm`` with the epoch's generator, as XTuner draws it) cut into megabatches of
  ``mega_batch_mult x per_device_batch_size x world_size`` indices, each sorted by length, longest first (ties
  keep their drawn order);
* with positive and negative lengths (``modality_length``: negative for text-only samples), each modality drawn
  and cut on its own, the megabatches shuffled together, the two last (short) ones joined at the end;
* the longest sample moved to the first position (a step that runs out of memory does so at once);
* the order repeated to a multiple of the total batch (``round_up``), then every ``world_size``-th index from the
  rank's own.

The data set's lengths are read once, from ``<length_property>_array`` when it has one (``lengths.LengthStats``),
else from the property itself.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sized

import numpy as np
import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import ConcatDataset, Sampler


def _lengths(dataset, length_property: str) -> np.ndarray:
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    arrays = []
    for part in parts:
        values = getattr(part, f'{length_property}_array', None)
        arrays.append(np.asarray(values if values is not None else getattr(part, length_property), dtype=np.int64))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _megabatches(lengths: np.ndarray, group: int, generator: torch.Generator) -> List[np.ndarray]:
    """Positions into ``lengths``: a random permutation cut into ``group``-sized megabatches, each sorted by
    length, longest first, ties in drawn order."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    batch_id = np.arange(len(order)) // group
    order = order[np.lexsort((-lengths[order], batch_id))]   # stable: by megabatch, then by length descending
    return np.split(order, np.arange(group, len(order), group))


def grouped_order(lengths: np.ndarray, group: int, generator: torch.Generator) -> np.ndarray:
    """XTuner's ``get_length_grouped_indices``, the same indices in the same order, as one int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f'sample lengths must not be 0 (item {int(np.flatnonzero(lengths == 0)[0])} is)')
    if (lengths > 0).all() or (lengths < 0).all():
        batches = _megabatches(lengths, group, generator)
    else:
        mm, lang = np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)
        mm_batches = [mm[b] for b in _megabatches(lengths[mm], group, generator)]
        lang_batches = [lang[b] for b in _megabatches(-lengths[lang], group, generator)]
        last = np.concatenate([mm_batches[-1], lang_batches[-1]])
        batches = mm_batches[:-1] + lang_batches[:-1]
        shuffled = torch.randperm(len(batches), generator=generator).numpy()
        batches = [batches[i] for i in shuffled]
        if len(last):
            batches.append(last[np.argsort(-np.abs(lengths[last]), kind='stable')])
    longest = int(np.argmax([abs(lengths[b[0]]) for b in batches]))
    batches[0] = batches[0].copy()
    if longest:
        batches[longest] = batches[longest].copy()
    batches[0][0], batches[longest][0] = batches[longest][0], batches[0][0]
    return np.concatenate(batches)


class LengthGroupedSampler(Sampler):
    """XTuner's ``LengthGroupedSampler`` (same arguments, same order; module docstring) over numpy arrays."""

    def __init__(self, dataset: Sized, per_device_batch_size: int, length_property: str = 'length',
                 mega_batch_mult: Optional[int] = None, seed: Optional[int] = None, round_up: bool = True) -> None:
        self.rank, self.world_size = get_dist_info()
        self.dataset = dataset
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        self.round_up = round_up
        n = len(dataset)
        if round_up:
            self.num_samples = math.ceil(n / self.world_size / per_device_batch_size) * per_device_batch_size
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = math.ceil((n - self.rank) / self.world_size)
            self.total_size = n
        self.total_batch_size = per_device_batch_size * self.world_size
        if mega_batch_mult is None:   # 50, or the number that gives 4 megabatches, whichever is smaller
            mega_batch_mult = max(min(n // (self.total_batch_size * 4), 50), 1)
        self.group_batch_size = mega_batch_mult * self.total_batch_size
        self.length = _lengths(dataset, length_property)
        if len(self.length) != n:
            raise ValueError(f'{type(dataset).__name__}.{length_property} has {len(self.length)} values for '
                             f'{n} items')

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = grouped_order(self.length, self.group_batch_size, generator)
        if self.round_up:
            order = np.resize(order, self.total_size)   # repeated from the start, as XTuner's list product
        return order[self.rank:self.total_size:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.indices())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
