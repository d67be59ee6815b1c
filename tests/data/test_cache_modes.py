"""Cache files get a plain file's mode (0o666 less the umask): written through mkstemp they were 0600, so the others
of a group sharing a cache folder could not read them, rebuilt them (a cold start each time) and replaced them with
files the first could not read; the lock files could not be opened by them either."""

import os
import stat

import pytest

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset


@pytest.fixture
def umask_002():
    before = os.umask(0o002)  # a group-shared folder's usual umask
    yield
    os.umask(before)


def test_every_cache_file_can_be_read_and_locked_by_the_group(tmp_path, tiny_tokenizer, umask_002):
    write_image(tmp_path / 'i' / '0.png', size=(56, 28))
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': '0.png', 'conversations': conv(answer=f'a{i}')}
                                              for i in range(5)])
    ds = InternVLDataset(path, image_folders=str(tmp_path / 'i'), tokenizer=tiny_tokenizer, image_size=28,
                         cache_dir=str(tmp_path / 'cache'))
    assert len(ds.length_array) == 5
    modes = {name: stat.S_IMODE(os.stat(tmp_path / 'cache' / name).st_mode) for name in os.listdir(tmp_path / 'cache')}
    assert {name.rsplit('.', 2)[-2] + '.' + name.rsplit('.', 1)[-1] for name in modes if not name.endswith('.lock')} \
        >= {'lengths.npy', 'good.npy', 'check.json', 'images.json'}
    assert set(modes.values()) == {0o664}, modes
