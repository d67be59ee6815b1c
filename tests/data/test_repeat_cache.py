"""A fractional repeat_time's seeded subset (data/sources.py's repeat_subset) is drawn once per node and
memory-mapped from the cache by the other ranks (data/startcheck.py's cached_subset): at 5M samples and 0.3 each rank
drew it in seconds with ~0.7 GB of Python ints; the subset is the one it always was."""

import random

import numpy as np

from tests.helpers import conv, write_jsonl
from xtuner_plugins.data import InternVLDataset, startcheck
from xtuner_plugins.data.sources import repeat_array, repeat_indices


def test_the_subset_is_the_one_random_sample_always_drew():
    for n, repeat, seed in ((1000, 2.5, 3), (977, 0.3, 0), (50, 1.0, 1), (10, 0.05, 2)):
        whole, extra = int(repeat), int(round((repeat - int(repeat)) * n))
        expected = list(range(n)) * whole + sorted(random.Random(seed).sample(range(n), extra))
        assert repeat_indices(n, repeat, seed) == expected
        assert np.array_equal(repeat_array(n, repeat, seed), expected)


def test_a_large_sources_subset_is_drawn_once_then_read_from_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)} for i in range(40)])
    monkeypatch.setattr(startcheck, 'CACHED_SUBSET', 10, raising=False)  # 40 samples count as large here
    drawn = []
    real = random.Random.sample
    monkeypatch.setattr(random.Random, 'sample', lambda self, *a, **k: drawn.append(a[1]) or real(self, *a, **k))

    def items():  # a rank of the node building its data set
        ds = InternVLDataset(path, tokenizer=tiny_tokenizer, repeat_times=1.5, cache_dir=str(tmp_path / 'cache'))
        return [ds.record_at(i).line for i in range(len(ds))]
    first, second = items(), items()
    assert drawn == [20]  # the second rank read it
    assert first == second == list(range(1, 41)) + [i + 1 for i in sorted(random.Random(0).sample(range(40), 20))]
