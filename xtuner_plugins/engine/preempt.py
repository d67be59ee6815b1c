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
``--cfg-options resume=True`` (:func:`resume_requeued`, ``resume.py``; ``tools/slurm/*.sbatch``).

The hook is added to every run under Slurm (``SLURM_JOB_ID`` set) when training starts (:func:`apply_preempt_patches`,
called from ``runtime.py``); ``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1`` adds it elsewhere (``torchrun`` passes SIGTERM on to
its ranks), ``=0`` never. A DataLoader worker (forked, it inherits the handler) ignores the signal: its rank ends it.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log

__all__ = ['PREEMPTED_EXIT_CODE', 'SAVE_ON_SIGNAL_ENV', 'SaveOnSignalHook', 'apply_preempt_patches', 'wanted']

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
SAVE_ON_SIGNAL_ENV = 'XTUNER_PLUGINS_SAVE_ON_SIGNAL'
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
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
        from xtuner_plugins.engine.runstart import accumulation
        if (runner.iter + 1) % accumulation(runner.cfg):  # not at an optimizer step: the next one is
            return
        name = signal.Signals(self.received[0]).name if self.received else 'a signal (to another rank)'
        saved = self._save(runner)
        if runner.rank == 0:
            what = (f'saved {saved}; resume=True in {runner.work_dir} continues from it' if saved else
                    'nothing saved (no iteration checkpoint hook); the last checkpoint stays')
            line = f'train: stopped by {name} at iteration {runner.iter + 1}: {what}'
            print_log(line, logger='current')
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


def resume_requeued(runner) -> bool:
    """A requeued job continues from its work folder's last checkpoint, as with ``resume=True`` (a ``--resume``
    checkpoint of its first run is older); False, changing nothing, when it is a first run or nothing was saved."""
    from xtuner_plugins.engine.resume import POINTER
    count = requeued()
    if not count or not os.path.isfile(os.path.join(runner.work_dir, POINTER)):
        return False
    runner._resume, runner._load_from = True, None
    print_log(f'slurm: job {os.environ.get("SLURM_JOB_ID", "?")} requeued ({count}x): resuming from the last '
              f'checkpoint of {runner.work_dir} (resume=True)', logger='current')
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
    newly = [p.__name__.lstrip('_') for p in (_patch_train,) if p()]
    _applied.extend(newly)
    return newly
