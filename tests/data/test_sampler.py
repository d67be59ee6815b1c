"""data/sampler.py: XTuner's LengthGroupedSampler's order, index for index, from numpy arrays; the data set's
lengths read as arrays, not lists."""

import numpy as np
import pytest

from xtuner.dataset.samplers import LengthGroupedSampler as XTunerSampler

from xtuner_plugins.data.sampler import LengthGroupedSampler


class Lengths:
    """A data set that is only its lengths (a list, as XTuner's sampler asserts)."""

    def __init__(self, values):
        self.length = list(values)

    def __len__(self):
        return len(self.length)


def cases():
    rng = np.random.default_rng(0)
    mixed = rng.integers(1, 40, 1000) * rng.choice([1, -1], 1000, p=[0.7, 0.3])   # many ties, both modalities
    yield 'mixed', mixed
    yield 'images only', rng.integers(1, 5, 333)
    yield 'text only', -rng.integers(1, 500, 257)
    yield 'one text sample', np.array([5, 7, -3, 9, 9, 2, 11])


@pytest.mark.parametrize('name,lengths', list(cases()))
@pytest.mark.parametrize('world,batch,mult', [(1, 4, None), (2, 3, None), (4, 2, 3), (3, 5, 1)])
def test_the_same_order_as_xtuners_sampler(monkeypatch, name, lengths, world, batch, mult):
    for rank in range(world):
        for mod in ('xtuner.dataset.samplers.length_grouped', 'xtuner_plugins.data.sampler'):
            monkeypatch.setattr(f'{mod}.get_dist_info', lambda: (rank, world))
        for round_up in (True, False):
            ours = LengthGroupedSampler(Lengths(lengths), batch, mega_batch_mult=mult, seed=7, round_up=round_up)
            theirs = XTunerSampler(Lengths(lengths), batch, mega_batch_mult=mult, seed=7, round_up=round_up)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                assert list(ours) == list(theirs), (name, world, rank, round_up, epoch)
            assert len(ours) == len(theirs)


def test_the_data_sets_lengths_are_read_as_arrays(monkeypatch):
    class Arrays(Lengths):
        @property
        def length(self):
            raise AssertionError('the list property was read')

        def __init__(self, values):
            self.length_array = np.asarray(values)

        def __len__(self):
            return len(self.length_array)
    sampler = LengthGroupedSampler(Arrays([3, 1, 2, 5]), 2, seed=0)
    assert sorted(sampler) == [0, 1, 2, 3] and isinstance(sampler.length, np.ndarray)
    with pytest.raises(ValueError, match='must not be 0'):
        list(LengthGroupedSampler(Lengths([3, 0, 2]), 1, seed=0))
