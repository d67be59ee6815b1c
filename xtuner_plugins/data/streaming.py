"""What the streaming data sets share (online packing, ``online_packing.py``; tar shards, ``shards.py``): who reads
what, and where a stream stands.

**Who reads what.** Training reads a stream in ``R x W`` *units*: each rank's DataLoader workers (one unit per rank
without workers). Unit ``u = rank * W + w`` reads positions ``u, u + R*W, u + 2*R*W, ...`` of the epoch's order
(:func:`unit_part`): the units' parts are disjoint and together they are all of it.

**Where a stream stands.** Each item a unit yields carries ``stream_state``: ``(unit, state)``, the unit's state
*after* that item (its epoch, the next position, what its buffer holds). :func:`stream_collate_fn` hands the
states on in the batch (``data['stream_state']``), and ``engine/streamstate.py``'s ``StreamStateHook`` keeps the
last state of each unit whose batch was trained on, saves them with each checkpoint and, on a resume, gives them
back to the data set (:meth:`StreamingDataset.resume_from`) instead of MMEngine's replay of every batch.

**The order batches come in.** A DataLoader takes batch ``k`` from worker ``k % W``. A run resumed after ``i``
batches must take its next one from the unit the interrupted run would have: worker ``w`` then plays unit
``(w + i) % W`` (the *rotation*), so the resumed run's batches are the uninterrupted run's, in the same order.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from xtuner_plugins.errors import Stated

from .collate import internvl_collate_fn

__all__ = ['NothingToRead', 'StreamingDataset', 'empty_units', 'epoch_order', 'stream_collate_fn', 'unit_part']


def unit_part(n: int, unit: int, units: int) -> range:
    """The positions ``0..n-1`` unit ``unit`` of ``units`` reads: every ``units``-th from ``unit``."""
    if not 0 <= unit < units:
        raise ValueError(f'unit {unit} of {units}')
    return range(unit, n, units)


class NothingToRead(Stated, RuntimeError):
    """A reading unit whose part of the stream gives it no sample it can use: it would wait for the next one for
    ever (the DataLoader with it)."""


def empty_units(dataset: 'StreamingDataset', world: int, workers: int, what: str) -> Optional[str]:
    """The refusal of a stream whose parts leave one of its ``world`` x ``workers`` reading units nothing to read
    (:meth:`StreamingDataset.unit_parts`), naming the most workers that leave none; or None. ``what``: the data."""
    parts = dataset.unit_parts(world * workers)
    idle = sum(1 for part in parts or () if not part)
    if not idle:
        return None
    fits = next((w for w in range(workers - 1, 0, -1) if min(dataset.unit_parts(world * w)) > 0), None)
    fix = (f'set train_dataloader.num_workers to {fits} or fewer' if fits and fits > 1 else
           'set train_dataloader.num_workers=0 (each rank reads itself)' if fits else 'use fewer ranks')
    first = getattr(getattr(dataset, 'source', dataset), 'epoch_parts', None)   # (one unit reads all of it)
    later = (' in an epoch whose order of the shards gives them a shard of fewer samples than the units sharing it '
             '(each epoch orders the shards anew; the first gives each unit some)'
             if first is not None and min(first(world * workers)) > 0 else '')
    return (f'{what} holds {dataset.unit_parts(1)[0]} samples for {len(parts)} reading units ({world} ranks x '
            f'{workers} DataLoader workers): {idle} of them would read none{later} and wait for one for ever; {fix}, '
            f'or give more samples' + (' or more shards (tools/shard_dataset.py --samples-per-shard)'
                                       if 'shard' in what else ''))


class DryWatch:
    """Stops a unit that reads a whole epoch of its part without one sample it can use: each bad sample is counted
    once (``count_failure``), so a part made only of bad ones, within ``max_bad_fraction`` of the whole, was read
    again and again without a word."""

    def __init__(self, unit: int, units: int):
        self.unit, self.units, self.since = unit, units, None

    def good(self) -> None:
        self.since = None

    def bad(self, epoch: int, reason: str) -> None:
        if self.since is None:
            self.since = epoch
        elif epoch >= self.since + 2:
            raise NothingToRead(f'reading unit {self.unit} of {self.units} (ranks x DataLoader workers) read a whole '
                                f'epoch of its part of the data and every sample was bad (the last: {reason}): '
                                f'fix or drop them (tools/check_dataset.py names each), or use fewer DataLoader '
                                f'workers so that the parts mix')


def _coprime_step(n: int, seed: int) -> int:
    import math
    import random
    rng = random.Random(seed)
    while True:
        a = rng.randrange(1, max(2, n))
        if math.gcd(a, n) == 1:
            return a


_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit integer hash (splitmix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


#: the order new stream states are read in (a state records it as ``'order'``; a state without it is version 1)
ORDER = 2


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, version: int = ORDER):
    """The epoch's order as a function ``position -> item``, a permutation of ``0..n-1`` seeded by ``seed`` and
    ``epoch`` that holds no array of ``n`` entries (ranks and workers each compute the items of their positions);
    ``shuffle=False``: ``p`` itself.

    Version 2 (the default): a 4-round Feistel network on the smallest even number of bits that holds ``n - 1``,
    walking the cycle until it lands below ``n`` (under 4 steps on average). Written here because no library we use
    has a seeded permutation without the array (numpy's and torch's hold ``n`` entries, 400 MB per reading unit at
    50 M samples). Version 1, ``(a * p + b) mod n``, is kept for the stream states saved with it (an epoch resumed
    in the order it began in): consecutive positions were items ``a`` apart, so a file sorted by source or length
    was read in a few evenly spaced runs rather than shuffled."""
    if not shuffle or n <= 1:
        return lambda p: p
    if version == 1:
        a, b = _coprime_step(n, seed * 1_000_003 + epoch), (seed * 7919 + epoch * 104_729) % n
        return lambda p: (a * p + b) % n
    if version != ORDER:
        raise ValueError(f'a stream state in order version {version}; this code reads versions 1 and {ORDER}')
    bits = (n - 1).bit_length()
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    keys = [_mix(_mix(_mix(seed & _M64) ^ epoch) + r) for r in range(4)]

    def order(p: int) -> int:
        if not 0 <= p < n:
            raise IndexError(f'position {p} of {n}')
        x = p
        while True:
            left, right = x >> half, x & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
            x = (left << half) | right
            if x < n:
                return x
    return order


def stream_collate_fn(instances: Sequence[Dict], **kwargs) -> Dict:
    """:func:`~xtuner_plugins.data.collate.internvl_collate_fn`, with the items' ``stream_state`` in
    ``data['stream_state']`` (for ``StreamStateHook``)."""
    batch = internvl_collate_fn(instances, **kwargs)
    batch['data']['stream_state'] = [x['stream_state'] for x in instances if 'stream_state' in x]
    return batch


class StreamingDataset(IterableDataset):
    """An endless stream of items (epoch after epoch) read in units (module docstring). A subclass yields from
    :meth:`stream` ``(state_after, item)`` for its unit, starting from ``state`` (None: the first epoch's start).

    Args:
        rank, world_size: this rank and the number of ranks; None: the distributed run's (``mmengine.dist``).
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.resume_states: Dict[int, Any] = {}  # unit -> its state, from a checkpoint
        self.rotation = 0                         # batches trained before the resume (module docstring)

    def dist_info(self) -> Tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return int(self.rank), int(self.world_size)
        from mmengine.dist import get_dist_info
        return get_dist_info()

    def unit(self) -> Tuple[int, int, int]:
        """``(unit, units, workers)`` of the calling process (a DataLoader worker, or the rank itself)."""
        rank, world = self.dist_info()
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        logical = (worker + self.rotation) % workers
        return rank * workers + logical, world * workers, workers

    def resume_from(self, states: Dict[int, Any], consumed: int) -> None:
        """Start each unit at its saved state; ``consumed``: batches the run trained on (the rotation)."""
        self.resume_states, self.rotation = dict(states), int(consumed)

    def stream(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Any, Dict]]:
        raise NotImplementedError

    def unit_parts(self, units: int) -> Optional[List[int]]:
        """The fewest samples each of ``units`` reading units reads in an epoch, or None where not known."""
        return None

    def __iter__(self) -> Iterator[Dict]:
        unit, units, _ = self.unit()
        for state, item in self.stream(unit, units, self.resume_states.get(unit)):
            item['stream_state'] = (unit, state)
            yield item
