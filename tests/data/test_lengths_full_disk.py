"""A cache folder on a full disk (data/lengths.py): the start-up check computes the lengths in its pass, cannot cache
them, and the length-grouped sampler's ask for them then computed every sample's length again (7 minutes more at 1M
samples on 2 cores); now they are taken from that pass."""

import errno

from tests.helpers import conv, write_jsonl
from xtuner_plugins.data import InternVLDataset, index, lengths, record_lengths, startcheck


def test_on_a_full_disk_the_lengths_are_computed_once(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', 'a' * (i + 1), image=False)}
                                              for i in range(30)])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    for module in (index, lengths, startcheck):
        monkeypatch.setattr(module, 'save_array', full)
    counted = []
    real = record_lengths.LengthSlice.add
    monkeypatch.setattr(record_lengths.LengthSlice, 'add', lambda self, *a: counted.append(1) or real(self, *a))
    ds = InternVLDataset(path, tokenizer=tiny_tokenizer, cache_dir=str(tmp_path / 'cache'))
    got = ds.length_array
    assert len(counted) == 30  # the start-up check's pass only
    assert list(got) == [abs(int(x)) for x in got] and len(set(got.tolist())) > 10
    monkeypatch.setattr(lengths, '_UNSAVED', {})  # another process: computes them itself, the same
    assert list(InternVLDataset(path, tokenizer=tiny_tokenizer, cache_dir=str(tmp_path / 'c2')).length_array) == \
        list(got)
