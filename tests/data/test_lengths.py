"""The length cache: keyed by what its numbers are of."""

import os

import numpy as np
import pytest

from tests.data.test_dataset import S, make_ds
from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data.errors import SampleError


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


def test_an_image_made_a_link_out_of_its_folder_after_the_cache_keeps_the_start_going(tmp_path, tiny_tokenizer):
    """An image replaced by a link to another file outside its folder since the caches were written: its sample's
    length is computed again (its image changed), from a start-up check read from the cache, which looked at no
    sample; the link's refusal stopped the start with a SampleError traceback. The sample is skipped when loaded
    (unsafe_image_path), and its length is the one it would have: when the link goes, it is computed again."""
    folder = tmp_path / 'images'
    for i in range(2):
        write_image(folder / f'{i}.png', size=(S, S), seed=i)
    write_image(tmp_path / 'elsewhere' / 'wide.png', size=(4 * S, S), seed=5)
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': f'{i}.png', 'conversations': conv()} for i in range(2)])
    first = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder)).length
    os.remove(folder / '1.png')
    os.symlink(tmp_path / 'elsewhere' / 'wide.png', folder / '1.png')
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder))
    assert ds.length[0] == first[0] and ds.length[1] > first[1]   # the wide image's tiles
    with pytest.raises(SampleError, match='unsafe_image_path|symbolic link'):
        ds.load_sample(ds.record_at(1))
    assert not ds.allow_links_outside


def test_a_raised_pixel_limit_gets_its_own_lengths(tmp_path, tiny_tokenizer):
    """An image over max_image_pixels counts no tiles in its sample's length (it is skipped when loaded); a run
    that raises the limit for it loads it with its tiles, and its lengths were the cached ones of the lower limit
    (0 tiles: offline packing planned its packs' tiles and tokens by them)."""
    write_image(tmp_path / 'images' / 'a.png', size=(4 * S, S))
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': 'a.png', 'conversations': conv()}])
    low = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'images'), max_image_pixels=S * S)
    assert low.num_tiles_per_item == [0]
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'images'), max_image_pixels=None)
    item = ds[0]
    assert ds.length == [len(item['input_ids'])] and ds.num_tiles_per_item == [item['pixel_values'].shape[0]] != [0]


def test_the_suite_caches_in_its_own_temporary_folder(tmp_path_factory):
    """The tests' caches go to the session's temporary folder (``tests/conftest.py``): a run of the suite left
    about 2,000 files in ``~/.cache/xtuner_plugins`` for the tests' own annotation files, for good."""
    from pathlib import Path

    from xtuner_plugins.data.lengths import default_cache_dir
    assert Path(default_cache_dir()).is_relative_to(tmp_path_factory.getbasetemp()), default_cache_dir()


def test_a_tokenizer_changed_in_its_folder_gets_its_own_lengths(tmp_path, tiny_tokenizer):
    """The cache was keyed by the tokenizer's path and vocabulary size: merges cut to a twentieth in the same folder
    kept both, and every cached length was the old tokenizer's (packs 41 % over max_tokens, a helper's sweep). What
    the tokenizer does is the key now; the same tokenizer from another folder shares the cache."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from tests.data.test_dataset import cache_keys
    folder = tmp_path / 'llm'
    tiny_tokenizer.save_pretrained(folder)
    rows = [{'conversations': conv(f'question {i} about the weather', 'sunny and warm today ' * (1 + i % 3),
                                   image=False)} for i in range(6)]
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    before = make_ds(path, AutoTokenizer.from_pretrained(folder), tmp_path).length
    shutil.copytree(folder, tmp_path / 'elsewhere')   # the same tokenizer: the same cache
    make_ds(path, AutoTokenizer.from_pretrained(tmp_path / 'elsewhere'), tmp_path)
    assert len(cache_keys(tmp_path / 'cache')) == 1
    data = json.loads((folder / 'tokenizer.json').read_text())
    data['model']['merges'] = data['model']['merges'][:len(data['model']['merges']) // 20]
    (folder / 'tokenizer.json').write_text(json.dumps(data))
    changed = AutoTokenizer.from_pretrained(folder)
    assert len(changed) == len(tiny_tokenizer)
    ds = make_ds(path, changed, tmp_path)
    assert ds.length == [len(ds[i]['input_ids']) for i in range(len(ds))] and ds.length != before


@pytest.mark.parametrize('suffix, damage', [
    ('.good.npy', lambda a: np.where(np.arange(len(a)) == 1, 10 ** 9, a)),   # a record number past the file
    ('.good.npy', lambda a: a[::-1].copy()),                                 # out of order
    ('.lengths.npy', lambda a: a[:, 0].copy())])                             # 1-D
def test_a_cache_edited_in_place_is_computed_again(tmp_path, tiny_tokenizer, suffix, damage):
    """A cache file of the right length with other contents (edited, or from a broken disk) was used as it was: an
    IndexError traceback (a record number past the file, a 1-D lengths file) or wrong lengths (a helper's sweep)."""
    from tests.data.test_dataset import cache_keys
    rows = [{'conversations': conv(f'q{i}', 'word ' * (1 + i), image=False)} for i in range(5)]
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    before = make_ds(path, tiny_tokenizer, tmp_path).length
    (key,) = cache_keys(tmp_path / 'cache')
    file = tmp_path / 'cache' / (key + suffix)
    np.save(file, damage(np.load(file)))
    ds = make_ds(path, tiny_tokenizer, tmp_path)
    assert ds.length == before == [len(ds[i]['input_ids']) for i in range(len(ds))]
