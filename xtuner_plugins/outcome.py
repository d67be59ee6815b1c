"""What came of a training run: ``xtuner train`` **exits 0 even when training crashed**, so a run is judged by
what it left behind (:func:`judge`): a traceback or ``ChildFailedError`` in its output, a run guard's line,
iterations missing (MMEngine's ``Iter(train) [k/N]`` lines or the console's, :func:`parse_log`) or no final
checkpoint (:func:`find_checkpoints`). :mod:`xtuner_plugins.launch` starts the runs judged here and reads what one
left behind into a :class:`TrainOutcome` (its ``job_outcome``); nothing here knows how a run is started.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

CRASH_MARKS = ('Traceback (most recent call last)', 'ChildFailedError')
# torchrun's agents meet at exit through the store of node 0's agent; when that agent has already gone, another
# node's agent logs this with a traceback (each line behind the record's prefix) after its workers all
# succeeded, and exits 0: no crash (seen on a loaded 2-core machine in the two-node test).
EXIT_BARRIER_ERROR = 'Error waiting on exit barrier'
# lines of the run guards (engine/runlock.py, engine/watchdog.py): a run refused or stopped by them
GUARD_MARKS = {' is in use by another run: ': 'refused: the work folder is in use by another run',
               'train: STALLED: ': 'a rank stalled'}

# MMEngine's iteration line (the log file) and the console's progress line (engine/progress.py)
ITER_LINE = re.compile(r'Iter\(train\)\s*\[\s*(\d+)/(\d+)\]|(?:^| - INFO - )iter (\d+)/(\d+)(?:\s|$)')
_LOSS_IN_LINE = re.compile(r'(?<![\w/])loss:?\s+([-+0-9.eE]+|nan|inf)\b')
_CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')


def deepspeed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder DeepSpeed saved a checkpoint into (it holds ``*model_states.pt``)."""
    return os.path.isdir(path) and any(name.endswith('model_states.pt') for name in os.listdir(path))


def checkpoint_number(path: str) -> Optional[Tuple[str, int]]:
    """``('iter', N)`` or ``('epoch', N)`` for a path named ``iter_N.pth`` or ``epoch_N.pth``; None otherwise."""
    m = _CKPT_NAME.match(os.path.basename(os.fspath(path).rstrip(os.sep)))
    return (m.group(1), int(m.group(2))) if m else None


def find_checkpoints(work_dir: str) -> List[str]:
    """``iter_N.pth``/``epoch_N.pth`` in ``work_dir`` (files, or non-empty DeepSpeed folders), ordered by N."""
    found = []
    for name in os.listdir(work_dir) if os.path.isdir(work_dir) else []:
        number = checkpoint_number(name)
        path = os.path.join(work_dir, name)
        if number and (os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))):
            found.append((number[1], path))
    return [p for _, p in sorted(found)]


def latest_vis_dir(work_dir: str) -> Optional[str]:
    dirs = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data')))  # <timestamp>/vis_data
    return dirs[-1] if dirs else None


def read_scalars(work_dir: str) -> List[dict]:
    """Records of the newest ``<work_dir>/<timestamp>/vis_data/scalars.json`` (written by rank 0)."""
    vis = latest_vis_dir(work_dir)
    path = os.path.join(vis, 'scalars.json') if vis else ''
    records = []
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a blank or half-written last line
    return records


def parse_log(log: str):
    """``(losses {iter: loss}, max_iters, last_iter)`` from MMEngine's ``Iter(train) [k/N] ... loss: x`` lines
    (the run's log file) or the console's ``iter k/N  loss x`` lines (``engine/progress.py``).

    The logged loss is ``LogProcessor``'s mean over ``window_size`` iterations (10 by default): compare
    per-iteration losses with ``log_processor=dict(by_epoch=False, window_size=1)``.
    """
    losses, max_iters, last_iter = {}, None, None
    for line in log.splitlines():
        m = ITER_LINE.search(line)
        if not m:
            continue
        k, n = (int(g) for g in (m.group(1, 2) if m.group(1) else m.group(3, 4)))
        max_iters, last_iter = n, max(k, last_iter or 0)
        lm = _LOSS_IN_LINE.search(line[m.end():])
        if lm:
            losses[k] = float(lm.group(1))
    return losses, max_iters, last_iter


@dataclass
class TrainOutcome:
    """What a training run left behind. Judge ``failed``/``failure_reasons``, not ``returncode``."""

    command: List[str]
    returncode: Optional[int]
    timed_out: bool
    wall_s: float
    work_dir: str
    log_path: str
    log: str
    checkpoints: List[str] = field(default_factory=list)
    losses: Dict[int, float] = field(default_factory=dict)  # iteration -> logged (rank 0) loss
    scalars: List[dict] = field(default_factory=list)  # records of vis_data/scalars.json
    max_iters: Optional[int] = None  # N of the log's "Iter(train) [k/N]"
    last_iter: Optional[int] = None  # largest k logged
    failure_reasons: List[str] = field(default_factory=list)
    pid: Optional[int] = None  # the launcher's, also its process group's

    @property
    def failed(self) -> bool:
        return bool(self.failure_reasons)

    @property
    def ok(self) -> bool:
        return not self.failure_reasons

    @property
    def final_checkpoint(self) -> Optional[str]:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def has_traceback(self) -> bool:
        """A Python traceback in the log, other than one of torchrun's exit barrier (``EXIT_BARRIER_ERROR``)."""
        lines = self.log.splitlines()
        barrier = {line[:line.index('] ') + 2] for line in lines if EXIT_BARRIER_ERROR in line and '] ' in line}
        return any(CRASH_MARKS[0] in line and not any(line.startswith(p) for p in barrier) for line in lines)

    def vis_dir(self) -> Optional[str]:
        return latest_vis_dir(self.work_dir)

    def full_log(self) -> str:
        """The newest run log MMEngine wrote, ``<work_dir>/<timestamp>/<timestamp>.log`` (rank 0's; '' when
        none): the environment, the config and every ``Iter(train)`` line, which the console does not show."""
        logs = sorted(glob.glob(os.path.join(self.work_dir, '*', '*.log')))
        logs = [p for p in logs if os.path.basename(p) == os.path.basename(os.path.dirname(p)) + '.log']
        if not logs:
            return ''
        with open(logs[-1], encoding='utf-8', errors='replace') as f:
            return f.read()

    def scalar_series(self, name: str) -> Dict[int, float]:
        """``{step: value}`` of one scalar of ``vis_data/scalars.json`` (e.g. ``tokens_per_sec``)."""
        return {int(r.get('step', r.get('iter'))): float(r[name]) for r in self.scalars if name in r}

    def summary(self, tail: int = 60) -> str:
        """For error messages: the command, the reasons and the end of the log."""
        return (f'command: {" ".join(self.command)}\nreturncode={self.returncode} timed_out={self.timed_out} '
                f'wall={self.wall_s:.1f}s failure_reasons={self.failure_reasons}\n--- log tail ({self.log_path}) '
                '---\n' + '\n'.join(self.log.splitlines()[-tail:]))


#: the last line of a Python traceback: ``OSError: [Errno 28] No space left on device``, ``a.b.SomeError: ...``
#: (indented, or after torchrun's ``[rank0]: ``)
_ERROR_LINE = re.compile(r'^\s*(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)')


def judge(outcome: TrainOutcome, require_checkpoint: bool = True, expect_iters: Optional[int] = None,
          lead: bool = True) -> List[str]:
    """Why the run failed (empty: it did not). ``lead``: the node of rank 0, which logs iterations and saves
    (a node without it fails only on a timeout, an exit code or a crash in its output)."""
    names = [os.path.basename(p) for p in outcome.checkpoints]
    # tools/train.py's own one-line cause (a full disk at a save, bad samples, a loss no longer finite) first: the
    # marks below say that it failed, this line why
    stated = next((line.split('train: ', 1)[1].strip() for line in outcome.log.splitlines()
                   if line.startswith(('train: FAILED', 'train: refused')) and ': ' in line), None)
    reasons = ([stated] if stated else []) + (['timed out'] if outcome.timed_out else [])
    if outcome.returncode not in (0, None):
        reasons.append(f'exit code {outcome.returncode}')
    if outcome.has_traceback:   # with the exception it ended in, where no stated line says why
        error = None if stated else next((line.strip() for line in reversed(outcome.log.splitlines())
                                          if _ERROR_LINE.match(line)), None)
        reasons.append(f'traceback in the log ({error[:300]})' if error else 'traceback in the log')
    if CRASH_MARKS[1] in outcome.log:
        reasons.append('torchrun reported a failed child')
    reasons += [reason for mark, reason in GUARD_MARKS.items()   # (said already where the stated line is theirs)
                if mark in outcome.log and not (stated and mark in stated)]
    if not lead:
        return reasons
    target = expect_iters or outcome.max_iters
    if target is None:
        reasons.append('no training iteration was logged')
    elif (outcome.last_iter or 0) < target and f'iter_{target}.pth' not in names:
        # the last iteration is logged only when the log interval divides it: its checkpoint is proof too
        reasons.append(f'the last iteration logged is {outcome.last_iter} of {target}')
    if require_checkpoint:
        if not names:
            reasons.append('no checkpoint saved')
        elif target is not None and f'iter_{target}.pth' not in names and not any(
                n.startswith('epoch_') for n in names):
            reasons.append(f'final checkpoint iter_{target}.pth missing (found {names})')
    return reasons
