"""Bad samples counted once each, over every DataLoader worker and rank, against the run's limit.

The data set counts the samples that fail to load in its own process (``InternVLDataset._count_failure``): a
DataLoader worker or another rank sees only its share, so 40 % bad images with a limit of 30 % would pass
with two workers. Each batch therefore lists what was skipped to make it (``skipped``: ``(FILE:LINE,
reason)``, see ``data/collate.py``), and :class:`BadSampleHook` adds these up in the training processes:

* after every iteration the ranks agree on whether any skipped something new (one all-reduce of a count);
  only then are the new entries gathered. Every rank holds the same table, so every rank stops together;
* a sample is counted once, whatever the epoch or the number of times it is drawn; the limit is the data
  set's ``max_bad_fraction`` of all its samples (those refused at start-up included), for the whole run;
* each reason is logged with its ``FILE:LINE`` the first time it is seen on each rank, then only counted;
* after every epoch and at the end: a summary by reason, also written to ``WORK_DIR/skipped_samples.json``
  (every ``FILE:LINE`` with its reason; those refused at start-up under ``at_start_up``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, Set, Tuple

import torch
from mmengine.dist import all_gather_object, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.data.errors import TooManyBadSamplesError

__all__ = ['BadSampleHook']


class BadSampleHook(Hook):
    """See the module docstring. ``summary_file`` is written in the work folder (rank 0)."""

    priority = 'HIGH'

    def __init__(self, summary_file: str = 'skipped_samples.json'):
        self.summary_file = summary_file
        self.bad: Dict[str, str] = {}           # FILE:LINE -> reason, skipped while training, all ranks
        self.at_start: Dict[str, str] = {}      # refused when the files were read
        self.logged: Set[Tuple[int, str]] = set()
        self.limit, self.total = None, 0

    def before_train(self, runner) -> None:
        dataset = runner.train_dataloader.dataset
        dataset = getattr(dataset, 'dataset', dataset)  # inside a packed data set
        self.limit = getattr(dataset, 'max_bad_fraction', None)
        problems = getattr(dataset, 'load_problems', [])
        self.at_start = {p.source or '?': p.reason for p in problems}
        distinct = getattr(dataset, 'num_distinct', None)
        self.total = (len(dataset) if distinct is None else distinct) + len(self.at_start)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        local = [tuple(s) for s in ((data_batch or {}).get('data') or {}).get('skipped') or ()]
        new = [s for s in dict.fromkeys(local) if s[0] not in self.bad]
        count = torch.tensor([len(new)], dtype=torch.long)
        all_reduce(count)
        if int(count.item()) == 0:
            return
        rank, _ = get_dist_info()
        for source_rank, entries in enumerate(all_gather_object(new)):
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
        if not self.bad and not self.at_start:
            return
        path = os.path.join(runner.work_dir, self.summary_file)
        print_log(f'bad samples {when}: {len(self.bad) + len(self.at_start)} of {self.total} '
                  f'({self._by_reason()}); every FILE:LINE in {path}', logger='current')
        if get_dist_info()[0] == 0:
            by_reason: Dict[str, list] = {}
            for where, reason in self.bad.items():
                by_reason.setdefault(reason, []).append(where)
            with open(path, 'w', encoding='utf-8') as f:
                json.dump(dict(total_samples=self.total, max_bad_fraction=self.limit, skipped=by_reason,
                               at_start_up=self.at_start), f, indent=1)
