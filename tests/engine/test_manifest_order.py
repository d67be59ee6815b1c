"""A map-style run resumed with other ranks, another batch size, other packs or other lengths (engine/manifest.py,
written by badsamples.py): MMEngine skips as many batches as were trained, now cut otherwise, so some samples of the
epoch under way are trained twice and others not at all; the resume says so (or stops, ``on_data_change='stop'``),
naming both."""

import json
import os
import re
from types import SimpleNamespace

import pytest

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.engine import badsamples
from xtuner_plugins.engine import manifest as data_manifest
from xtuner_plugins.engine.badsamples import BadSampleHook


@pytest.fixture
def start(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)} for i in range(8)])
    ds = InternVLDataset(path, tokenizer=tiny_tokenizer, cache_dir=str(tmp_path / 'cache'))
    os.makedirs(tmp_path / 'work')

    def run(ranks, batch, resume, on_data_change='warn', seed=None):
        monkeypatch.setattr(data_manifest, 'get_dist_info', lambda: (0, ranks))
        monkeypatch.setattr(badsamples, 'get_dist_info', lambda: (0, ranks))
        sampler = SimpleNamespace(seed=seed, shuffle=True) if seed is not None else None
        runner = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=ds, batch_size=batch, sampler=sampler),
                                 iter=0, epoch=0, work_dir=str(tmp_path / 'work'), _resume=resume)
        BadSampleHook(**({} if on_data_change is None else dict(on_data_change=on_data_change))).before_train(runner)
    return run, tmp_path


def test_a_resume_with_other_ranks_or_batch_size_says_the_epoch_is_cut_otherwise(start, monkeypatch, capsys):
    run, root = start
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    run(8, 4, resume=False)
    with open(root / 'work' / 'data_manifest.json') as f:
        assert json.load(f)['order'] == {'ranks': 8, 'batch_size': 4, 'packs': None}
    run(8, 4, resume=True)
    assert said == []  # the same: an exact resume
    run(4, 4, resume=True)
    assert len(said) == 1 and 'the batches: 8 ranks x 4 samples then, 4 x 4 now: the epoch under way is cut into ' \
                               'other batches, so those skipped to resume are not the ones trained on' in said[0]
    with pytest.raises(SystemExit):
        run(4, 2, resume=True, on_data_change='stop')
    assert re.search(r'the batches: 4 ranks x 4 samples then, 4 x 2 now: .*on_data_change', capsys.readouterr().err)


def test_a_manifest_written_before_it_recorded_the_batches_resumes_without_a_word(start, monkeypatch):
    run, root = start
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    run(8, 4, resume=False)
    with open(root / 'work' / 'data_manifest.json') as f:
        older = json.load(f)
    del older['order']
    with open(root / 'work' / 'data_manifest.json', 'w') as f:
        json.dump(older, f)
    run(2, 4, resume=True)
    assert said == []


def test_the_same_samples_a_step_split_otherwise_resume_without_a_word_another_seed_does_not(start, monkeypatch,
                                                                                          capsys):
    """1 rank x 2 samples and 2 x 1 take the same samples a step (the samplers split each global batch): it was
    said to train some twice and others never. A sampler seed changed on resume drew the epoch under way in another
    order (seven samples twice, seven never) without a word."""
    run, root = start
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    run(1, 2, resume=False, seed=0)
    with open(root / 'work' / 'data_manifest.json') as f:
        assert json.load(f)['order'] == {'ranks': 1, 'batch_size': 2, 'seed': 0, 'shuffle': True, 'packs': None}
    run(2, 1, resume=True, seed=0)
    assert said == []
    run(2, 1, resume=True, seed=7)
    assert len(said) == 1 and "the sampler's seed 0 -> 7: the epoch under way is drawn in another order" in said[0]
    with pytest.raises(SystemExit):
        run(2, 1, resume=True, seed=8, on_data_change=None)   # the default
    assert re.search(r"the sampler's seed 7 -> 8: .*on_data_change", capsys.readouterr().err)


def test_a_file_rewritten_under_the_same_size_and_time_is_a_change(start, monkeypatch):
    """Lines shuffled and copied back with their size and modification time (``cp -p``, ``touch -r``): the resume
    skipped batches that now held other samples, without a word (the manifest had the size and time only)."""
    run, root = start
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    run(1, 2, resume=False)
    path = root / 'a.jsonl'
    st = os.stat(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(''.join(lines[::-1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size
    run(1, 2, resume=True)
    assert len(said) == 1 and f'{path}: content ' in said[0], said


def test_a_file_whose_modification_time_alone_changed_resumes_with_a_warning(start, monkeypatch, capsys):
    """A copy that did not keep times (its size and sampled content the same) is no change to stop for: the default
    stops for a change since it warned only, the epoch under way resumed on other samples."""
    run, root = start
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    run(1, 2, resume=False)
    path = root / 'a.jsonl'
    os.utime(path, ns=(1, 10 ** 18))
    run(1, 2, resume=True, on_data_change=None)
    assert said == [f'{path}: its modification time changed since the run being resumed started, its size and '
                    'sampled content did not: resumed on it']
    with open(path, 'a') as f:   # then a real change: the default stops, naming what changed
        f.write(json.dumps({'conversations': conv('new', 'a', image=False)}) + '\n')
    with pytest.raises(SystemExit):
        run(1, 2, resume=True, on_data_change=None)
    assert re.search(r'a.jsonl: size \d+ -> \d+, mtime_ns ', capsys.readouterr().err)


def test_the_seed_of_the_sampler_under_the_epoch_wrapper_is_read():
    """Training's sampler is the EpochSampler over the seeded one: the seed was never recorded, and a resume with
    another seed went on without a word."""
    wrapped = SimpleNamespace(sampler=SimpleNamespace(seed=42, shuffle=True), epoch=0)
    assert data_manifest.reading_order(SimpleNamespace(dataset=None, batch_size=2, sampler=wrapped)) == {
        'ranks': 1, 'batch_size': 2, 'seed': 42, 'shuffle': True, 'packs': None}


def test_sources_are_compared_by_place_a_file_named_twice_included():
    """A meta file naming one file in two entries: the manifest's sources were a dict by path, so a change to the
    first entry's repeat_time (32 items -> 80) and the entries' order (each fractional subset is seeded by its place)
    were not seen."""
    def manifest(*entries):
        return dict(sources=[dict(annotation='/d.jsonl', size=10, mtime_ns=1, repeat_time=r, samples=16, used=u)
                             for r, u in entries], total_used=sum(u for _, u in entries))
    assert data_manifest.manifest_changes(manifest((1, 16), (1, 16)), manifest((1, 16), (1, 16))) == []
    (change,) = data_manifest.manifest_changes(manifest((1, 16), (1, 16)), manifest((4, 64), (1, 16)))
    assert change == '/d.jsonl: repeat_time 1 -> 4, used 16 -> 64'
    reordered = dict(sources=[dict(annotation=p, size=1, mtime_ns=1) for p in ('/a', '/b')], total_used=2)
    swapped = dict(sources=reordered['sources'][::-1], total_used=2)
    assert data_manifest.manifest_changes(reordered, swapped) == [
        "the annotation files are named in another order or number: ['/a', '/b'] then, ['/b', '/a'] now"]


def test_the_same_data_copied_elsewhere_or_its_images_moved_resumes_with_a_warning(tmp_path, tiny_tokenizer,
                                                                                     monkeypatch, capsys):
    """A requeued job that copies its data to its own disk ($SLURM_TMPDIR) reads the same samples in the same order:
    it was stopped as 'no longer used' / 'new' and said not to resume exactly (found by a review helper)."""
    import shutil
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    monkeypatch.setattr(badsamples, 'get_dist_info', lambda: (0, 1))
    rows = [{'image': 'x.png', 'conversations': conv(f'q{i}', 'a')} for i in range(4)]
    os.makedirs(tmp_path / 'one' / 'images')
    os.makedirs(tmp_path / 'work')

    def run(folder, images, resume, hook=None):
        ds = InternVLDataset(str(folder / 'a.jsonl'), image_folders=str(images), tokenizer=None,
                             cache_dir=str(tmp_path / 'cache'))
        runner = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=ds, batch_size=2, sampler=None), iter=0,
                                 epoch=0, work_dir=str(tmp_path / 'work'), _resume=resume)
        (hook or BadSampleHook()).before_train(runner)

    write_jsonl(tmp_path / 'one' / 'a.jsonl', rows)
    write_image(tmp_path / 'one' / 'images' / 'x.png')
    run(tmp_path / 'one', tmp_path / 'one' / 'images', resume=False)
    shutil.copytree(tmp_path / 'one', tmp_path / 'two')
    run(tmp_path / 'two', tmp_path / 'two' / 'images', resume=True)
    assert said == [f'{tmp_path}/two/a.jsonl: moved from {tmp_path}/one/a.jsonl, its '
                    f'image folder is {tmp_path}/two/images (was {tmp_path}/one/images; the images are not compared) '
                    f'since the run being resumed started, its size and sampled content did not: resumed on it']
    with open(tmp_path / 'two' / 'a.jsonl', 'a') as f:   # then its content changes: stopped, naming what changed
        f.write(json.dumps(rows[0]) + '\n')
    with pytest.raises(SystemExit):
        run(tmp_path / 'two', tmp_path / 'two' / 'images', resume=True)
    assert f'{tmp_path}/two/a.jsonl: size ' in capsys.readouterr().err


def test_a_streams_changed_data_is_said_not_stopped_here(tmp_path, monkeypatch):
    """Online packing and shards resume by their stream's state (streamstate.py), whose refusal names
    on_data_change=restart: with it, this check stopped the resume a second time (found by a review helper)."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __init__(self, inner):
            self.dataset, self.sources, self.load_problems = inner, inner.sources, inner.load_problems
            self._source_ranges, self.items_per_source = inner._source_ranges, inner.items_per_source

        def __iter__(self):
            return iter(())

        def __len__(self):
            return len(self.dataset)

    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)} for i in range(4)])
    os.makedirs(tmp_path / 'work')
    for resume in (False, True):
        if resume:
            with open(path, 'a') as f:
                f.write(json.dumps({'conversations': conv('new', 'a', image=False)}) + '\n')
        stream = Stream(InternVLDataset(path, tokenizer=None, cache_dir=str(tmp_path / 'cache')))
        runner = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=stream, batch_size=1), iter=0, epoch=0,
                                 work_dir=str(tmp_path / 'work'), _resume=resume)
        BadSampleHook().before_train(runner)
    assert len(said) == 1 and 'the data changed since the run being resumed started' in said[0] \
        and said[0].endswith("(a stream: its resume is the data stream state's to judge)")


def test_a_resume_packed_otherwise_or_ordered_by_other_lengths_says_so(tmp_path, tiny_tokenizer, monkeypatch,
                                                                       capsys):
    """An offline-packed run resumed with another max_tokens (8 packs then, 16 now) skipped the first 4 of the new
    packs, not the samples trained on, without a word; so did a length-grouped run whose lengths changed
    (max_length, the images): its epoch is drawn in another order."""
    from xtuner_plugins.data.packing import PackedInternVLDataset
    from xtuner_plugins.data.sampler import LengthGroupedSampler
    rows = [{'conversations': conv(f'q{i}', 'a ' * (i + 1), image=False)} for i in range(8)]
    path = write_jsonl(tmp_path / 'a.jsonl', rows)
    os.makedirs(tmp_path / 'work')
    said = []
    monkeypatch.setattr(badsamples, 'print_log', lambda msg, **kw: said.append(msg))

    def run(resume, max_tokens=None, max_length=4096, on_data_change='warn'):
        ds = InternVLDataset(path, tokenizer=tiny_tokenizer, cache_dir=str(tmp_path / 'cache'),
                             max_length=max_length)
        ds = PackedInternVLDataset(ds, max_tokens=max_tokens) if max_tokens else ds
        sampler = LengthGroupedSampler(ds, per_device_batch_size=1, seed=3)
        runner = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=ds, batch_size=1, sampler=sampler),
                                 iter=0, epoch=0, work_dir=str(tmp_path / 'work'), _resume=resume)
        BadSampleHook(on_data_change=on_data_change).before_train(runner)
        return ds

    lengths = run(False, max_tokens=None).length
    packed = run(False, max_tokens=2 * max(lengths))
    run(True, max_tokens=2 * max(lengths))
    assert said == []
    run(True, max_tokens=max(lengths))
    count = len(packed.packs)
    assert len(said) == 1 and said[0].startswith('the data changed since the run being resumed started') and (
        f'the packs: {count} then, 8 now (max_tokens {2 * max(lengths)} -> {max(lengths)}), packed otherwise: the '
        'epoch under way is cut into other packs' in said[0]), said
    with pytest.raises(SystemExit):
        run(True, max_tokens=2 * max(lengths), on_data_change='stop')   # (the warned resume's manifest: 8)
    assert 'the packs:' in capsys.readouterr().err
    said.clear()
    run(False)
    run(True, max_length=min(lengths) + 1)   # the longer samples cut to fit: other lengths, another order
    assert len(said) == 1 and "the lengths the samples are ordered by (a length-grouped sampler's) changed: " \
                              "another max_length" in said[0], said
    said.clear()
    run(True, max_tokens=2 * max(lengths))   # packed now, not then
    assert len(said) == 1 and f'the samples were not packed then, packed now ({count} packs): the epoch under way ' \
                              'is cut otherwise' in said[0], said


def test_a_checkpoint_saved_elsewhere_is_checked_against_its_work_folders_manifest(tmp_path):
    """default_hooks.checkpoint.out_dir puts the checkpoints away from the work folder: --resume of one into another
    work folder looked for the manifest beside it, found none and resumed on other batches unchecked (a sweep)."""
    import torch
    work, out = tmp_path / 'work', tmp_path / 'out' / 'work'
    os.makedirs(work), os.makedirs(out)
    (work / 'data_manifest.json').write_text('{}')
    checkpoint = str(out / 'iter_2.pth')
    torch.save({'meta': {'cfg': f"work_dir = {str(work)!r}\n"}, 'state_dict': {}}, checkpoint)
    runner = SimpleNamespace(work_dir=str(tmp_path / 'elsewhere'), _resume=True, _load_from=checkpoint)
    assert data_manifest.resumed_folder(runner) == str(work)   # the folder the checkpoint's run worked in
    (out / 'data_manifest.json').write_text('{}')
    assert data_manifest.resumed_folder(runner) == str(out)    # beside it, where the run's lists are
    os.remove(out / 'data_manifest.json')
    torch.save({'meta': {'cfg': "work_dir = '/gone'\n"}, 'state_dict': {}}, checkpoint)
    assert data_manifest.resumed_folder(runner) == str(out)    # its recorded folder gone: beside it
    assert data_manifest.resumed_folder(SimpleNamespace(work_dir='w', _resume=False, _load_from=checkpoint)) == 'w'


def test_a_manifest_of_another_shape_is_not_taken_for_a_runs(tmp_path):
    """A data_manifest.json whose sources are not the entries a run writes (a hand edit gone wrong, another
    program's file of that name): a resume stopped in BadSampleHook with "TypeError: 'int' object is not
    subscriptable" after a traceback (seen with {"sources": [1, 2]} through tools/train.py). It reads as no run's
    manifest now (the hook says so in one warning and goes on), as a file that is no JSON did."""
    path = str(tmp_path / 'data_manifest.json')
    written = dict(sources=[dict(annotation='/d/a.jsonl', size=3)], total_used=1, order=dict(ranks=1, batch_size=2))
    for shape in (dict(sources=[1, 2]), dict(sources=[dict(size=3)]), dict(sources=[dict(annotation=5)]),
                  dict(written, order=5), dict(written, order=dict(ranks='1', batch_size=2))):
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(shape, f)
        assert data_manifest.read_manifest(path) is False, shape
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(written, f)
    assert data_manifest.read_manifest(path) == written
