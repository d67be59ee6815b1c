"""What a run trains on: a manifest of its data, and bad samples counted once each over every DataLoader worker
and rank, against the run's limit.

**Manifest.** At the start, ``WORK_DIR/data_manifest.json`` records each source: its annotation file (path,
size, modification time), image folder, ``repeat_time``, samples read, refused at start-up (by reason) and
used after repeats, and the ranks and batch size cutting its epochs into batches, the sampler's seed and a digest
of the lengths it orders by, and an offline-packed set's packs (count, budgets, digest). A run that resumes compares
it with the manifest the interrupted run wrote and stops (``on_data_change='stop'``, the default) or warns
(``'warn'``) when the data changed under it, or is cut into other batches or packs or drawn in another order
(MMEngine resumes by skipping as many batches as were trained: other batches than the ones trained on), naming
what. A file moved, or whose modification time or image
folder alone changed (its size, sampled content and samples the same: a copy to a job's own disk, one that did not
keep times), is said in a warning; so is any change under a stream (online packing, shards), whose resume
``streamstate.py`` judges.

**Bad samples.**

The data set counts the samples that fail to load in its own process (``InternVLDataset.count_failure``): a
DataLoader worker or another rank sees only its share, so 40 % bad images with a limit of 30 % would pass
with two workers. Each batch therefore lists what was skipped to make it (``skipped``: ``(FILE:LINE,
reason)``, see ``data/collate.py``), and :class:`BadSampleHook` adds these up in the training processes:

* after every iteration the ranks agree on whether any skipped something new (one all-reduce of a count);
  only then are the new entries gathered. Every rank holds the same table, so every rank stops together;
* a sample is counted once, whatever the epoch or the number of times it is drawn; the limit is the data
  set's ``max_bad_fraction`` of all its samples (those refused at start-up included), for the whole run;
* each reason is logged with its ``FILE:LINE`` the first time it is seen on each rank, then only counted;
* after every epoch and at the end: a summary by reason, also written to ``WORK_DIR/skipped_samples.json``
  (every ``FILE:LINE`` with its reason; those refused at start-up under ``at_start_up``). A resumed run starts
  from the list the interrupted run wrote (its skips count for the whole run); a new run removes an earlier
  run's list, which would otherwise pass for its own (logged).

Samples trained on but changed to fit ``max_length`` are listed too, not counted as bad: ``fewer_tiles``
(``FILE:LINE`` -> tiles per image) and ``truncated`` (``FILE:LINE`` -> ``tokens_lost`` and ``detail``: an answer
cut, with the data set's ``truncation='keep'``; with ``'drop'`` they are skipped as bad, reason ``truncated``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from itertools import chain
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.data.errors import TooManyBadSamplesError
from xtuner_plugins.errors import Refused

from .checkpointing import atomic_write
from .dataagree import sampled_digest
from .signatures import hook_option

__all__ = ['BadSampleHook']


def resumed_folder(runner) -> str:
    """The work folder of the run being resumed: the checkpoint's folder for ``--resume PATH`` (a file, or
    DeepSpeed's folder of that name), else this run's."""
    given = getattr(runner, '_load_from', None)
    if getattr(runner, '_resume', False) and isinstance(given, str) and given:
        return os.path.dirname(os.path.abspath(os.path.normpath(given)))
    return runner.work_dir


class BadSampleHook(Hook):
    """See the module docstring. ``summary_file`` is written in the work folder (rank 0)."""

    priority = 'HIGH'

    def __init__(self, summary_file: str = 'skipped_samples.json', manifest_file: str = 'data_manifest.json',
                 on_data_change: str = 'stop'):
        if on_data_change not in ('warn', 'stop'):
            raise Refused(f"BadSampleHook: on_data_change={on_data_change!r}; use 'warn' or 'stop'")
        self.summary_file, self.manifest_file, self.on_data_change = summary_file, manifest_file, on_data_change
        self.bad: Dict[str, str] = {}           # FILE:LINE -> reason, skipped while training, all ranks
        self.at_start: Dict[str, str] = {}      # refused when the files were read
        self.logged: Set[Tuple[int, str]] = set()
        self.reduced: Dict[str, int] = {}       # FILE:LINE -> tiles per image it was cut to (too long)
        self.foreign_summary: Optional[str] = None   # another program's file in the summary's place: not written
        self.truncated: Dict[str, dict] = {}    # FILE:LINE -> tokens_lost and detail of an answer cut, kept
        self.limit, self.total = None, 0

    def before_train(self, runner) -> None:
        self._earlier_summary(runner)
        dataset = runner.train_dataloader.dataset
        dataset = getattr(dataset, 'dataset', dataset)  # inside a packed data set
        self.limit = getattr(dataset, 'max_bad_fraction', None)
        problems = getattr(dataset, 'load_problems', [])
        self.at_start = {p.source or '?': p.reason for p in problems}
        distinct = getattr(dataset, 'num_distinct', None)
        self.total = (len(dataset) if distinct is None else distinct) + len(self.at_start)
        if hasattr(dataset, 'sources'):
            current = manifest(dataset)
            order = reading_order(runner.train_dataloader)
            if order:
                current['order'] = order
            from torch.utils.data import IterableDataset
            stream = isinstance(getattr(runner.train_dataloader, 'dataset', None), IterableDataset)
            self._manifest(runner, current, stream)

    def _earlier_summary(self, runner) -> None:
        """A resumed run takes over the interrupted run's skipped samples; a new run removes an earlier run's."""
        path = os.path.join(runner.work_dir, self.summary_file)
        if getattr(runner, '_resume', False) and not os.path.isfile(path):   # resumed from another folder's
            path = os.path.join(resumed_folder(runner), self.summary_file)
        if not os.path.isfile(path):
            return
        if getattr(runner, '_resume', False):
            try:
                with open(path, encoding='utf-8') as f:
                    earlier = json.load(f).get('skipped', {})
                self.bad.update({where: reason for reason, places in earlier.items() for where in places})
            except (OSError, ValueError, AttributeError) as e:
                print_log(f'{path}: the interrupted run\'s skipped samples do not read ({e}); counted from here on',
                          logger='current', level=30)
        elif not runs_list(path):   # another program's file of that name (a user's notes): never removed
            self.foreign_summary = path
            print_log(f'{path} is not a run\'s list of skipped samples (another program\'s file, in a --work-dir '
                      'that is not a run\'s folder?): left as it is, and this run\'s list is not written',
                      logger='current', level=30)
        elif get_dist_info()[0] == 0:
            os.remove(path)
            print_log(f'removed {path}: an earlier run\'s list of skipped samples, not this run\'s',
                      logger='current')

    def _manifest(self, runner, current: dict, stream: bool = False) -> None:
        """Compare with the resumed run's manifest (a stream's resume is StreamStateHook's to judge: only said)."""
        own = path = os.path.join(runner.work_dir, self.manifest_file)
        before = read_manifest(path)
        if getattr(runner, '_resume', False) and before is None:   # --resume PATH into another --work-dir: the
            # resumed run's manifest is beside its checkpoint (it went unchecked: other batches, other data)
            earlier = os.path.join(resumed_folder(runner), self.manifest_file)
            found = read_manifest(earlier)
            if found:
                path, before = earlier, found
        if before is False:   # a file of that name that is no run's manifest: another program's, left as it is
            print_log(f'{path} is not a run\'s data manifest (another program\'s file, in a --work-dir that is not a '
                      'run\'s folder?): left as it is, and this run\'s manifest is not written', logger='current',
                      level=30)
            return
        if getattr(runner, '_resume', False) and before is not None:
            changes = manifest_changes(before, current)
            if changes:
                message = f'the data changed since the run being resumed started ({path}): ' + '; '.join(changes)
                if self.on_data_change == 'stop' and not stream:
                    from .runstart import refuse
                    refuse(f'resume: {message}. Resume with the data and settings it started with; or go on all the '
                           f'same, knowing the epoch under way is not resumed exactly '
                           f'({hook_option(runner, "BadSampleHook", "on_data_change=warn")}); or start a new run '
                           f'from its weights (model.pretrained_pth=CHECKPOINT)')
                print_log(message + (' (a stream: its resume is the data stream state\'s to judge)' if stream else
                                     ' (on_data_change=\'warn\': going on)'), logger='current', level=30)
            for note in harmless_changes(before, current):
                print_log(note, logger='current', level=30)
        if get_dist_info()[0] == 0:  # atomically: the other ranks may be reading the resumed run's copy now
            atomic_write(json.dumps(current, indent=1), own)   # this run's folder (never the resumed run's)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        data = (data_batch or {}).get('data') or {}
        local = [tuple(s) for s in data.get('skipped') or ()]
        new = [s for s in dict.fromkeys(local) if s[0] not in self.bad]
        reduced = [tuple(r) for r in data.get('reduced') or () if r[0] not in self.reduced]
        truncated = [tuple(t) for t in data.get('truncated') or () if t[0] not in self.truncated]
        count = torch.tensor([len(new) + len(reduced) + len(truncated)], dtype=torch.long)
        all_reduce(count)
        if int(count.item()) == 0:
            return
        for source_rank, (entries, cut, trunc) in enumerate(all_gather_object((new, reduced, truncated))):
            self.reduced.update(dict(cut))
            for where, lost, detail in trunc:
                self.truncated[where] = dict(tokens_lost=lost, detail=detail)
            for where, reason in entries:
                if where in self.bad:
                    continue
                self.bad[where] = reason
                if (source_rank, reason) not in self.logged:
                    self.logged.add((source_rank, reason))
                    print_log(f'rank {source_rank}: skipped a bad sample (first with this reason there; the rest are '
                              f'counted): {where}: {reason}', logger='current', level=30)
        self._check(runner.iter + 1)

    def _check(self, iteration: int) -> None:
        bad = len(self.bad) + len(self.at_start)
        if self.limit is not None and bad > self.limit * self.total:
            raise TooManyBadSamplesError(
                f'{bad} of {self.total} samples are bad (all workers and ranks, at iteration {iteration}), over '
                f'max_bad_fraction={self.limit}: {self._by_reason()}; first: '
                f'{", ".join(f"{w} ({r})" for w, r in list(self.bad.items())[:5])}. '
                f'Run tools/check_dataset.py for the full list')

    def _by_reason(self) -> Dict[str, int]:
        return dict(Counter(list(self.bad.values()) + list(self.at_start.values())))

    def after_train_epoch(self, runner) -> None:
        self._summary(runner, f'after epoch {runner.epoch}')

    def after_train(self, runner) -> None:
        self._summary(runner, 'at the end of training')

    def _summary(self, runner, when: str) -> None:
        if self.reduced:
            print_log(f'{len(self.reduced)} samples too long for max_length were given fewer tiles per image '
                      f'{when} (listed in {self.summary_file})', logger='current')
        if self.truncated:
            lost = sum(t['tokens_lost'] for t in self.truncated.values())
            print_log(f'{len(self.truncated)} samples were trained with an answer cut to max_length {when} ({lost} '
                      f'tokens lost; listed under truncated in {self.summary_file}; the data set\'s '
                      f"truncation='drop' skips them)", logger='current', level=30)
        if not self.bad and not self.at_start and not self.reduced and not self.truncated:
            return
        path = os.path.join(runner.work_dir, self.summary_file)
        foreign = self.foreign_summary == path
        print_log(f'bad samples {when}: {len(self.bad) + len(self.at_start)} of {self.total} '
                  f'({self._by_reason()})' + ('' if foreign else f'; every FILE:LINE in {path}'), logger='current')
        if get_dist_info()[0] == 0 and not foreign:
            by_reason: Dict[str, list] = {}
            for where, reason in self.bad.items():
                by_reason.setdefault(reason, []).append(where)
            from xtuner_plugins.engine.checkpointing import atomic_write   # the list before it kept if this fails
            atomic_write(json.dumps(dict(total_samples=self.total, max_bad_fraction=self.limit, skipped=by_reason,
                                         at_start_up=self.at_start, fewer_tiles=self.reduced,
                                         truncated=self.truncated), indent=1), path)


def runs_list(path: str) -> bool:
    """Whether ``path`` is a run's list of skipped samples (a JSON object whose ``skipped`` maps reasons to
    places), not another program's file of that name."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get('skipped'), dict) and 'total_samples' in data


def read_manifest(path: str):
    """The manifest in ``path``: None where there is none, False for a file that is not one (another program's,
    which a run wrote over when its work folder was given as the data folder)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    return found if isinstance(found, dict) and isinstance(found.get('sources'), list) else False


def manifest(dataset) -> dict:
    """Per source of an ``InternVLDataset``: the annotation file's identity and the sample counts."""
    used = (dict(enumerate(dataset.items_per_source())) if hasattr(dataset, 'items_per_source')  # no sample read
            else Counter(dataset.record_at(i).source for i in range(len(dataset))))
    refused: Dict[str, Counter] = {}
    for problem in dataset.load_problems:
        refused.setdefault((problem.source or '?').rsplit(':', 1)[0], Counter())[problem.reason] += 1
    sources = []
    for i, (src, rng) in enumerate(zip(dataset.sources, dataset._source_ranges)):
        st = os.stat(src.annotation)
        sources.append(dict(annotation=os.path.abspath(src.annotation), size=st.st_size, mtime_ns=st.st_mtime_ns,
                            content=sampled_digest(src.annotation),
                            image_folder=os.path.abspath(src.image_folder) if src.image_folder else None,
                            repeat_time=src.repeat_time, samples=len(rng),
                            refused_at_start_up=dict(refused.get(src.annotation, {})), used=used.get(i, 0)))
    return dict(sources=sources, total_used=len(dataset))


def reading_order(dataloader) -> Dict[str, int]:
    """What orders a map-style data set's epoch and cuts it into batches: the ranks, the batch per rank and the
    sampler's seed and shuffling ({} for a stream, whose own state resumes it: ``streamstate.py``)."""
    from torch.utils.data import IterableDataset
    batch = getattr(dataloader, 'batch_size', None)
    if isinstance(getattr(dataloader, 'dataset', None), IterableDataset) or not isinstance(batch, int):
        return {}
    order = dict(ranks=get_dist_info()[1], batch_size=batch)
    sampler = getattr(dataloader, 'sampler', None)
    while sampler is not None and not hasattr(sampler, 'seed') and hasattr(sampler, 'sampler'):
        sampler = sampler.sampler   # under the EpochSampler that gives each epoch its number (its seed was not read)
    for key in ('seed', 'shuffle'):
        value = getattr(sampler, key, None)
        if isinstance(value, (bool, int)):
            order[key] = value
    lengths = getattr(sampler, 'length', None)   # what a length-grouped sampler orders by (max_length, images)
    if isinstance(lengths, np.ndarray):
        order['lengths'] = _digest(lengths)
    packs = getattr(dataloader.dataset, 'packs', None)   # a packed data set's packs, planned before training
    if isinstance(packs, list):
        order['packs'] = dict(count=len(packs), max_tokens=getattr(dataloader.dataset, 'max_tokens', None),
                              max_tiles=getattr(dataloader.dataset, 'max_tiles', None), digest=_digest(
                                  np.fromiter(chain(map(len, packs), chain.from_iterable(packs)), np.int64)))
    return order


def _digest(values: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


def manifest_changes(before: dict, now: dict) -> List[str]:
    """What differs between two manifests, one phrase each."""
    then, order = before.get('order') or {}, now.get('order') or {}
    moved = []
    # the samplers split each global batch among the ranks: 1 rank x 2 and 2 x 1 take the same samples
    if then and order and then['ranks'] * then['batch_size'] != order['ranks'] * order['batch_size']:
        moved.append(f'the batches: {then["ranks"]} ranks x {then["batch_size"]} samples then, {order["ranks"]} x '
                     f'{order["batch_size"]} now: the epoch under way is cut into other batches, so those skipped to '
                     f'resume are not the ones trained on (some of its samples are trained on twice, others not at '
                     f'all until the next epoch); resume with as many samples a step (ranks x batch size) for an '
                     f'exact resume')
    drawn = [f'{key} {then[key]!r} -> {order[key]!r}' for key in ('seed', 'shuffle')
             if key in then and key in order and then[key] != order[key]]
    packs, now_packs = then.get('packs'), order.get('packs')
    if packs and now_packs and packs['digest'] != now_packs['digest']:
        budgets = ' '.join(f'{k} {packs.get(k)!r} -> {now_packs.get(k)!r}' for k in ('max_tokens', 'max_tiles')
                           if packs.get(k) != now_packs.get(k))
        moved.append(f'the packs: {packs["count"]} then, {now_packs["count"]} now{f" ({budgets})" if budgets else ""}'
                     f', packed otherwise: the epoch under way is cut into other packs, so those skipped to resume '
                     f'are not the ones trained on (some of its samples are trained on twice, others not at all until '
                     f'the next epoch); resume with the packing it started with')
    elif 'lengths' in then and 'lengths' in order and then['lengths'] != order['lengths']:
        drawn.append('lengths (what it orders by: max_length, the tiles or the images changed)')
    if drawn:   # the epoch under way drawn in another order: the batches skipped are not those trained on
        moved.append(f'the sampler\'s {", ".join(drawn)}: the epoch under way is drawn in another order, so those '
                     f'skipped to resume are not the ones trained on (some of its samples are trained on twice, '
                     f'others not at all until the next epoch); resume with the same sampler settings')
    then_sources, now_sources = before.get('sources', []), now.get('sources', [])
    then_paths, now_paths = [s['annotation'] for s in then_sources], [s['annotation'] for s in now_sources]
    moved_alike = len(then_sources) == len(now_sources) and all(
        a['annotation'] == b['annotation'] or _alike(a, b) for a, b in zip(then_sources, now_sources))
    if then_paths == now_paths or moved_alike:   # by place: a file may be named twice (a meta file's two entries)
        pairs = list(zip(then_paths, then_sources, now_sources))
        changes = []
    else:
        old, new = dict(zip(then_paths, then_sources)), dict(zip(now_paths, now_sources))
        changes = [f'{p}: no longer used' for p in old if p not in new] + [f'{p}: new' for p in new if p not in old]
        if not changes:   # each source's fractional subset is drawn by its place, with the seed plus it
            changes.append(f'the annotation files are named in another order or number: {then_paths} then, '
                           f'{now_paths} now')
        pairs = [(p, old[p], new[p]) for p in new if p in old]
    for p, a, b in pairs:
        diff = [f'{k} {a.get(k)!r} -> {b.get(k)!r}' for k in ('size', 'mtime_ns', 'content', 'image_folder',
                                                              'repeat_time', 'samples', 'used')
                if a.get(k) != b.get(k) and (k != 'content' or k in a)]   # (no content in an older manifest)
        if diff and not _alike(a, b):
            changes.append(f'{p}: ' + ', '.join(diff))
    if 'total_used' in before and before.get('total_used') != now.get('total_used') and not changes:
        changes.append(f'the samples used: {before["total_used"]} then, {now.get("total_used")} now')
    return changes + moved


def harmless_changes(before: dict, now: dict) -> List[str]:
    """A line for each source (by place) whose annotation file moved, whose modification time changed or whose image
    folder is another, its size, sampled content and samples alike (a copy to a job's own disk, one that did not
    keep times, images moved): the same samples in the same order, no change to stop for."""
    lines = []
    for a, b in zip(before.get('sources', []), now.get('sources', [])):
        if not _alike(a, b):
            continue
        what = [f'moved from {a["annotation"]}'] if a['annotation'] != b['annotation'] else []
        what += ['its modification time changed'] if a.get('mtime_ns') != b.get('mtime_ns') else []
        what += ([f'its image folder is {b.get("image_folder")} (was {a.get("image_folder")}; the images are not '
                  f'compared)'] if a.get('image_folder') != b.get('image_folder') else [])
        if what:
            lines.append(f'{b["annotation"]}: {", ".join(what)} since the run being resumed started, its size and '
                         f'sampled content did not: resumed on it')
    return lines


def _alike(a: dict, b: dict) -> bool:
    """Whether two manifest entries hold the same samples in the same order: size, sampled content (known), repeats
    and counts alike, whatever their path, modification time and image folder."""
    return 'content' in a and all(a.get(k) == b.get(k) for k in ('size', 'content', 'repeat_time', 'samples', 'used'))
