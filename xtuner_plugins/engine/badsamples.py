"""What a run trains on: a manifest of its data, and bad samples counted once each over every DataLoader worker
and rank, against the run's limit.

**Manifest.** At the start, ``WORK_DIR/data_manifest.json`` records what the run trains on and how its epochs are
cut (``manifest.py``). A run that resumes compares it with the manifest the interrupted run wrote and stops
(``on_data_change='stop'``, the default) or warns (``'warn'``) when the data changed under it, or is cut into other
batches or packs or drawn in another order, naming what; a harmless change (a file moved, its content the same) is
said in a warning; so is any change under a stream (online packing, shards), whose resume ``streamstate.py`` judges.

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

import json
import os
from collections import Counter
from typing import Dict, Optional, Set, Tuple

import torch
from mmengine.dist import all_gather_object, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.data.errors import TooManyBadSamplesError
from xtuner_plugins.errors import Refused

from .checkpointing import atomic_write
from .manifest import harmless_changes, manifest, manifest_changes, read_manifest, reading_order, resumed_folder
from .signatures import hook_option

__all__ = ['BadSampleHook']


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
            except (OSError, ValueError, AttributeError, TypeError) as e:   # (TypeError: a list of another shape)
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
        if before is False and path == own and getattr(runner, '_resume', False) and _a_runs_folder(own):
            # the run's own, damaged (cut short, edited), or a file of the data folder given as the work folder:
            # left as it is (no file that may be a user's is written over), said as what it may be and what follows
            print_log(f'{path} does not read as the run\'s data manifest (cut short or edited since, or another '
                      'program\'s file): left as it is; this resume is not checked against the data the run started '
                      'with, nor is a later one until it is moved away (the run then writes its own)',
                      logger='current', level=30)
            return
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


def _a_runs_folder(manifest_path: str) -> bool:
    """Whether the folder of ``manifest_path`` is a run's (its checkpoints, or the pointer to them): a data manifest
    there that does not read is most likely that run's, damaged."""
    from xtuner_plugins.outcome import find_checkpoints
    folder = os.path.dirname(manifest_path)
    return bool(find_checkpoints(folder)) or os.path.isfile(os.path.join(folder, 'last_checkpoint'))
