"""The start-up check and the lengths, once per node over a pool of processes and cached: the same records,
problems (FILE:LINE) and lengths as one process, the lengths those of the items themselves, nothing checked per
sample on a warm start, no Python object held per sample, and ranks x workers reading each sample once."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

from tests.data.test_dataset import S, make_ds
from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import internvl_collate_fn, nodepass, startcheck


@pytest.fixture
def data(tmp_path):
    """A jsonl of 60 lines: image and text-only samples, a blank line, bad JSON, a list, a tag mismatch and a
    missing image, and a json list of 12 (one not an object)."""
    img = tmp_path / 'images'
    for k in range(3):
        write_image(img / f'{k}.png', size=(28 + 28 * k, 28), seed=k)
    rows = []
    for i in range(60):
        if i % 4 == 0:
            rows.append({'conversations': conv(f'q{i}', 'a' * (i % 7 + 1), image=False)})
        else:
            rows.append({'image': f'{i % 3}.png', 'conversations': conv(f'question {i}', 'answer ' * (i % 5 + 1))})
    rows[7], rows[19], rows[33] = '{not json', '[1, 2]', {
        'image': '0.png', 'conversations': conv('<image> twice', image=True)}
    rows[41] = {'image': 'gone.png', 'conversations': conv()}
    rows.insert(50, '')
    lines = write_jsonl(tmp_path / 'a.jsonl', rows)
    items = [{'image': f'{k % 3}.png', 'conversations': conv(f'item {k}')} for k in range(12)]
    items[5] = 'not an object'
    (tmp_path / 'b.json').write_text(json.dumps(items))
    return [lines, str(tmp_path / 'b.json')], str(img)


def summary(ds):
    return dict(lines=[(r.source, r.line) for r in ds.records], index=ds._index.tolist(),
                problems=[str(p) for p in ds.load_problems], length=ds.modality_length,
                tiles=ds.num_tiles_per_item)


def test_a_pool_gives_what_one_process_gives_and_the_lengths_are_the_items(data, tiny_tokenizer, tmp_path,
                                                                          monkeypatch):
    files, img = data
    kw = dict(image_folders=img, repeat_times=[1.5, 2], max_dynamic_patch=4, max_bad_fraction=0.5)
    one = summary(make_ds(files, tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / 'one'), workers=1, **kw))
    monkeypatch.setattr(nodepass, 'MIN_SLICE', 1)
    pooled = make_ds(files, tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / 'pool'), workers=2, **kw)
    assert summary(pooled) == one
    assert [p.split(': ')[0] for p in one['problems']] == [f'{files[0]}:8', f'{files[0]}:20', f'{files[0]}:34',
                                                           f'{files[1]}:6']
    items = [pooled[i] for i in range(len(pooled))]
    assert {reason for x in items for _, reason in x['skipped']} == {'missing_image'}, [x['skipped'] for x in items]
    good = [i for i, x in enumerate(items) if not x['skipped']]
    assert [abs(one['length'][i]) for i in good] == [len(items[i]['input_ids']) for i in good]
    assert [one['length'][i] < 0 for i in good] == [not bool(items[i]['image_flags'][0]) for i in good]
    assert [one['tiles'][i] for i in good] == [items[i]['num_tiles'] for i in good]


def test_a_warm_start_checks_no_sample_and_says_the_same(data, tiny_tokenizer, tmp_path, monkeypatch):
    files, img = data
    logs = []
    monkeypatch.setattr('xtuner_plugins.data.dataset.print_log', lambda msg, **kw: logs.append(msg))
    cold = make_ds(files, tiny_tokenizer, tmp_path, image_folders=img, max_bad_fraction=0.5)
    cold_summary, cold_logs = summary(cold), list(logs)
    assert any('1 of 42 samples name images not found' in m for m in cold_logs), cold_logs
    logs.clear()
    monkeypatch.setattr(startcheck, '_check_slice', lambda *a: pytest.fail('a warm start checked samples'))
    monkeypatch.setattr('xtuner_plugins.data.lengths.length_slice', lambda *a: pytest.fail('lengths recomputed'))
    warm = make_ds(files, tiny_tokenizer, tmp_path, image_folders=img, max_bad_fraction=0.5)
    assert summary(warm) == cold_summary and logs == cold_logs


def test_a_check_cached_by_an_earlier_version_is_done_again(data, tiny_tokenizer, tmp_path, monkeypatch):
    """A verdict the check's rules have changed since (``CHECK_VERSION``; 2: the stop word's label with SentencePiece
    ``legacy=False``) is not read from the cache: a skip it counted then is checked again."""
    files, img = data
    make_ds(files, tiny_tokenizer, tmp_path, image_folders=img, max_bad_fraction=0.5)
    cache = tmp_path / 'cache'
    summaries = [os.path.join(cache, n) for n in os.listdir(cache) if n.endswith('.check.json')]
    assert len(summaries) == 2
    for path in summaries:
        with open(path) as f:
            written = json.load(f)
        assert written['version'] == startcheck.CHECK_VERSION
        with open(path, 'w') as f:
            json.dump(dict(written, version=startcheck.CHECK_VERSION - 1), f)
    checked = []
    real = startcheck._check_slice
    monkeypatch.setattr(startcheck, '_check_slice', lambda *a, **kw: checked.append(a[3]) or real(*a, **kw))
    make_ds(files, tiny_tokenizer, tmp_path, image_folders=img, max_bad_fraction=0.5)
    assert len(checked) >= 2, checked


def test_no_python_object_per_sample(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', image=False)} for i in range(500)])
    ds = make_ds(path, tiny_tokenizer, tmp_path, repeat_times=2.5)
    ds.length
    sizes = {k: len(v) for k, v in vars(ds).items() if isinstance(v, (list, dict, tuple, set))}
    assert max(sizes.values()) < 50, sizes
    assert all(isinstance(g.base, np.memmap) for g in ds.records.good)
    assert isinstance(ds._index, np.ndarray) and len(ds) == 1250


def test_a_length_field_is_used_when_asked_for(tmp_path, tiny_tokenizer):
    write_image(tmp_path / 'i' / 'a.png', size=(S, S))
    rows = [{'image': 'a.png', 'length': 777, 'conversations': conv()},
            {'length': 5, 'conversations': conv(image=False)},
            {'conversations': conv(image=False)}]                      # none: counted
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    exact = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'))
    given = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), length_field='length')
    assert given.modality_length[:2] == [777, -5] and given.length[2] == exact.length[2]
    assert exact.length[:2] == [len(exact[0]['input_ids']), len(exact[1]['input_ids'])]


def test_a_length_field_past_what_a_length_holds_is_counted_instead(tmp_path, tiny_tokenizer):
    """With no max_length to cap it, a length field of 10**20 (no length: a sum gone wrong, a byte count) stopped
    the start-up check with 'OverflowError: int too big to convert'; it is counted, as a field that is no count."""
    write_image(tmp_path / 'i' / 'a.png', size=(S, S))
    rows = [{'image': 'a.png', 'length': 10 ** 20, 'conversations': conv()},
            {'length': 2 ** 63, 'conversations': conv(image=False)}, {'length': 9, 'conversations': conv(image=False)}]
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    exact = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_length=None)
    given = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(tmp_path / 'i'), max_length=None,
                    length_field='length')
    assert given.modality_length == exact.modality_length[:2] + [-9]


def test_many_annotation_files_fit_under_a_low_limit_of_open_files(tmp_path, tiny_tokenizer, monkeypatch):
    """Each annotation file keeps a few files open (its own, its index's and its check's mapped arrays): a meta file
    of 400 files under the usual soft limit of 1024 stopped with 'OSError: [Errno 24] Too many open files' in a
    traceback. The soft limit is raised as far as the hard one allows; past that, refused in one line."""
    import resource
    from xtuner_plugins.errors import Refused
    meta = {}
    for i in range(120):
        meta[f'e{i}'] = {'annotation': write_jsonl(tmp_path / f'f{i}.jsonl', [{'conversations': conv(
            f'q{i}', 'a', image=False)}]), 'repeat_time': 1}
    (tmp_path / 'meta.json').write_text(json.dumps(meta))
    was = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir('/proc/self/fd')) + 120
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, was[1]))
        ds = make_ds(str(tmp_path / 'meta.json'), tiny_tokenizer, tmp_path)
        assert len(ds) == 120 and len(ds.length) == 120
        with monkeypatch.context() as m, pytest.raises(Refused, match=r'^120 annotation files keep about \d+ files '
                                                                     r'open, and this process may open \d+ \(ulimit '
                                                                     r'-Hn\): .*ulimit -n'):
            m.setattr(resource, 'getrlimit', lambda what: (low, low))   # (a hard limit lowered is not raised again)
            make_ds(str(tmp_path / 'meta.json'), tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / 'other'))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, was)


def test_ranks_and_workers_read_each_sample_once(data, tiny_tokenizer, tmp_path):
    from torch.utils.data import DataLoader, DistributedSampler
    files, img = data
    ds = make_ds(files[1], tiny_tokenizer, tmp_path, image_folders=img, max_bad_fraction=0.5)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=2, num_workers=2, sampler=sampler, collate_fn=internvl_collate_fn)
        for batch in loader:
            seen.extend(batch['data']['samples'])
    assert set(seen) == {f'{files[1]}:{n}' for n in range(1, 13) if n != 6} and len(seen) == 12  # 1 padding
    assert torch.utils.data.get_worker_info() is None


@pytest.mark.parametrize('repeat, items, distinct', [(2.5, 25, 10), (0.3, 3, 3), (1, 10, 10)])
def test_distinct_samples_count_each_repeated_sample_once(tmp_path, tiny_tokenizer, repeat, items, distinct):
    """max_bad_fraction is a fraction of the distinct samples: repeats count once."""
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', image=False)} for i in range(10)])
    ds = make_ds(path, tiny_tokenizer, tmp_path, repeat_times=repeat)
    assert (len(ds), ds.num_distinct) == (items, distinct)


def test_the_check_pass_computes_the_lengths_reading_each_image_header_once(data, tiny_tokenizer, tmp_path,
                                                                           monkeypatch):
    """One pass over the samples, not two: the start-up check (pooled or not) leaves the length cache, equal to
    the lengths' own pass, and each distinct image's header is read once in a slice (the samples share images)."""
    from xtuner_plugins.data import lengths, record_lengths
    from xtuner_plugins.data.dataset import InternVLDataset
    files, img = data
    kw = dict(image_folders=img, max_dynamic_patch=4, max_bad_fraction=0.5, workers=1)
    monkeypatch.setattr(InternVLDataset, 'lengths_with_check', False)
    apart = make_ds(files, tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / 'apart'), **kw)
    want = apart._record_stats().tolist()
    monkeypatch.undo()
    reads = []
    real = record_lengths.read_image_size
    monkeypatch.setattr(record_lengths, 'read_image_size', lambda path, *a: reads.append(path) or real(path, *a))
    monkeypatch.setattr(lengths, 'length_slice', lambda *a: pytest.fail('a second pass for the lengths'))
    for workers in (1, 2):
        reads.clear()
        monkeypatch.setattr(nodepass, 'MIN_SLICE', 1 if workers == 2 else nodepass.MIN_SLICE)
        one = make_ds(files, tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / f'with{workers}'),
                      **dict(kw, workers=workers))
        assert one._record_stats().tolist() == want
    reads.clear()
    make_ds(files, tiny_tokenizer, tmp_path, cache_dir=str(tmp_path / 'again'), **kw)
    counts = Counter(os.path.basename(p) for p in reads)  # per file: 0, 1, 2.png and the missing gone.png; 0-2
    assert counts == {'0.png': 2, '1.png': 2, '2.png': 2, 'gone.png': 1}, counts  # again in b.json


def test_a_warm_start_reads_no_index_page_to_match_the_length_cache(data, tiny_tokenizer, tmp_path, monkeypatch):
    """The length cache is matched to its records by a digest of their lines: the start-up check records it, so a
    warm start does not read every line of the index for it (384 MB of pages at 16M samples); a view that is not
    one whole source still computes it."""
    from xtuner_plugins.data import lengths
    from xtuner_plugins.data.records import RecordView
    files, img = data
    kw = dict(image_folders=img, max_dynamic_patch=4, max_bad_fraction=0.5)
    cold = make_ds(files, tiny_tokenizer, tmp_path, **kw)._record_stats().tolist()
    lines = RecordView.lines
    monkeypatch.setattr(RecordView, 'lines', lambda self: pytest.fail('the index read for the digest'))
    warm = make_ds(files, tiny_tokenizer, tmp_path, **kw)
    assert warm._record_stats().tolist() == cold
    monkeypatch.setattr(RecordView, 'lines', lines)
    part = warm.records.part(range(1, 5))
    assert part.lines_digest() is None and lengths._lines_digest(part) == lengths.lines_digest(part.lines())
    whole = warm.records.part(warm._source_ranges[1])
    assert whole.lines_digest() == lengths.lines_digest(whole.lines())
    # a check cache from before the digest was kept gets it on its first warm start
    for name in os.listdir(tmp_path / 'cache'):
        if name.endswith('.check.json'):
            summary = json.loads((tmp_path / 'cache' / name).read_text())
            del summary['lines']
            (tmp_path / 'cache' / name).write_text(json.dumps(summary))
    assert make_ds(files, tiny_tokenizer, tmp_path, **kw)._record_stats().tolist() == cold
    assert all('lines' in json.loads((tmp_path / 'cache' / n).read_text())
               for n in os.listdir(tmp_path / 'cache') if n.endswith('.check.json'))


def test_a_repeat_time_past_half_the_memory_is_one_line(tmp_path, monkeypatch):
    """3e8 on 10 lines (3e9 items) stayed under the 2**32 guard and asked numpy for 22 GiB: a MemoryError."""
    from xtuner_plugins.data import InternVLDataset
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}] * 10)
    monkeypatch.setattr(os, 'sysconf', lambda name: {'SC_PAGE_SIZE': 4096, 'SC_PHYS_PAGES': 6 * 2 ** 30 // 4096}[name])
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    for name in ('SLURM_NTASKS_PER_NODE', 'SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
        monkeypatch.delenv(name, raising=False)
    assert startcheck.max_items() == (6 * 2 ** 30 // 48, ": half of this machine's 6.0 GiB of memory for 3 copies "
                                                         "while it is built")
    with pytest.raises(ValueError, match=r"repeat_time 3e\+08 makes its 10 samples 3e\+09 items, more than a data "
                                         r"set indexes \(134217728, 8 bytes each: half of this machine's 6.0 GiB"):
        InternVLDataset(path, repeat_times=3e8, tokenizer=None, cache_dir=str(tmp_path / 'cache'))
    # a source's index is built in every rank of the node (1e7 on 10 lines peaked at 2.9 GB, 3 times its size)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert startcheck.max_items() == (6 * 2 ** 30 // (48 * 8), ": half of this machine's 6.0 GiB of memory for 3 "
                                                               "copies while it is built, on each of the node's 8 "
                                                               "ranks")
    with pytest.raises(ValueError, match=r'makes its 10 samples 2e\+08 items, more than a data set indexes'):
        InternVLDataset(path, repeat_times=2e7, tokenizer=None, cache_dir=str(tmp_path / 'cache'))
    assert len(InternVLDataset(path, repeat_times=2.5, tokenizer=None, cache_dir=str(tmp_path / 'cache'))) == 25
    # srun -n 8 sets no SLURM_NTASKS_PER_NODE (a helper's reading: the bound was 8 times too generous there)
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.setenv('SLURM_STEP_TASKS_PER_NODE', '8')
    assert startcheck.max_items()[0] == 6 * 2 ** 30 // (48 * 8)


def test_images_put_in_a_folder_found_empty_are_checked_again(tmp_path, tiny_tokenizer):
    """The cached start-up check kept 'none of the images found' after the images were put there (a folder still
    being extracted): the data set was refused again until the cache was removed."""
    from xtuner_plugins.data import InternVLDataset
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': f'{k}.png', 'conversations': conv()} for k in range(4)])
    (tmp_path / 'images').mkdir()
    settings = dict(image_folders=str(tmp_path / 'images'), tokenizer=tiny_tokenizer, image_size=S,
                    cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(ValueError, match='4 of 4 samples name images not found'):
        InternVLDataset(path, **settings)
    for k in range(4):
        write_image(tmp_path / 'images' / f'{k}.png', size=(40, 30), seed=k)
    ds = InternVLDataset(path, **settings)
    assert len(ds) == 4 and ds[0]['pixel_values'].shape[0] >= 1


def test_an_image_refused_as_a_link_out_of_its_folder_is_looked_at_again(tmp_path, tiny_tokenizer):
    """A link to a file outside the image folder, then the file itself put in its place: the cached check kept
    'unsafe_image_path: ... is a symbolic link to ...', so the fixed sample was dropped for a reason no longer true,
    by training, check_dataset and shard_dataset alike, until the cache was removed. A link re-pointed the same."""
    from xtuner_plugins.data import InternVLDataset
    (tmp_path / 'images').mkdir()
    (tmp_path / 'outside').mkdir()
    outside = write_image(tmp_path / 'outside' / 'o.png', size=(40, 30), seed=1)
    write_image(tmp_path / 'images' / 'ok.png', size=(40, 30), seed=2)
    link = tmp_path / 'images' / 'l.png'
    os.symlink(outside, link)
    path = write_jsonl(tmp_path / 'a.jsonl', [{'image': name, 'conversations': conv()} for name in ('l.png', 'ok.png')])
    settings = dict(image_folders=str(tmp_path / 'images'), tokenizer=tiny_tokenizer, image_size=S,
                    cache_dir=str(tmp_path / 'cache'), max_bad_fraction=1)
    first = InternVLDataset(path, **settings)
    assert len(first) == 1 and [p.reason for p in first.load_problems] == ['unsafe_image_path']
    assert len(InternVLDataset(path, **settings)) == 1   # warm, nothing changed: still refused
    os.remove(link)
    write_image(link, size=(40, 30), seed=1)   # the user puts the file itself there
    fixed = InternVLDataset(path, **settings)
    assert len(fixed) == 2 and not fixed.load_problems


@pytest.mark.parametrize('repeat', [1e12, 1e300])
def test_a_repeat_time_past_what_can_be_indexed_is_one_line_before_the_check(tmp_path, repeat, monkeypatch):
    """1e12 asked np.tile for 21.8 TiB (MemoryError), 1e300 overflowed a C long: a raw traceback either way."""
    from xtuner_plugins.data import InternVLDataset
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}] * 3)
    monkeypatch.setattr(startcheck, 'check_source', lambda *a: pytest.fail('checked before the repeat was'))
    says = (f'a.jsonl: repeat_time {repeat:g} makes its 3 samples {3 * repeat:.4g} items, more than a data set '
            f'indexes ({startcheck.max_items()[0]}, 8 bytes each')
    with pytest.raises(ValueError, match=re.escape(says)):
        InternVLDataset(path, repeat_times=repeat, tokenizer=None, cache_dir=str(tmp_path / 'cache'))


def test_samples_refused_at_start_up_are_kept_in_little_memory(tmp_path):
    """Every rank and DataLoader worker holds them: as SampleErrors, 772 bytes a problem (a data set of 20,000
    refused samples, warm start), about 224 as columns of text."""
    import gc
    import tracemalloc

    from xtuner_plugins.data import InternVLDataset
    bad = {'image': 'x.png', 'conversations': conv('<image> <image> q', 'a', image=False)}
    path = write_jsonl(tmp_path / 'a.jsonl', [bad] * 20000 + [{'conversations': conv(image=False)}])
    settings = dict(tokenizer=None, cache_dir=str(tmp_path / 'cache'), max_bad_fraction=1.0)
    InternVLDataset(path, **settings)   # the cache
    gc.collect()
    tracemalloc.start()
    try:
        ds = InternVLDataset(path, **settings)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(ds.load_problems) == 20000 and held / 20000 < 400, held / 20000
    first = ds.load_problems[0]
    assert (first.reason, first.source) == ('image_tag_mismatch', f'{path}:1')
    assert ds.load_problems.reasons() == {'image_tag_mismatch': 20000}
    assert [p.source for p in ds.load_problems[-2:]] == [f'{path}:19999', f'{path}:20000']
    assert ds.load_problems[5] in ds.load_problems and ds.load_problems.index(ds.load_problems[5]) == 5
    assert 'x' not in ds.load_problems and repr(ds.load_problems) == \
        "ProblemList(20000 problems: {'image_tag_mismatch': 20000})"



def test_data_of_the_other_kind_is_refused_in_one_line_saying_so(tmp_path, tiny_tokenizer):
    """An SFT file given to a preference config was 'ValueError: no samples to train on ... no chosen and no
    rejected answer' after a traceback; pairs given to an SFT config the same. Now a Refused (train: refused:, one
    line) that says which kind the data looks like and which config reads it."""
    from tests.data.test_preference import make
    from xtuner_plugins.errors import Refused
    (tmp_path / 'i').mkdir()
    sft = write_jsonl(tmp_path / 'sft.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)} for i in range(3)])
    with pytest.raises(Refused, match=r'no samples to train on in .*sft.jsonl .*sft.jsonl:1: no chosen and no '
                                      r'rejected answer.*looks like SFT data .* given to a preference config: train '
                                      r'it with an SFT config \(finetune_\*.py\)'):
        make(sft, tiny_tokenizer, tmp_path)
    pairs = write_jsonl(tmp_path / 'pairs.jsonl', [{'question': 'Q?', 'chosen': 'A', 'rejected': 'B'}] * 3)
    with pytest.raises(Refused, match=r'pairs.jsonl:1: .*it is a preference pair.*looks like preference pairs '
                                      r'given to an SFT config: train them with a preference config'):
        make_ds(pairs, tiny_tokenizer, tmp_path)
    mixed = write_jsonl(tmp_path / 'mixed.jsonl', [{'conversations': conv('q', 'a', image=False)}, '{bad json'])
    with pytest.raises(Refused) as info:   # other problems too: no guess
        make(mixed, tiny_tokenizer, tmp_path)
    assert 'looks like' not in str(info.value)
