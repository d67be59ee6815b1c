"""Training from WebDataset tar shards (written by ``tools/shard_dataset.py``), for data that outgrows one
annotation file.

**The format.** A shard set is a folder: ``shard-000000.tar``, ``shard-000001.tar``, ... and ``shards.json``
(written last: a folder without it is refused as incomplete). Each tar holds samples as WebDataset lays them out,
the files of one sample one after another under one key (``000000042.json``, ``000000042.img0.jpg``, ...): the
``json`` is ``{"sample": the annotation's sample, "source": k, "line": L, "images": [the image files' names]}``
(and ``"video": "video.mp4"`` for a video file, ``"frames": ["frame0000.jpg", ...]`` for a folder of frames), each
image, video or frame the original file's bytes. ``shards.json`` lists the shards with their sample counts and
sizes, the digests of each shard's records (``digest``, ``first``: the first sample's) and of its media (``media``:
images, videos and frames, ``shard_index.media_update``), and the sources (``annotation``, ``max_dynamic_patch``): a
sample is named ``FILE:LINE`` of the annotation it came from, as :class:`~xtuner_plugins.data.dataset.InternVLDataset`
names it. Read with the ``webdataset`` package's tar reader; ``tar tf`` lists a shard.

**The items.** :class:`ShardDataset` yields what ``InternVLDataset`` yields for the same sample: the per-sample
code is that class's (``check_record``, ``load_sample``: template, fitting, tiling, a video's frames), with the
images' and the video's bytes from the shard instead of paths (:class:`ShardSamples`; a video read from memory as
its file or folder would be, ``video.VideoBytes`` and ``video.VideoFrames``).

**Damage** is named, never read past: a shard whose size is not the one ``shards.json`` records stops start-up
with one line, a tar that ends early or cannot be read stops the stream with one line naming it and the samples
read (:func:`read_shard`), and a sample missing one of its files is a bad sample (``missing_image`` /
``missing_video``, naming the shard and the member), counted and skipped as in annotation files; so is one whose
``KEY.json`` is not the writer's (not JSON, a key missing or of the wrong kind, a ``source`` not in ``shards.json``:
``bad_shard_json``, named ``SHARD:KEY``, :func:`meta_problem`). A
``shards.json`` that is not one (not JSON, a key missing or of the wrong kind) stops start-up with one line naming
it and the key (:func:`index_problem`), and so does a shard named outside the folder (``../``, an absolute path,
a symbolic link out of it): nothing outside the folder is read, unless the data set's ``allow_links_outside``
(its setting for image folders) lets a shard be a link to a file elsewhere.

**Who reads what** (``streaming.py``): each epoch orders the shards anew (seeded). With ``S`` shards and ``U``
reading units (ranks x DataLoader workers), unit ``u`` reads every ``U``-th shard from ``u`` when ``S >= U``; when
``S < U`` the units share shards, unit ``u`` reading shard ``u mod S``'s samples of index ``k`` with
``k mod m = u div S`` (``m`` units on that shard): disjoint, complete, each unit reading its shard's bytes through.
A unit's state is its epoch, shard and sample; a resume reads the shard up to that sample without decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from xtuner_plugins.errors import Refused

from .dataset import InternVLDataset
from .errors import SampleError
from .shard_index import INDEX, REWRITE, ShardDamaged, index_problem, is_count, read_index, read_shard
from .sources import DataSource, Record
from .strictjson import DuplicateKey, loads
from .streaming import ORDER, DryWatch, NothingToRead, StreamingDataset, epoch_order, unit_part
from .video import VideoBytes, VideoFrames

__all__ = ['INDEX', 'ShardDataset', 'ShardRecord', 'ShardSamples', 'index_problem', 'read_index', 'read_shard',
           'shard_units']

@dataclass
class ShardRecord(Record):
    """A record read from a shard: ``raw`` its sample, ``media`` its images' bytes (None for a member missing from
    the shard), ``video`` its video's (``VideoBytes``, or ``VideoFrames`` for a frame folder's), ``gone`` the first
    video member missing from the shard, ``where`` the shard and key (``SHARD:KEY``), ``problem`` what is wrong
    with its ``KEY.json`` ('' when nothing: :func:`meta_problem`)."""

    media: Tuple[Optional[bytes], ...] = ()
    names: Tuple[str, ...] = ()
    video: Optional[str] = None
    gone: Optional[str] = None
    where: str = ''
    problem: str = ''


BAD_META = 'bad_shard_json'  # a sample whose KEY.json is not the writer's: a bad sample, named SHARD:KEY


def meta_problem(meta: Any, sources: int) -> str:
    """What is wrong with a shard sample's parsed ``KEY.json`` ('' when nothing): not an object, or ``sample``,
    ``source`` (one of ``sources``), ``line``, ``images`` (member names), ``video`` or ``frames`` missing or of
    the wrong kind. The reader trusts none of it unchecked: a key error here would stop training."""
    if not isinstance(meta, dict):
        return f'is a JSON {type(meta).__name__}, not an object'

    def member(name: Any) -> bool:
        # webdataset's own fields (``__key__``, ``__url__``) are text, which the image reader would open as a path:
        # a shard naming one read any local file as an image or a frame
        return isinstance(name, str) and bool(name) and not name.startswith('__')

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(member(name) for name in value)
    members = 'member names (not webdataset\'s __ fields)'
    checks = (('sample', isinstance(meta.get('sample'), dict), 'an object (the annotation\'s sample)'),
              ('source', is_count(meta.get('source')) and meta['source'] < sources,
               f'the number of one of {INDEX}\'s {sources} sources (0..{sources - 1})'),
              ('line', is_count(meta.get('line')), 'a line number'),
              ('images', names(meta.get('images')), f'a list of {members}'),
              ('video', meta.get('video') is None or member(meta['video']), f'one of the {members}'),
              ('frames', meta.get('frames') is None or names(meta['frames']), f'a list of {members}'))
    for key, fine, expected in checks:
        if not fine:
            return f'"{key}" is {f"{meta[key]!r:.40}" if key in meta else "missing"}, expected {expected}'
    return ''


def shard_record(sample: Dict[str, Any], sources: int) -> ShardRecord:
    """The record of a shard's sample (``read_shard``'s) of a set of ``sources``; a ``KEY.json`` that is not JSON
    or not the writer's (:func:`meta_problem`) gives a record whose loading is a ``bad_shard_json`` bad sample."""
    where = f'{sample.get("__url__", "?")}:{sample["__key__"]}'
    if 'json' not in sample:
        raise ValueError(f'{where}: no {sample["__key__"]}.json (the sample\'s annotation) in the shard, only '
                         f'{sorted(k for k in sample if not k.startswith("__"))}: damaged; {REWRITE}')
    try:
        meta = loads(sample['json'].decode('utf-8'))
    except DuplicateKey as exc:
        meta, problem = None, f'is not the writer\'s: {exc.describe()}'
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser's depth
        meta, problem = None, f'is not JSON ({exc})'
    else:
        problem = meta_problem(meta, sources)
    if problem:
        return ShardRecord(-1, 0, None, where=where,
                           problem=f'member {sample["__key__"]}.json {problem}: damaged; {REWRITE}')
    names = tuple(name.lower() for name in meta['images'])
    members = [m.lower() for m in ([meta['video']] if meta.get('video') else meta.get('frames') or [])]
    gone = next((m for m in members if m not in sample), None)
    video = None
    if members and gone is None:
        video = (VideoBytes(f'{where}.{members[0]}', sample[members[0]]) if meta.get('video') else
                 VideoFrames(f'{where}.frame*', [sample[m] for m in members]))
    return ShardRecord(meta['source'], meta['line'], meta['sample'],
                       tuple(sample.get(name) for name in names), names, video, gone, where)


class ShardSamples(InternVLDataset):
    """``InternVLDataset``'s per-sample code over a shard set's sources (the module docstring). It takes that class's
    settings (tokenizer, template, ``max_length``, tiling, video frames, ...); its samples come from the shards
    (``ShardDataset``), its sources from ``shards.json``."""

    def __init__(self, shards: str, **settings):
        if not isinstance(shards, (str, os.PathLike)):   # (a TypeError of os.path)
            raise Refused(f'shards={shards!r:.60}: give the shard set\'s folder (tools/shard_dataset.py\'s --out)')
        unused = ('data_files', 'image_folders', 'repeat_times')  # the shards' own (a config may carry them)
        super().__init__(shards, **{k: v for k, v in settings.items() if k not in unused})

    def read_files(self, shards, image_folders, repeat_times, max_dynamic_patches) -> None:
        """The shard set's sources and sample count, from its ``shards.json`` (no annotation file is read)."""
        self.stamps: List[Tuple] = []   # each shard as start-up found it: one put in its place after is refused
        self.shard_folder, self.index = shards, read_index(shards, self.allow_links_outside, self.stamps)
        self.sources = [DataSource(name=os.path.basename(s['annotation']), annotation=s['annotation'],
                                   image_folder=None, max_dynamic_patch=s.get('max_dynamic_patch'))
                        for s in self.index['sources']]
        self.records, self._source_ranges, self.load_problems = [], [], []
        self._index = np.zeros(0, dtype=np.int64)  # no annotation index: ShardDataset streams the samples
        self.num_distinct = int(self.index['samples'])  # what max_bad_fraction is a fraction of

    def where(self, record: Record) -> str:
        """``FILE:LINE`` of a record; ``SHARD:KEY`` of one whose ``KEY.json`` names no annotation line it can be
        trusted for (``ShardRecord.problem``)."""
        return record.where if isinstance(record, ShardRecord) and record.problem else super().where(record)

    def check_record(self, record: Record):
        """``InternVLDataset.check_record``, the images and the video its shard's bytes (named by their shard and
        key in messages); a member missing from the shard is ``missing_image`` / ``missing_video``, a ``KEY.json``
        not the writer's ``bad_shard_json``."""
        if isinstance(record, ShardRecord) and record.problem:
            raise SampleError(BAD_META, record.problem, record.where)
        checked = super().check_record(record)
        if not isinstance(record, ShardRecord):
            return checked
        if len(record.media) != len(checked.image_paths):
            raise SampleError('missing_image', f'{record.where}: the shard holds {len(record.media)} images for the '
                                               f'sample\'s {len(checked.image_paths)}')
        gone = [name for name, data in zip(record.names, record.media) if data is None]
        if gone:
            raise SampleError('missing_image', f'{record.where}: no member {record.where.rsplit(":", 1)[1]}.'
                                               f'{gone[0]} in the shard')
        checked.image_paths = list(record.media)
        checked.image_names = [f'{record.where}.{name}' for name in record.names]   # SHARD:KEY.img0.jpg in messages
        if checked.video is not None:
            if record.video is None:
                raise SampleError('missing_video', f'{record.where}: no member {record.where.rsplit(":", 1)[1]}.'
                                                   f'{record.gone or "video"} in the shard')
            checked.video, checked.links_within = record.video, None
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
        self.expected = [int(s['samples']) for s in self.index['shards']]
        self.sizes = [s.get('bytes') for s in self.index['shards']]  # checked at start-up, again as each is opened
        self.digests = [s.get('digest') for s in self.index['shards']]  # checked as each is read through
        self.firsts = [s.get('first') for s in self.index['shards']]    # checked at each one's first sample
        self.media = [s.get('media') for s in self.index['shards']]     # checked as each is read through
        self.stamps = dataset.stamps   # each shard as start-up found it, compared as each is opened

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

    def epoch_parts(self, units: int) -> List[int]:
        """The samples each of ``units`` reading units has in the first epoch's order (parts of unequal sizes, when
        the shards do not divide among the units, make an epoch of ``max_epochs`` read some samples twice and
        others not at all: :func:`balance_note`)."""
        order = epoch_order(len(self.shards), self.seed, 0, self.shuffle)
        parts = []
        for unit in range(units):
            mine, k, m = shard_units(len(self.shards), unit, units)
            parts.append(sum(len(range(k, self.expected[order(p)], m)) for p in mine))
        return parts

    def unit_parts(self, units: int) -> List[int]:
        """The fewest samples each of ``units`` reading units reads in an epoch, whichever shards the epoch's order
        gives it: each epoch orders the shards anew, so a unit sharing a shard with others (fewer shards than units)
        that read some in the first epoch read none in one that gave it a smaller shard, and stopped the run there
        (``NothingToRead``, after hours; start-up had looked at the first epoch alone)."""
        sizes = sorted(self.expected)
        parts = []
        for unit in range(units):
            mine, k, m = shard_units(len(self.shards), unit, units)
            parts.append(sum(len(range(k, n, m)) for n in sizes[:len(mine)]))
        return parts

    def keyed_records(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Dict, Tuple, ShardRecord]]:
        """``(state after, key, record)`` of this unit's samples, epoch after epoch, from ``state``; a key is
        ``(epoch, shard, place in the shard)`` (:meth:`reload`)."""
        epoch, j, done = (0, 0, 0) if state is None else (state['epoch'], state['shard'], state['sample'])
        version = ORDER if state is None else state.get('order', 1)  # an epoch goes on in the order it began in
        whole = j == 0 and done == 0   # an epoch read from its start: one that gives nothing would give nothing again
        while True:
            order = epoch_order(len(self.shards), self.seed, epoch, self.shuffle, version)
            mine, k, m = shard_units(len(self.shards), unit, units)
            given = False
            while j < len(mine):
                shard = order(mine[j])
                samples = read_shard(self.shards[shard], done, self.expected[shard], self.sizes[shard],
                                     self.digests[shard], self.stamps[shard], self.firsts[shard], self.media[shard])
                for position, sample in enumerate(samples, done):
                    done = position + 1
                    if position % m == k:
                        given = True
                        yield (dict(epoch=epoch, shard=j, sample=done, order=version), (epoch, shard, position),
                               shard_record(sample, len(self.samples.sources)))
                j, done = j + 1, 0
            if whole and not given:
                raise NothingToRead(f'{self.folder}: reading unit {unit} of {units} (ranks x DataLoader workers) has '
                                    f'no sample of its {len(self.shards)} shards to read; use fewer DataLoader '
                                    f'workers, or write more shards')
            epoch, j, version, whole = epoch + 1, 0, ORDER, True

    def reload(self, keys: List[Tuple]) -> List[ShardRecord]:
        """The records of ``keys`` (:meth:`keyed_records`'): a resumed online-packing buffer's samples, each shard
        read once, up to the last one asked of it."""
        wanted: Dict[int, set] = {}
        for _, shard, position in keys:
            wanted.setdefault(int(shard), set()).add(int(position))
        found = {}
        for shard, positions in wanted.items():
            first = min(positions)
            for position, sample in enumerate(read_shard(self.shards[shard], first, size=self.sizes[shard],
                                                         started=self.stamps[shard], first=self.firsts[shard]),
                                              first):
                if position in positions:
                    found[shard, position] = shard_record(sample, len(self.samples.sources))
                if position >= max(positions):
                    break
            missing = sorted(positions - {p for s, p in found if s == shard})
            if missing:
                raise ShardDamaged(f'{self.shards[shard]}: the checkpoint\'s stream state names its sample '
                                   f'{missing[0]}, which it does not hold: was the shard set changed since the '
                                   f'checkpoint was saved?')
        return [found[int(shard), int(position)] for _, shard, position in keys]

    def stream(self, unit: int, units: int, state: Any) -> Iterator[Tuple[Any, Dict]]:
        skipped: list = []
        dry = DryWatch(unit, units)
        for after, _, record in self.keyed_records(unit, units, state):
            if getattr(self.samples, 'epoch', after['epoch']) != after['epoch']:
                self.samples.set_epoch(after['epoch'])
            try:
                item = self.samples.load_sample(record)
            except SampleError as err:
                self.samples.count_failure(err.with_source(self.samples.where(record)))
                skipped.append((err.source, err.reason))
                dry.bad(after['epoch'], f'{err.source}: {err.reason}')
                continue
            dry.good()
            item['skipped'], skipped = skipped, []
            yield after, item


def balance_note(dataset: ShardDataset, world: int, workers: int) -> Optional[str]:
    """What an epoch of ``max_epochs`` leaves out and reads twice when the shards do not divide among the ``world``
    x ``workers`` reading units (each unit reads its part, and an epoch ends after the rank's even share), or None
    when no more than the units' rounding is."""
    units = world * workers
    parts = dataset.epoch_parts(units)
    quota = int(dataset.index['samples']) // world / workers
    unread = int(sum(max(0.0, part - quota) for part in parts))
    if unread <= units:
        return None
    return (f'the {len(dataset.shards)} shards of {dataset.folder} do not divide evenly among the {units} reading '
            f'units ({world} ranks x {workers} DataLoader workers): their parts hold {min(parts)} to {max(parts)} samples, '
            f'an epoch reads {quota:.0f} a unit, so each epoch leaves about {unread} samples unread and reads as '
            f'many twice; write the shards again with a number of shards that is a multiple of {units} '
            f'(tools/shard_dataset.py --samples-per-shard), or train for max_iters (an endless stream)')
