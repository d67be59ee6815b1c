"""The start-up check of every sample, once per node and cached: which samples are trained on, which are refused.

Every entry of an annotation file is parsed and checked by the data set's own ``check_record`` (JSON, the
conversation against its images, image paths inside their folder, control text, ...), and each image or video it
names is looked up (``presence.py``). That is Python work per sample, so it is done once per node (``nodepass``:
a file lock, every core) and cached beside the length cache under the same key (the annotation file's path, size,
modification time, inode and change time, the image folder, the settings and the tokenizer): ``KEY.good.npy`` holds
the entries trained on (memory-mapped, shared by every rank and worker), ``KEY.check.json`` the problems
(``FILE:LINE``, reason, message) and the counts of images not found. With a tokenizer, the same pass computes the
sample lengths (``lengths.py``) and writes their cache: one parse and one ``check_record`` a sample, not two passes.
A warm start reads those files and checks nothing per sample; a sample is checked again whenever it is loaded, so
an image that vanished or changed since is met then (counted, skipped). What the file system decided the other way
is looked at again: an image not found then that is there now, or one refused as a link out of its folder that
resolves elsewhere now (the link replaced by the file), and the check is done again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
from mmengine.logging import print_log

from .errors import ProblemList, SampleError
from .index import SourceIndex, ascending_below, load_array, room_for_open_files, save_array, source_index
from .lengths import _cache_key, default_cache_dir, lines_digest, save_slices, write_text_atomically
from .record_lengths import LengthSlice
from .nodepass import node_once, run_slices
from .presence import missing_line
from .records import RecordView
from .entries import PAIR_HINT, parse_entry
from .sources import DataSource, Record, folder_problem, repeat_array, repeat_subset

# 2: the stop word labelled with SentencePiece legacy=False (its no_supervised_tokens skips redone); 3: the links
# refused are kept, and looked at again on a warm start; 4: a top-level "system" read as the first turn (one beside
# a system turn refused) and a conversation-form pair read as SFT refused (they trained without a word), OpenAI's
# turns and "Chosen" / "Rejected" named
CHECK_VERSION = 4
MAX_ITEMS = 1 << 32  # items after repeats, per source
MISSING_KEPT = 64    # images not found kept in the cached check: one of them there now, the check is done again;
#                      so are images refused as links out of their folder: one of them resolving elsewhere now


#: copies of a source's index while it is built (np.tile, the concatenation, the offsets added: 2.9 GB peak for a
#: 0.75 GiB index)
INDEX_COPIES = 3


def max_items() -> Tuple[int, str]:
    """The most items (after repeats) a source may give, and why when it is this machine's memory: their index (8
    bytes an item, :data:`INDEX_COPIES` copies while it is built, in every rank of the node) in half of it at most
    (3e9 items asked numpy for 22 GiB, a MemoryError traceback or the OOM killer), :data:`MAX_ITEMS` at most."""
    try:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return MAX_ITEMS, ''
    from xtuner_plugins.slurm_step import tasks_on_node
    try:   # (srun -n N sets no SLURM_NTASKS_PER_NODE: its tasks per node are in SLURM_STEP_TASKS_PER_NODE)
        ranks = max(1, int(os.environ.get('LOCAL_WORLD_SIZE') or tasks_on_node(os.environ)
                           or os.environ.get('SLURM_NTASKS_PER_NODE') or 1))
    except ValueError:
        ranks = 1
    most = memory // (16 * INDEX_COPIES * ranks)
    if most >= MAX_ITEMS:
        return MAX_ITEMS, ''
    on = f', on each of the node\'s {ranks} ranks' if ranks > 1 else ''
    return most, (f': half of this machine\'s {memory / 2 ** 30:.1f} GiB of memory for {INDEX_COPIES} copies while '
                  f'it is built{on}')


@dataclass
class SourceCheck:
    """One source checked: ``good`` (its entries trained on, in file order) and what was refused or is missing."""

    good: np.ndarray
    problems: ProblemList = field(default_factory=ProblemList)
    media: int = 0          # samples naming images or a video
    videos: int = 0         # of those, samples naming a video
    missing: int = 0        # of those, samples naming a path with nothing there
    first_missing: Optional[list] = None  # [FILE:LINE, path] of the first of those
    lines: Optional[str] = None  # lengths.lines_digest of the good entries' lines (None: an older cache)

    def missing_message(self, src: DataSource) -> Optional[str]:
        """The line to log about images not found (None: all there, or the source is not used); raises
        ``Refused`` when none is there (``presence.missing_line``), ``NotFound`` when the source's image
        folder is none and one of its samples names an image or a video (``sources.folder_problem``)."""
        if src.repeat_time <= 0:
            return None
        problem = folder_problem(src, advice=bool(self.media))   # advice where the folder is needed
        if problem and self.media:
            from xtuner_plugins.errors import NotFound
            raise NotFound(problem)   # (one line at training's start; a FileNotFoundError to its callers)
        if problem:
            return f'{problem}: none of its samples names an image or a video, so it needs none'
        if not self.missing:
            return None
        return missing_line(src, self.media, self.videos, self.missing, *self.first_missing)


def _check_slice(ds, source_idx: int, src: DataSource, index: SourceIndex, start: int, stop: int,
                 lengths: bool = False) -> dict:
    """The check of entries ``start:stop``; with ``lengths``, the lengths of those trained on too (the same parse
    and ``check_record``, not a second pass: ``record_lengths.LengthSlice``)."""
    is_jsonl = src.annotation.endswith('.jsonl')
    part = LengthSlice(ds) if lengths else None
    good, parse_problems, check_problems = [], [], []
    media = videos = missing = 0
    first, some, links = None, [], []
    for e in range(start, stop):
        line = index.line(e)
        where = f'{src.annotation}:{line}'
        try:
            _, sample = parse_entry(index.read(e), is_jsonl, where)
            try:
                checked = ds.check_record(Record(source_idx, line, sample))
            except SampleError as err:
                check_problems.append([err.reason, err.message, where])
                if getattr(err, 'link', None) and len(links) < MISSING_KEPT:
                    links.append(list(err.link))
                continue
        except SampleError as err:
            parse_problems.append([err.reason, err.message, err.source or where])
            continue
        good.append(e)
        if part is not None:
            part.add(Record(source_idx, line, sample), checked)
        paths = checked.image_paths or ([checked.video] if checked.video is not None else [])
        if paths:
            media += 1
            videos += checked.video is not None
            gone = next((p for p in paths if not os.path.exists(p)), None)
            if gone is not None:
                missing += 1
                first = first or [where, gone]
                if len(some) < MISSING_KEPT:
                    some.append(gone)
    return dict(good=np.asarray(good, dtype=np.int64), parse=parse_problems, check=check_problems, media=media,
                videos=videos, missing=missing, first=first, some=some, links=links,
                lengths=None if part is None else part.result())


def _build(ds, source_idx: int, src: DataSource, index: SourceIndex, base: str) -> SourceCheck:
    lengths = ds.tokenizer is not None and getattr(ds, 'lengths_with_check', False)
    if lengths:
        print_log(f'Checking the {len(index)} samples of {src.annotation} and computing their lengths (cached in '
                  f'{base}.*)', logger='current')
    parts = run_slices(lambda a, b: _check_slice(ds, source_idx, src, index, a, b, lengths), len(index),
                       getattr(ds, 'workers', None), f'checking {src.annotation}')
    good = np.concatenate([p['good'] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    digest = lines_digest(index.entries[good, 2])
    if lengths:  # the lengths cache (lengths.py) of these records, as compute_source_lengths would write it
        save_slices(src, base, os.path.dirname(base), [p['lengths'] for p in parts], len(good), digest)
    summary = dict(version=CHECK_VERSION, entries=len(index), good=len(good), lines=digest,
                   problems=[q for p in parts for q in p['parse']] + [q for p in parts for q in p['check']],
                   media=sum(p['media'] for p in parts), videos=sum(p['videos'] for p in parts),
                   missing=sum(p['missing'] for p in parts),
                   first_missing=next((p['first'] for p in parts if p['first']), None),
                   some_missing=[path for p in parts for path in p['some']][:MISSING_KEPT],
                   links_refused=[link for p in parts for link in p['links']][:MISSING_KEPT])
    try:
        save_array(base + '.good.npy', good)
        write_text_atomically(base + '.check.json', json.dumps(summary))
        good = load_array(base + '.good.npy')
    except OSError as exc:
        print_log(f'the start-up check of {src.annotation} could not be cached in {os.path.dirname(base)} ({exc}); '
                  f'going on without it', logger='current', level=logging.WARNING)
    return _as_check(summary, good)


def _as_check(summary: dict, good: np.ndarray) -> SourceCheck:
    return SourceCheck(good, ProblemList(summary['problems']), summary['media'],
                       summary['videos'], summary['missing'], summary['first_missing'], summary.get('lines'))


def _load(base: str, index: SourceIndex) -> Optional[SourceCheck]:
    try:
        with open(base + '.check.json', encoding='utf-8') as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    good = load_array(base + '.good.npy')
    if (not ascending_below(good, len(index)) or summary.get('version') != CHECK_VERSION
            or summary.get('entries') != len(index) or summary.get('good') != len(good)):
        return None   # (a cache edited or damaged in place is computed again, as a missing one)
    if summary.get('missing'):   # images not found then, there now (a folder still being filled): checked again
        some = summary.get('some_missing') or [(summary.get('first_missing') or [None, None])[1]]
        if any(isinstance(path, str) and os.path.exists(path) for path in some):
            return None
    # images refused as links out of their folder, resolving elsewhere now (a link replaced by the file, re-pointed)
    if any(os.path.realpath(full) != real for full, real in summary.get('links_refused') or ()):
        return None
    if summary.get('lines') is None:  # a cache written before the digest was kept: added once
        summary['lines'] = lines_digest(index.entries[good, 2])
        try:
            write_text_atomically(base + '.check.json', json.dumps(summary))
        except OSError:
            pass
    return _as_check(summary, good)


def check_source(ds, source_idx: int, src: DataSource, index: SourceIndex) -> SourceCheck:
    """The check of one source, from the node's cache or computed (once per node, over every core) and cached."""
    cache_dir = ds.cache_dir or default_cache_dir()
    base = os.path.join(cache_dir, _cache_key(ds, src))
    checked = node_once(base + '.good.npy', lambda: _load(base, index),
                        lambda: _build(ds, source_idx, src, index, base), f'the start-up check of {src.annotation}')
    return checked


CACHED_SUBSET = 200_000  # samples from which a fractional repeat's subset is cached (below: drawn in well under 1 s)


def cached_subset(ds, n: int, repeat_time: float, seed: int) -> Optional[np.ndarray]:
    """``sources.repeat_subset`` of ``n`` samples, drawn once per node and memory-mapped from the cache (it depends on
    ``n``, ``repeat_time`` and ``seed`` alone); None (drawn by the caller) for small sources or whole repeats."""
    if n < CACHED_SUBSET or repeat_time == int(repeat_time):
        return None
    import hashlib
    key = hashlib.sha1(json.dumps(dict(version=1, n=n, repeat_time=repeat_time, seed=seed)).encode()).hexdigest()
    file = os.path.join(ds.cache_dir or default_cache_dir(), f'subset-{key}.npy')

    def build() -> np.ndarray:
        subset = repeat_subset(n, repeat_time, seed)
        try:
            save_array(file, subset)
        except OSError:
            return subset
        return load_array(file)

    def load() -> Optional[np.ndarray]:
        found = load_array(file)
        return found if ascending_below(found, n) else None
    return node_once(file, load, build, f'the repeat_time {repeat_time:g} subset of {n} samples')


#: what every refused sample of a file says when the file is of the other kind: SFT samples read as pairs, pairs
#: read as SFT samples (``entries.sample_conversations``)
_SFT_AS_PAIRS, _PAIRS_AS_SFT = 'no chosen and no rejected answer', PAIR_HINT   # (the words of each refusal)


def wrong_kind(problems) -> str:
    """The end of the 'no samples to train on' line when every sample was refused as being of the other kind: SFT
    data given to a preference config, or preference pairs given to an SFT config; '' otherwise."""
    said = [str(p) for p in problems]
    if said and all(_SFT_AS_PAIRS in p and 'lower case' not in p for p in said):   # (not "Chosen" / "Rejected")
        return ('; the data looks like SFT data (no "chosen" / "rejected" answers) given to a preference config: '
                'train it with an SFT config (finetune_*.py), or give preference pairs (docs/preference.md)')
    if said and all(_PAIRS_AS_SFT in p for p in said):
        return ('; the data looks like preference pairs given to an SFT config: train them with a preference config '
                '(dpo_*.py, mpo_*.py), or give SFT samples ("conversations")')
    return ''


def read_sources(ds, seed: int, log: Callable) -> Tuple[RecordView, np.ndarray, List[range], ProblemList]:
    """``(records, index, source_ranges, load_problems)`` of a data set's ``sources``: each file's index and
    start-up check (``log`` takes the warnings: images not found, a source whose ``repeat_time`` rounds to 0),
    then the items after repeats (``index``: a record number per item). Raises ``Refused`` for an empty file,
    a wrong image folder (none of a source's images found) or no sample to train on at all."""
    indexes, good, index, ranges, digests = [], [], [], [], []
    problems = ProblemList()
    room_for_open_files(len(ds.sources))
    for i, src in enumerate(ds.sources):
        entries = source_index(src.annotation, ds.cache_dir or default_cache_dir())
        if not len(entries):   # (Refused: one line at training's start, where it was a 40-line traceback)
            from xtuner_plugins.errors import Refused
            raise Refused(f'{src.annotation}: no samples (an empty annotation file); remove it from the data files '
                          'or fill it')
        note = src.length_note(len(entries))
        if note:
            log(note, logger='current', level=logging.WARNING)
        most, why = max_items()
        if len(entries) * src.repeat_time > most:  # before the check; np.tile would ask for terabytes or overflow
            from xtuner_plugins.errors import Refused
            raise Refused(f'{src.annotation}: repeat_time {src.repeat_time:g} makes its {len(entries)} samples '
                          f'{len(entries) * src.repeat_time:.4g} items, more than a data set indexes ({most}, '
                          f'8 bytes each{why}): a typo? (2.5: two copies and a seeded half)')
        checked = check_source(ds, i, src, entries)
        problems.extend(checked.problems)
        missing = checked.missing_message(src)  # a wrong folder: refused here
        if missing:
            log(missing, logger='current', level=logging.WARNING)
        start = sum(len(g) for g in good)
        indexes.append(entries)
        good.append(checked.good)
        digests.append(checked.lines)
        ranges.append(range(start, start + len(checked.good)))
        repeated = repeat_array(len(checked.good), src.repeat_time, seed + i,
                                subset=cached_subset(ds, len(checked.good), src.repeat_time, seed + i))
        if len(checked.good) and not len(repeated):
            log(f'{src.annotation}: repeat_time {src.repeat_time} of its {len(checked.good)} samples rounds to 0: '
                f'this source is not used', logger='current', level=logging.WARNING)
        index.append(start + repeated)
    index = np.concatenate(index)
    if not len(index):
        from xtuner_plugins.errors import Refused
        raise Refused('no samples to train on in ' + ', '.join(
            f'{src.annotation} (repeat_time {src.repeat_time})' for src in ds.sources) +
            (f'; {len(problems)} were refused, first: {problems[0]}' if problems else '') + wrong_kind(problems))
    return RecordView(indexes, good, digests=digests), index, ranges, problems
