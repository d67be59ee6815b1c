"""bench_data_scale.py's data: a LLaVA-shaped .json list (or .jsonl) that json and the sample index read alike,
images the samples share, and the summed PSS of a process tree."""

import json
import os

import pytest

from benchmarks.bench_data_scale import pss_of_tree, write_data
from xtuner_plugins.data.index import scan


@pytest.mark.parametrize('fmt', ['json', 'jsonl'])
def test_the_written_set_is_what_the_index_reads(tmp_path, fmt):
    path = write_data(tmp_path, samples=7, images=3, fmt=fmt, length=fmt == 'jsonl')
    text = path.read_text()
    samples = json.loads(text) if fmt == 'json' else [json.loads(line) for line in text.splitlines()]
    data = path.read_bytes()
    assert [json.loads(data[o:o + n]) for o, n, _ in scan(str(path))] == samples and len(samples) == 7
    assert {s['image'] for s in samples} == {f'00000/{k:09d}.jpg' for k in range(3)}
    assert all(os.path.isfile(tmp_path / 'images' / s['image']) for s in samples)
    assert all(('length' in s) == (fmt == 'jsonl') for s in samples)
    assert write_data(tmp_path, samples=7, images=3, fmt=fmt, length=fmt == 'jsonl') == path  # kept


def test_pss_of_a_process_tree():
    total, each = pss_of_tree(os.getpid())
    assert total > 0 and each[0][0] == os.getpid() and total == sum(pss for _, _, pss in each)
