"""A run told to stop by a signal saves a checkpoint first, then ends: Slurm's scancel, preemption, time limit and
``scontrol requeue`` send SIGTERM to every process of the job, then SIGKILL once the grace time is over
(``KillWait``, 30 s by default; a preemption's ``GraceTime``); ``sbatch --signal=USR1@120`` asks for SIGUSR1 two
minutes before the time limit.

:class:`SaveOnSignalHook` takes SIGTERM and SIGUSR1 from the start of the run; the rank that gets one notes it,
and at the end of the iteration under way the ranks agree (one tiny all-reduce per iteration), so they all save
the same iteration: ``iter_N.pth`` through the config's ``CheckpointHook`` (the ``last_checkpoint`` pointer,
``max_keep_ckpts``; skipped when it has just saved this iteration), at an optimizer step (with gradient
accumulation the run goes on to the next one). Rank 0 writes one line, ``train: stopped by SIGTERM at iteration
N: saved PATH; resume=True in WORK_DIR continues from it``, and every rank exits with code 143 (128 + SIGTERM).
When the grace time ends first, SIGKILL leaves the last complete checkpoint: every checkpoint write is atomic
(``checkpointing.py``). A job submitted with ``sbatch --requeue`` goes back to the queue when preempted, and its
next run (``SLURM_RESTART_COUNT`` > 0) continues from its work folder's ``last_checkpoint`` by itself, as with
``--cfg-options resume=True`` (:func:`resume_requeued`, ``resume.py``; ``tools/slurm/*.sbatch``), but only from a
checkpoint this job saved: the first run of a job in a work folder records the job there (``slurm_job.json``, its
``SLURM_JOB_ID``, written by rank 0 when training starts), and a pointer older than that record, or a record of
another job, was left by an earlier job (this job's first run saved nothing): the requeued run then starts as its
first run did (its command's ``resume``/``--resume``), with a log line saying why. Both times are the file
system's (the files' modification times), so the nodes' clocks do not matter.

The hook is added to every run under Slurm (``SLURM_JOB_ID`` set) when training starts (:func:`apply_preempt_patches`,
called from ``runtime.py``); ``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1`` adds it elsewhere (``torchrun`` passes SIGTERM on to
its ranks), ``=0`` never.

A DataLoader worker gets Slurm's SIGTERM too (every process of the job), and torch's worker loop sets a handler of
its own that ends the worker at once: its rank's SIGCHLD handler then raised "DataLoader worker ... is killed by
signal: Terminated" in the middle of the iteration, and nothing was saved (the base configs run 4 workers). Where
the hook is wanted, a worker lets the first SIGTERM pass and puts torch's handler back
(:func:`_patch_worker_signals`): its rank ends it when it stops, and at exit (:func:`end_workers`), as its iterator
would; a worker that does not stop when told gets torch's ``terminate``, which its handler then takes.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import time
import weakref
from typing import List, Optional, Tuple

from mmengine.hooks import Hook
from mmengine.logging import print_log

__all__ = ['JOB_RECORD', 'PREEMPTED_EXIT_CODE', 'SAVE_ON_SIGNAL_ENV', 'SaveOnSignalHook', 'apply_preempt_patches',
           'requeue_decision', 'resume_requeued', 'wanted']

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
SAVE_ON_SIGNAL_ENV = 'XTUNER_PLUGINS_SAVE_ON_SIGNAL'
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
JOB_RECORD = 'slurm_job.json'  # the Slurm job that first trained in a work folder (module docstring)
_PATCH_MARK = '_xtuner_plugins_preempt_patch'
_applied: List[str] = []


def wanted(env=None) -> bool:
    """Whether a run in ``env`` (this environment) gets :class:`SaveOnSignalHook` (module docstring)."""
    env = os.environ if env is None else env
    chosen = env.get(SAVE_ON_SIGNAL_ENV, '')
    return chosen == '1' or (chosen != '0' and bool(env.get('SLURM_JOB_ID')))


class SaveOnSignalHook(Hook):
    """See the module docstring."""

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW): its save of this iteration is seen

    def __init__(self) -> None:
        self.received: List[int] = []
        self._pid = os.getpid()
        self._previous = {}

    # -- the signal
    def _on_signal(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # not in a forked DataLoader worker
            self.received.append(signum)

    def before_run(self, runner) -> None:
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def after_run(self, runner) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _asked(self) -> bool:
        """Whether any rank got a signal (every rank takes part: one all-reduce of a flag)."""
        import torch
        from mmengine import dist
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op='max')
        return bool(flag.item())

    # -- the stop
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self._asked() or runner.iter + 1 >= runner.max_iters:  # the last iteration: the run ends anyway
            return
        from xtuner_plugins.engine.length import accumulation
        if (runner.iter + 1) % accumulation(runner.cfg):  # not at an optimizer step: the next one is
            return
        name = signal.Signals(self.received[0]).name if self.received else 'a signal (to another rank)'
        saved = self._save(runner)
        if runner.rank == 0:
            what = (f'saved {saved}; resume=True in {runner.work_dir} continues from it' if saved else
                    'nothing saved (no iteration checkpoint hook); the last checkpoint stays')
            line = f'train: stopped by {name} at iteration {runner.iter + 1}: {what}'
            print_log(line, logger='current')
        end_workers()
        raise SystemExit(PREEMPTED_EXIT_CODE)

    @staticmethod
    def _save(runner) -> Optional[str]:
        """The checkpoint of this iteration (saved now unless the checkpoint hook has just saved it)."""
        from mmengine.hooks import CheckpointHook
        hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook) and not h.by_epoch), None)
        if hook is None:
            return None
        name = hook.filename_tmpl.format(runner.iter + 1)
        if not (hook.last_ckpt and os.path.basename(str(hook.last_ckpt)) == name):
            runner.logger.info(f'Saving checkpoint at {runner.iter + 1} iterations (stopped by a signal)')
            hook._save_checkpoint(runner)
        return str(hook.last_ckpt)


def requeued(env=None) -> int:
    """How many times Slurm has requeued this job (``SLURM_RESTART_COUNT``; 0 for its first run)."""
    count = (os.environ if env is None else env).get('SLURM_RESTART_COUNT', '0')
    return int(count) if count.isdigit() else 0


def job_record(work_dir: str) -> Optional[Tuple[str, float]]:
    """``(job id, when)`` of ``WORK_DIR/slurm_job.json`` (``when``: its modification time); None without one."""
    path = os.path.join(work_dir, JOB_RECORD)
    try:
        with open(path, encoding='utf-8') as f:
            job = json.load(f)['job']
        return str(job), os.stat(path).st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None


def requeue_decision(work_dir: str, env=None) -> Tuple[bool, str]:
    """``(resume, line)``: whether a run in ``work_dir`` resumes from its ``last_checkpoint`` because its job was
    requeued, and the log line saying so or why not (module docstring); ``(False, '')`` for a job's first run, or
    a work folder without a pointer."""
    from xtuner_plugins.engine.resume import POINTER
    env = os.environ if env is None else env
    count, job = requeued(env), env.get('SLURM_JOB_ID', '?')
    pointer = os.path.join(work_dir, POINTER)
    if not count or not os.path.isfile(pointer):
        return False, ''
    head = f'slurm: job {job} requeued ({count}x)'
    record = job_record(work_dir)
    if record is not None and record[0] == job and os.stat(pointer).st_mtime >= record[1]:
        return True, f'{head}: resuming from the last checkpoint of {work_dir} (resume=True)'
    why = (f'{pointer} is older than this job\'s first run in it ({os.path.join(work_dir, JOB_RECORD)})'
           if record is not None and record[0] == job else
           f'{os.path.join(work_dir, JOB_RECORD)} names job {record[0]}' if record is not None else
           f'{work_dir} has no {JOB_RECORD} (written when a job starts training)')
    return False, (f'{head}: not resuming from {pointer}: {why}, so it was left by an earlier job, not saved by this '
                   f'one; this run starts as the job\'s first run did')


def note_job(runner, env=None) -> None:
    """Rank 0 records this Slurm job in the work folder (``slurm_job.json``) unless it is there already, or the
    run lock refused this run (the work folder is another run's)."""
    from mmengine.dist import get_rank

    from xtuner_plugins.engine.checkpointing import atomic_write
    from xtuner_plugins.engine.runlock import RunLockHook
    env = os.environ if env is None else env
    job = env.get('SLURM_JOB_ID')
    if not job or get_rank() != 0 or any(isinstance(h, RunLockHook) and h.refused for h in runner.hooks):
        return
    record = job_record(runner.work_dir)
    if record is None or record[0] != job:
        atomic_write(json.dumps(dict(job=job, started=time.strftime('%Y-%m-%d %H:%M:%S'))),
                     os.path.join(runner.work_dir, JOB_RECORD))


def resume_requeued(runner) -> bool:
    """A requeued job continues from its work folder's last checkpoint, as with ``resume=True`` (a ``--resume``
    checkpoint of its first run is older), when this job saved it; False, changing nothing, when it is a first
    run, nothing was saved, or only an earlier job did (a log line says so). Rank 0 decides for every rank, then
    records the job (:func:`note_job`)."""
    from mmengine.dist import broadcast_object_list, get_dist_info
    rank, world_size = get_dist_info()
    decision = [requeue_decision(runner.work_dir) if rank == 0 else None]
    if world_size > 1:
        broadcast_object_list(decision, src=0)
    resume, line = decision[0]
    note_job(runner)
    if line:
        print_log(line, logger='current')
    if resume:
        runner._resume, runner._load_from = True, None
    return resume


#: the DataLoader iterators with workers of this process (where :func:`wanted`), ended in order at exit
_ITERATORS: 'weakref.WeakSet' = weakref.WeakSet()


def end_workers() -> None:
    """End the workers of this process's DataLoader iterators the way their iterator ends them (told to stop,
    joined; one that does not stop gets torch's ``terminate``), before the rank exits: a worker lets the first
    SIGTERM pass (:func:`_patch_worker_signals`), so multiprocessing's own ``terminate`` at exit must not be the
    first one it gets (its ``join`` would wait for ever)."""
    for iterator in list(_ITERATORS):
        try:
            iterator._shutdown_workers()
        except Exception:   # noqa: BLE001 - ending anyway: the rank is exiting
            pass


def _patch_worker_signals() -> bool:
    """torch's worker loop calls ``signal_handling._set_worker_signal_handlers`` (through the module, in the worker,
    forked with this process's modules) before the worker's first sample: after it, where :func:`wanted`, the
    first SIGTERM only puts torch's handlers back (the next SIGTERM: from the rank, torch ends the worker quietly;
    from anyone else, the signal does). The rank records its iterators, and ends their workers at exit and when
    the hook stops it (:func:`end_workers`)."""
    from torch.utils.data import dataloader
    from torch.utils.data._utils import signal_handling
    original = signal_handling._set_worker_signal_handlers
    if getattr(original, _PATCH_MARK, False):
        return False

    def first_sigterm_passes(signum, frame) -> None:
        original()

    @functools.wraps(original)
    def set_worker_signal_handlers(*args, **kwargs):
        original(*args, **kwargs)
        if wanted():
            signal.signal(signal.SIGTERM, first_sigterm_passes)

    iterator_class = dataloader._MultiProcessingDataLoaderIter
    init = iterator_class.__init__

    @functools.wraps(init)
    def recorded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if wanted():
            _ITERATORS.add(self)

    for fn in (set_worker_signal_handlers, recorded_init):
        setattr(fn, _PATCH_MARK, True)
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers
    iterator_class.__init__ = recorded_init
    atexit.register(end_workers)   # after multiprocessing's, so run before it
    return True


def _patch_train() -> bool:
    """Both runners' ``train`` add the hook (once) when :func:`wanted`."""
    from mmengine.runner import FlexibleRunner, Runner
    if getattr(Runner.train, _PATCH_MARK, False):
        return False
    for cls in (Runner, FlexibleRunner):
        original = cls.train

        @functools.wraps(original)
        def train(self, _original=original):
            if wanted() and not any(isinstance(h, SaveOnSignalHook) for h in self.hooks):
                self.register_hook(SaveOnSignalHook())
            resume_requeued(self)
            return _original(self)

        setattr(train, _PATCH_MARK, True)
        cls.train = train
    return True


def apply_preempt_patches() -> List[str]:
    """Apply the patch once (module docstring); returns the names newly applied."""
    newly = [p.__name__.lstrip('_') for p in (_patch_train, _patch_worker_signals) if p()]
    _applied.extend(newly)
    return newly
