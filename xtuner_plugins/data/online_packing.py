"""Online packing, as InternVL's ``PackedDataset``: packs made as samples stream in, no global lengths.

:class:`PackedInternVLDataset` (``packing.py``) plans every pack before training from the whole data set's
estimated lengths. :class:`OnlinePackedDataset` needs none: each reading unit (a rank's DataLoader worker,
``streaming.py``) loads its own part of the epoch's order, one sample after another, and keeps a buffer of at most
``max_buffer_size`` open packs. A sample goes into the first open pack it fits (``max_tokens`` tokens,
``max_tiles`` tiles); when none has room it opens a new one. A pack that reaches ``max_tokens`` is emitted at
once; when the buffer holds more than ``max_buffer_size`` packs, the fullest is emitted. A sample is never split
(so never inside an image); one over a budget alone is a pack of its own. Items are the packed items of
``packing.py`` (``input_ids``, ``labels``, ``position_ids`` restarting per sample, ``seq_lens``, tiles, ``samples``,
``skipped``), so the packed collate, model and loss are the same.

**Where the samples come from.** An ``InternVLDataset`` (each unit its part of each epoch's order,
:class:`IndexedStream`), or the tar shards of a :class:`~xtuner_plugins.data.shards.ShardDataset` (each unit its
shards, ``configs/finetune_full_packed_shards.py``). Either gives each sample a small *key* (its epoch and index;
its epoch, shard and place in the shard) from which a resume loads the samples the buffer held again.

Epochs follow one another inside the stream (the order of each is reshuffled, ``streaming.epoch_order``); the
buffer carries over. The training length is given in iterations (``max_iters``): the number of packs is not known
before they are made. A resumed run restores each unit's epoch, position and buffer from the checkpoint
(``engine/streamstate.py``): it sees the packs the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

from xtuner_plugins.errors import Refused

from .errors import SampleError
from .packing import check_budgets, pack_items
from .streaming import ORDER, DryWatch, NothingToRead, StreamingDataset, epoch_order, unit_part

__all__ = ['IndexedStream', 'OnlinePackedDataset']


class IndexedStream:
    """The samples of an indexable data set (``InternVLDataset``) a unit reads: its part of each epoch's order
    (``streaming.unit_part``). A state is ``{'epoch', 'next', 'order'}`` (the next position in the part, the version
    of ``epoch_order`` the epoch is read in), a key ``(epoch, index)``."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True):
        self.samples, self.seed, self.shuffle = dataset, seed, shuffle

    def rank_samples(self, rank: int, world: int) -> int:
        return len(unit_part(len(self.samples), rank, world))

    def keyed_records(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Dict, Tuple, Any]]:
        """``(state after, key, record)`` of this unit's samples, epoch after epoch, from ``state``."""
        n = len(self.samples)
        epoch, j = (0, 0) if state is None else (state['epoch'], state['next'])
        version = ORDER if state is None else state.get('order', 1)  # an epoch goes on in the order it began in
        while True:
            part = unit_part(n, unit, units)
            if not len(part):   # refused at start-up (StreamStateHook): a data set built outside a run
                raise NothingToRead(f'{n} samples cannot give each of the {units} reading units (ranks x DataLoader '
                                    f'workers) one; use fewer workers or more data')
            order = epoch_order(n, self.seed, epoch, self.shuffle, version)
            while j < len(part):
                index = order(part[j])
                j += 1
                yield dict(epoch=epoch, next=j, order=version), (epoch, index), self.samples.record_at(index)
            epoch, j, version = epoch + 1, 0, ORDER

    def reload(self, keys: List[Tuple]) -> List[Any]:
        return [self.samples.record_at(index) for _, index in keys]

    def epoch_parts(self, units: int) -> List[int]:
        """The samples each of ``units`` reading units reads in an epoch."""
        return [len(unit_part(len(self.samples), unit, units)) for unit in range(units)]

    unit_parts = epoch_parts   # the same in every epoch


class OnlinePackedDataset(StreamingDataset):
    """Packs of an :class:`~xtuner_plugins.data.dataset.InternVLDataset` made online (module docstring).

    Args:
        dataset: the data set (or its config dict) whose samples are packed: an ``InternVLDataset``, or a
            ``ShardDataset`` (its own order: its ``seed`` and ``shuffle``).
        max_tokens: tokens per pack (InternVL's ``max_packed_tokens``, 8192 by default there).
        max_tiles: tiles per pack; None: no limit.
        max_buffer_size: open packs a unit keeps (InternVL's 20).
        seed, shuffle: the epochs' order.
        rank, world_size: see :class:`~xtuner_plugins.data.streaming.StreamingDataset`.
    """

    def __init__(self, dataset, max_tokens: int = 8192, max_tiles: Optional[int] = None, max_buffer_size: int = 20,
                 seed: int = 0, shuffle: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__(rank, world_size)
        check_budgets(max_tokens=max_tokens, max_tiles=max_tiles, max_buffer_size=max_buffer_size)   # (before a build)
        if isinstance(dataset, dict):
            from xtuner.registry import BUILDER

            from .dataset import InternVLDataset
            if dataset.get('type') in (InternVLDataset, 'InternVLDataset'):  # no global lengths: none computed
                dataset = dict(dataset, lengths_with_check=dataset.get('lengths_with_check', False))
            dataset = BUILDER.build(dataset)
        from .preference import InternVLPreferenceDataset
        from .shards import ShardDataset
        if isinstance(dataset, InternVLPreferenceDataset):   # its items are pairs: a KeyError at the first step
            raise Refused('online packing takes samples, not preference pairs: pack pairs offline '
                          '(PackedInternVLDataset, as configs/dpo_lora_packed.py does)')
        self.dataset = dataset
        self.source = dataset if isinstance(dataset, ShardDataset) else IndexedStream(dataset, seed, shuffle)
        self.max_tokens, self.max_tiles, self.max_buffer_size = max_tokens, max_tiles, max_buffer_size
        self.seed, self.shuffle = seed, shuffle

    #: the number of packs an epoch gives is not known before they are made: the run is counted in max_iters
    counts_epochs = False

    def __len__(self) -> int:
        """The samples this rank reads in an epoch: an upper bound of its packs, for MMEngine's counters (a run
        given in ``max_epochs`` is refused by ``StreamStateHook``)."""
        return self.source.rank_samples(*self.dist_info())

    @property
    def epoch(self) -> int:
        return getattr(self.source.samples, 'epoch', 0)

    def unit_parts(self, units: int) -> List[int]:
        """The fewest samples each of ``units`` reading units reads in an epoch (its source's parts)."""
        return self.source.unit_parts(units)

    def set_epoch(self, epoch: int) -> None:
        """Epochs are the stream's own (module docstring): the loop's restarts do not set them."""

    def _load(self, record, epoch: int, skipped: list, dry: Optional[DryWatch] = None) -> Optional[Dict]:
        ds = self.source.samples
        if getattr(ds, 'epoch', epoch) != epoch and hasattr(ds, 'set_epoch'):
            ds.set_epoch(epoch)
        try:
            item = ds.load_sample(record)
        except SampleError as err:
            ds.count_failure(err.with_source(ds.where(record)))
            skipped.append((err.source, err.reason))
            if dry is not None:
                dry.bad(epoch, f'{err.source}: {err.reason}')
            return None
        if dry is not None:
            dry.good()
        return item

    def _fits(self, pack: List[Tuple[Tuple, Dict]], item: Dict) -> bool:
        tokens = sum(len(x['input_ids']) for _, x in pack) + len(item['input_ids'])
        tiles = sum(x['pixel_values'].shape[0] for _, x in pack) + item['pixel_values'].shape[0]
        return tokens <= self.max_tokens and (self.max_tiles is None or tiles <= self.max_tiles)

    def stream(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Any, Dict]]:
        held = [] if state is None else state['buffer']
        source_state = None if state is None else {k: v for k, v in state.items() if k != 'buffer'}
        skipped: list = []
        # a pack: [(key, item)], a key's first entry its epoch; the buffer's packs come back from their keys
        keys = [tuple(key) for pack in held for key in pack]
        loaded = dict(zip(keys, self.source.reload(keys))) if keys else {}
        buffer = [[(k, x) for k in map(tuple, pack) if (x := self._load(loaded[k], k[0], skipped)) is not None]
                  for pack in held]
        buffer = [pack for pack in buffer if pack]
        where_now: Dict = dict(source_state or {})

        def state_now() -> Dict:
            return dict(where_now, buffer=[[k for k, _ in pack] for pack in buffer])

        def emit(k: int) -> Tuple[Any, Dict]:
            nonlocal skipped
            pack = buffer.pop(k)
            item = dict(pack_items([x for _, x in pack]), skipped=skipped)
            skipped = []
            return state_now(), item

        def tokens(pack) -> int:
            return sum(len(x['input_ids']) for _, x in pack)

        dry = DryWatch(unit, units)
        for after, key, record in self.source.keyed_records(unit, units, source_state):
            where_now = after
            item = self._load(record, key[0], skipped, dry)
            if item is None:
                continue
            where = next((k for k, pack in enumerate(buffer) if self._fits(pack, item)), None)
            if where is None:
                buffer.append([(key, item)])
                where = len(buffer) - 1
            else:
                buffer[where].append((key, item))
            if tokens(buffer[where]) >= self.max_tokens:
                yield emit(where)
            while len(buffer) > self.max_buffer_size:
                yield emit(max(range(len(buffer)), key=lambda k: (tokens(buffer[k]), -k)))
