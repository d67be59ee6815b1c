"""The streams' shared order (data/streaming.py ``epoch_order``): a seeded permutation without an array that mixes a
sorted file, and stream states saved in the first order (version 1) go on in it to the end of their epoch."""

import pytest

from xtuner_plugins.data.online_packing import IndexedStream
from xtuner_plugins.data.streaming import ORDER, epoch_order, unit_part


@pytest.mark.parametrize('n', [2, 3, 4, 5, 17, 64, 1000, 4097])
def test_each_order_is_a_permutation(n):
    for seed, epoch in [(0, 0), (3, 1), (12345, 7)]:
        order = epoch_order(n, seed, epoch)
        assert sorted(order(p) for p in range(n)) == list(range(n))
    assert [epoch_order(n, 3, 1)(p) for p in range(n)] == [epoch_order(n, 3, 1)(p) for p in range(n)]
    with pytest.raises(IndexError, match=f'position {n} of {n}'):
        epoch_order(n, 0, 0)(n)


def regions_read(version):
    """The fewest of 8 equal regions of a sorted file that a reading unit's first 64 samples fall in, over sizes,
    seeds, epochs and units: 8 (or 7 once in a while) for a shuffled order."""
    fewest = 8
    for n in (1000, 4096, 10007, 50000):
        for seed in range(20):
            for epoch in range(3):
                order = epoch_order(n, seed, epoch, version=version)
                for unit, units in ((0, 1), (1, 4)):
                    items = [order(p) for p in unit_part(n, unit, units)[:64]]
                    fewest = min(fewest, len({8 * i // n for i in items}))
    return fewest


def test_a_unit_reads_a_sorted_file_shuffled():
    """Version 1 ((a p + b) mod n) reads runs of evenly spaced items: some seeds' first 64 samples came from 3 of the
    8 regions (a file sorted by source gave batches of one or two sources)."""
    assert regions_read(ORDER) >= 7
    assert regions_read(1) <= 3


class Samples:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def record_at(self, index):
        return index


def read(stream, state, count, unit=1, units=3):
    return [(after, record) for (after, _, record), _ in zip(stream.keyed_records(unit, units, state), range(count))]


def test_a_state_saved_in_the_first_order_finishes_its_epoch_in_it():
    n, stream = 40, IndexedStream(Samples(40), seed=5)
    part = unit_part(n, 1, 3)
    old = epoch_order(n, 5, 0, version=1)
    got = read(stream, {'epoch': 0, 'next': 4}, len(part) - 4 + 3)   # a checkpoint written before 'order'
    assert [r for _, r in got[:len(part) - 4]] == [old(p) for p in part[4:]]
    assert got[0][0] == {'epoch': 0, 'next': 5, 'order': 1}
    new = epoch_order(n, 5, 1)
    assert [r for _, r in got[len(part) - 4:]] == [new(p) for p in part[:3]]
    assert got[-1][0] == {'epoch': 1, 'next': 3, 'order': ORDER}
    fresh = read(stream, None, 3)
    assert [r for _, r in fresh] == [epoch_order(n, 5, 0)(p) for p in part[:3]] and fresh[0][0]['order'] == ORDER
    assert read(stream, fresh[1][0], 1)[0][1] == fresh[2][1]   # a new state goes on in its own order
    with pytest.raises(ValueError, match='order version 9'):
        read(stream, {'epoch': 0, 'next': 0, 'order': 9}, 1)
