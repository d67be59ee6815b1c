"""The length cache: keyed by what its numbers are of."""

import os

from tests.data.test_dataset import make_ds
from tests.helpers import conv, write_jsonl


def test_a_file_written_back_under_the_same_size_and_time_gets_its_own_lengths(tmp_path, tiny_tokenizer):
    """A shuffled file copied over with ``cp -p`` (the same size and modification time): the lengths are the new
    lines', not the cached ones of the lines that stood there before."""
    rows = [{'conversations': conv(f'q{i}', 'word ' * (1 + 6 * (i % 2)), image=False)} for i in range(6)]
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    before = make_ds(path, tiny_tokenizer, tmp_path).length
    st = os.stat(path)
    write_jsonl(path, rows[::-1])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = make_ds(path, tiny_tokenizer, tmp_path)
    assert ds.length == before[::-1] == [len(ds[i]['input_ids']) for i in range(len(ds))]


def test_the_suite_caches_in_its_own_temporary_folder(tmp_path_factory):
    """The tests' caches go to the session's temporary folder (``tests/conftest.py``): a run of the suite left
    about 2,000 files in ``~/.cache/xtuner_plugins`` for the tests' own annotation files, for good."""
    from pathlib import Path

    from xtuner_plugins.data.lengths import default_cache_dir
    assert Path(default_cache_dir()).is_relative_to(tmp_path_factory.getbasetemp()), default_cache_dir()
