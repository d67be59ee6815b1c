"""Packed sequences: several samples in one row, as InternVL 2.5 trains.

:func:`greedy_packs` groups samples, in a seeded shuffled order, into packs of at most ``max_tokens``
tokens and ``max_tiles`` tiles (a sample is never split, so never inside an image; a sample bigger than
a budget alone gets a pack of its own). Sizes come from the dataset's header-based estimates
(``length``, ``num_tiles_per_item``), so packing decodes no image.

:class:`PackedInternVLDataset` wraps an :class:`~xtuner_plugins.data.dataset.InternVLDataset`; each item is
one pack: the samples' ``input_ids``/``labels``/tiles concatenated, ``position_ids`` restarting at 0 for
every sample and ``seq_lens`` (tokens per sample). The model turns ``seq_lens`` into attention that never
crosses samples (a dense block-diagonal causal mask under SDPA/eager, a document-causal ``BlockMask`` under
``flex_attention``, varlen kernels with flash attention; ``models/attention.py``) and the loss counts samples by
them. Bad samples are skipped and counted by the wrapped dataset, like unpacked ones. Preference pairs
(:class:`~xtuner_plugins.data.preference.InternVLPreferenceDataset`) pack alike: a pack of pairs is a row of
chosen answers and a row of rejected answers, the pairs in the same order in both, sized by the longer answer.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from xtuner_plugins.errors import Refused

from .epochs import take_epoch
from .errors import SampleError, TooManyBadSamplesError


def check_budgets(**budgets) -> None:
    """:class:`Refused` naming each packing budget (``max_tokens=...``; ``max_tiles`` may be None: no limit) that is
    no whole number >= 1: 0 or -2 was a ValueError's traceback, ``2.5`` taken as is (a buffer of 3 packs)."""
    from .fitting import whole_number
    bad = [f'{name}={value!r}' for name, value in budgets.items()
           if not whole_number(value) and not (value is None and name == 'max_tiles')]
    if bad:
        raise Refused(f'packing budgets {", ".join(bad)} (train_dataloader.dataset.*): each is a whole number >= 1 '
                      '(tokens and tiles per pack, open packs per DataLoader worker; max_tiles=None: no limit)')


def greedy_packs(lengths: Sequence[int], tiles: Sequence[int], max_tokens: int,
                 max_tiles: Optional[int] = None, order: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Group item indices (taken in ``order``) into packs within ``max_tokens`` and ``max_tiles``."""
    check_budgets(max_tokens=max_tokens, max_tiles=max_tiles)
    packs, current, tok, til = [], [], 0, 0
    for i in (range(len(lengths)) if order is None else order):
        n, t = abs(int(lengths[i])), int(tiles[i])
        fits = tok + n <= max_tokens and (max_tiles is None or til + t <= max_tiles)
        if current and not fits:
            packs.append(current)
            current, tok, til = [], 0, 0
        current.append(i)
        tok += n
        til += t
    if current:
        packs.append(current)
    return packs


def _exact(dataset) -> Tuple[List[int], List[int]]:
    """The items' lengths and tiles as they load (``LengthStats.exact_stats``, not a ``length_field``'s)."""
    exact = getattr(dataset, 'exact_stats', None)
    if exact is None:
        return dataset.length, dataset.num_tiles_per_item
    lengths, tiles = exact()
    return lengths.tolist(), tiles.tolist()


class PackedInternVLDataset(Dataset):
    """Packs of an :class:`InternVLDataset` (see the module docstring).

    Args:
        dataset: the dataset (or its config dict) to pack.
        max_tokens: token budget per pack (InternVL 2.5 uses 16384).
        max_tiles: tile budget per pack (bounds the vision tower's batch); ``None`` for no limit.
        seed: seed of the shuffled order packs are filled in.
        shuffle: fill packs in a shuffled order (else in dataset order).
    """

    def __init__(self, dataset, max_tokens: int = 16384, max_tiles: Optional[int] = None, seed: int = 0,
                 shuffle: bool = True):
        super().__init__()
        check_budgets(max_tokens=max_tokens, max_tiles=max_tiles)   # (before the data set is built)
        if isinstance(dataset, dict):
            from xtuner.registry import BUILDER
            dataset = BUILDER.build(dataset)
        self.dataset = dataset
        order = list(range(len(dataset)))
        if shuffle:
            random.Random(seed).shuffle(order)
        self.item_lengths, tiles = _exact(dataset)
        self.packs = greedy_packs(self.item_lengths, tiles, max_tokens, max_tiles, order)
        self.max_tokens, self.max_tiles = max_tokens, max_tiles

    def __len__(self) -> int:
        return len(self.packs)

    @property
    def epoch(self) -> int:
        return getattr(self.dataset, 'epoch', 0)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the packed samples are loaded for (``InternVLDataset.set_epoch``)."""
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)

    @property
    def length(self) -> List[int]:
        lengths = self.item_lengths
        return [sum(lengths[i] for i in pack) for pack in self.packs]

    def _load_pack(self, pack: List[int], skipped: list) -> List[Dict[str, torch.Tensor]]:
        items = []
        for i in pack:
            record = self.dataset.record_at(i)
            try:
                items.append(self.dataset.load_sample(record))
            except SampleError as err:
                self.dataset.count_failure(err.with_source(self.dataset.where(record)))
                skipped.append((err.source, err.reason))
        return items

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        """A pack without its bad samples (counted; listed in ``skipped``); a pack with none left is replaced
        by the next. An index from training's sampler carries its epoch (``data/epochs.py``): the samples are
        loaded for it."""
        take_epoch(self, index)
        skipped: list = []
        for attempt in range(len(self.packs)):
            items = self._load_pack(self.packs[(index + attempt) % len(self.packs)], skipped)
            if items:
                return dict(pack_items(items), skipped=skipped)
        raise TooManyBadSamplesError(f'no pack of {len(self.packs)} has a loadable sample')


def _pack_tokens(parts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Token sequences one after another: ids, labels, positions restarting per sequence, lengths."""
    seq_lens = [int(x['input_ids'].shape[0]) for x in parts]
    return dict(input_ids=torch.cat([x['input_ids'] for x in parts]),
                labels=torch.cat([x['labels'] for x in parts]),
                position_ids=torch.cat([torch.arange(n) for n in seq_lens]),
                seq_lens=torch.tensor(seq_lens, dtype=torch.long))


def pack_items(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Concatenate loaded samples into one packed item. Preference pairs (items with ``chosen`` and
    ``rejected``) become one pair of packs: the chosen answers packed in the pairs' order, the rejected ones in
    the same order, sharing the tiles (``data/preference.py`` makes them two rows)."""
    pixel_values = torch.cat([x['pixel_values'] for x in items])
    if 'chosen' in items[0]:
        tokens = {side: _pack_tokens([x[side] for x in items]) for side in ('chosen', 'rejected')}
    else:
        tokens = _pack_tokens(items)
    return dict(tokens,
                pixel_values=pixel_values,
                image_flags=torch.cat([x['image_flags'] for x in items]),
                num_tiles=pixel_values.shape[0],
                samples=[s for x in items for s in x.get('samples', ())],
                reduced=[r for x in items for r in x.get('reduced', ())],
                truncated=[t for x in items for t in x.get('truncated', ())])
