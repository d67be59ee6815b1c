"""Training from WebDataset tar shards (written by ``tools/shard_dataset.py``), for data that outgrows one
annotation file.

**The format.** A shard set is a folder: ``shard-000000.tar``, ``shard-000001.tar``, ... and ``shards.json``
(written last: a folder without it is refused as incomplete). Each tar holds samples as WebDataset lays them out,
the files of one sample one after another under one key (``000000042.json``, ``000000042.img0.jpg``, ...): the
``json`` is ``{"sample": the annotation's sample, "source": k, "line": L, "images": [the image files' names]}``,
each image the original file's bytes. ``shards.json`` lists the shards with their sample counts and the sources
(``annotation``, ``max_dynamic_patch``): a sample is named ``FILE:LINE`` of the annotation it came from, as
:class:`~xtuner_plugins.data.dataset.InternVLDataset` names it. Read with the ``webdataset`` package's tar reader;
``tar tf`` lists a shard.

**The items.** :class:`ShardDataset` yields what ``InternVLDataset`` yields for the same sample: the per-sample
code is that class's (``check_record``, ``load_sample``: template, fitting, tiling), with the images' bytes
from the shard instead of paths (:class:`ShardSamples`).

**Who reads what** (``streaming.py``): each epoch orders the shards anew (seeded). With ``S`` shards and ``U`` reading
units (ranks x DataLoader workers), unit ``u`` reads every ``U``-th shard from ``u`` when ``S >= U``; when
``S < U`` the units share shards, unit ``u`` reading shard ``u mod S``'s samples of index ``k`` with
``k mod m = u div S`` (``m`` units on that shard): disjoint, complete, each unit reading its shard's bytes through.
A unit's state is its epoch, shard and sample; a resume reads the shard up to that sample without decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .dataset import InternVLDataset
from .errors import SampleError
from .fitting import tally_fit
from .sources import DataSource, Record
from .streaming import StreamingDataset, epoch_order, unit_part

__all__ = ['INDEX', 'ShardDataset', 'ShardRecord', 'ShardSamples', 'check_shards', 'read_index', 'read_shard',
           'shard_units']

INDEX = 'shards.json'
FORMAT = 'xtuner-plugins-shards/1'


def read_index(folder: str) -> dict:
    """A shard set's ``shards.json``; a ValueError naming the folder when it is not a complete shard set."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise ValueError(f'{folder}: no {INDEX}: not a shard set, or one whose writing did not finish '
                         f'(tools/shard_dataset.py writes {INDEX} last)')
    with open(path, encoding='utf-8') as f:
        index = json.load(f)
    if index.get('format') != FORMAT:
        raise ValueError(f'{path}: format {index.get("format")!r}, expected {FORMAT!r}')
    missing = [s['file'] for s in index['shards'] if not os.path.isfile(os.path.join(folder, s['file']))]
    if missing:
        raise ValueError(f'{folder}: {len(missing)} of its {len(index["shards"])} shards are missing, first '
                         f'{missing[0]}')
    return index


def read_shard(path: str, skip: int = 0) -> Iterator[Dict[str, Any]]:
    """The samples of one tar shard (``{'__key__', 'json', 'img0.jpg', ...}``, bytes), after the first ``skip``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    with open(path, 'rb') as stream:
        for k, sample in enumerate(group_by_keys(tar_file_expander([dict(url=path, stream=stream)]))):
            if k >= skip:
                yield sample


@dataclass
class ShardRecord(Record):
    """A record read from a shard: ``raw`` its sample, ``media`` its images' bytes."""

    media: Tuple[bytes, ...] = ()


def shard_record(sample: Dict[str, Any]) -> ShardRecord:
    meta = json.loads(sample['json'])
    return ShardRecord(int(meta['source']), int(meta['line']), meta['sample'],
                       tuple(sample[name.lower()] for name in meta['images']))


_STUB = {'conversations': [{'from': 'human', 'value': 'x'}, {'from': 'gpt', 'value': 'x'}]}


class ShardSamples(InternVLDataset):
    """``InternVLDataset``'s per-sample code over a shard set's sources (the module docstring). It takes that class's
    settings (tokenizer, template, ``max_length``, tiling, ...); its own records come from the shards, so it is
    built over a one-sample stub file and then given the shard set's sources."""

    def __init__(self, shards: str, **settings):
        index = read_index(shards)
        stub = tempfile.mkdtemp(prefix='shard-samples-')
        try:
            path = os.path.join(stub, 'stub.jsonl')
            with open(path, 'w', encoding='utf-8') as f:
                f.write(json.dumps(_STUB) + '\n')
            unused = ('data_files', 'image_folders', 'repeat_times')  # the shards' own (a config may carry them)
            super().__init__(path, **{k: v for k, v in settings.items() if k not in unused})
        finally:
            shutil.rmtree(stub, ignore_errors=True)
        self.shard_folder, self.index = shards, index
        self.sources = [DataSource(name=os.path.basename(s['annotation']), annotation=s['annotation'],
                                   image_folder=None, max_dynamic_patch=s.get('max_dynamic_patch'))
                        for s in index['sources']]
        self.num_distinct = int(index['samples'])  # what max_bad_fraction is a fraction of

    def check_record(self, record: Record):
        """``InternVLDataset.check_record``, the images its shard's bytes (named by their sample in messages)."""
        checked = super().check_record(record)
        media = getattr(record, 'media', None)
        if media is not None:
            if len(media) != len(checked.image_paths):
                raise SampleError('missing_image', f'the shard holds {len(media)} images for the sample\'s '
                                                   f'{len(checked.image_paths)}')
            checked.image_paths = list(media)
        return checked


def shard_units(num_shards: int, unit: int, units: int) -> Tuple[List[int], int, int]:
    """``(shard positions, k, m)`` unit ``unit`` of ``units`` reads: those positions' samples whose index in their
    shard is ``k`` mod ``m`` (the module docstring)."""
    if num_shards >= units:
        return list(unit_part(num_shards, unit, units)), 0, 1
    return [unit % num_shards], unit // num_shards, len(range(unit % num_shards, units, num_shards))


class ShardDataset(StreamingDataset):
    """The samples of a shard set, streamed (module docstring); items as ``InternVLDataset``'s.

    Args:
        shards: the shard set's folder (``tools/shard_dataset.py``'s output).
        dataset: ``ShardSamples``' settings (a config dict, its ``type`` ShardSamples: the model's settings are
            filled in as for ``InternVLDataset``, ``engine/derive.py``), or a ``ShardSamples``.
        seed, shuffle: the shards' order in each epoch.
        rank, world_size: see :class:`~xtuner_plugins.data.streaming.StreamingDataset`.
    """

    counts_epochs = True

    def __init__(self, shards: str, dataset=None, seed: int = 0, shuffle: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__(rank, world_size)
        if not isinstance(dataset, ShardSamples):
            settings = dict(dataset or {})
            settings.pop('type', None)
            dataset = ShardSamples(shards, **settings)
        self.samples, self.seed, self.shuffle = dataset, seed, shuffle
        self.folder, self.index = shards, dataset.index
        self.shards = [os.path.join(shards, s['file']) for s in self.index['shards']]

    # what the hooks read of a training data set (ModelDataCheckHook, BadSampleHook)
    geometry = property(lambda self: self.samples.geometry)
    tokenizer = property(lambda self: self.samples.tokenizer)
    template = property(lambda self: self.samples.template)
    max_bad_fraction = property(lambda self: self.samples.max_bad_fraction)
    load_problems = property(lambda self: [])
    num_distinct = property(lambda self: int(self.index['samples']))

    def __len__(self) -> int:
        """This rank's share of the samples (an epoch in ``max_epochs``; ranks' parts differ by up to a shard)."""
        return int(self.index['samples']) // self.dist_info()[1]

    def set_epoch(self, epoch: int) -> None:
        """Epochs are the stream's own (``streaming.py``): the loop's restarts do not set them."""

    def rank_samples(self, rank: int, world: int) -> int:
        return int(self.index['samples']) // world

    def keyed_records(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Dict, Tuple, ShardRecord]]:
        """``(state after, key, record)`` of this unit's samples, epoch after epoch, from ``state``; a key is
        ``(epoch, shard, place in the shard)`` (:meth:`reload`)."""
        epoch, j, done = (0, 0, 0) if state is None else (state['epoch'], state['shard'], state['sample'])
        while True:
            order = epoch_order(len(self.shards), self.seed, epoch, self.shuffle)
            mine, k, m = shard_units(len(self.shards), unit, units)
            while j < len(mine):
                shard = order(mine[j])
                for position, sample in enumerate(read_shard(self.shards[shard], done), done):
                    done = position + 1
                    if position % m == k:
                        yield dict(epoch=epoch, shard=j, sample=done), (epoch, shard, position), shard_record(sample)
                j, done = j + 1, 0
            epoch, j = epoch + 1, 0

    def reload(self, keys: List[Tuple]) -> List[ShardRecord]:
        """The records of ``keys`` (:meth:`keyed_records`'): a resumed online-packing buffer's samples, each shard
        read once, up to the last one asked of it."""
        wanted: Dict[int, set] = {}
        for _, shard, position in keys:
            wanted.setdefault(int(shard), set()).add(int(position))
        found = {}
        for shard, positions in wanted.items():
            first = min(positions)
            for position, sample in enumerate(read_shard(self.shards[shard], first), first):
                if position in positions:
                    found[shard, position] = shard_record(sample)
                if position >= max(positions):
                    break
            missing = sorted(positions - {p for s, p in found if s == shard})
            if missing:
                raise ValueError(f'{self.shards[shard]}: the checkpoint\'s stream state names its sample {missing[0]}, '
                                 f'which it does not hold: was the shard set changed since the checkpoint was saved?')
        return [found[int(shard), int(position)] for _, shard, position in keys]

    def stream(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Any, Dict]]:
        skipped: list = []
        for after, _, record in self.keyed_records(unit, units, state):
            if getattr(self.samples, 'epoch', after['epoch']) != after['epoch']:
                self.samples.set_epoch(after['epoch'])
            try:
                item = self.samples.load_sample(record)
            except SampleError as err:
                self.samples.count_failure(err.with_source(self.samples.where(record)))
                skipped.append((err.source, err.reason))
                continue
            item['skipped'], skipped = skipped, []
            yield after, item


def check_shards(folder: str, allow_truncation: bool = False, **settings) -> Dict[str, Any]:
    """What ``tools/check_dataset.py`` reports, for a shard set: every sample read from its shard, checked and its
    images decoded as training does; with a ``tokenizer`` in ``settings``, what ``max_length`` does to each
    (``InternVLDataset.fit``). Returns ``problems`` and ``notes`` (``SampleError`` naming ``FILE:LINE``), ``stats``
    (annotation -> Counter, check_dataset's keys) and ``lengths`` (annotation -> tokens trained on), and
    ``skipped`` (what the shard writer left out, by reason)."""
    from collections import Counter, defaultdict

    from .image_io import load_image
    samples = ShardSamples(folder, **settings)
    problems: List[SampleError] = []
    notes: List[SampleError] = []
    stats: Dict[str, Counter] = defaultdict(Counter)
    lengths: Dict[str, List[int]] = defaultdict(list)
    for shard in samples.index['shards']:
        for raw in read_shard(os.path.join(folder, shard['file'])):
            record = shard_record(raw)
            where, st = samples.where(record), stats[samples.sources[record.source].annotation]
            st['samples'] += 1

            def drop(err: SampleError) -> None:
                st[f'dropped ({err.reason.replace("_", " ")})'] += 1
                problems.append(err.with_source(where))
            try:
                checked = samples.check_record(record)
            except SampleError as err:
                drop(err)
                continue
            st['text-only samples' if not checked.image_paths else 'image samples'] += 1
            sizes = []
            for name, data in zip(json.loads(raw['json'])['images'], checked.image_paths):
                st['images'] += 1
                try:
                    sizes.append(load_image(data, samples.max_image_pixels, f'{shard["file"]}:{raw["__key__"]}.'
                                                                            f'{name}').size)
                    st['images found'] += 1
                except SampleError as err:
                    st[f'images {err.reason.replace("_", " ")}'] += 1
                    last = err
            if len(sizes) < len(checked.image_paths):
                drop(last)
                continue
            if samples.tokenizer is None:
                continue
            try:
                fit = samples.fit(record, checked, sizes)
            except SampleError as err:
                drop(err)
                continue
            lengths[samples.sources[record.source].annotation].append(max(len(e['input_ids']) for e in fit.encoded))
            tally_fit(fit, st, notes, problems, where, samples.max_tiles_per_image(record, len(sizes)),
                      samples.max_length, allow_truncation)
    return dict(problems=problems, notes=notes, stats=dict(stats), lengths=dict(lengths),
                skipped=dict(samples.index.get('skipped', {})))
