"""One run per work folder: ``WORK_DIR/run.lock``.

Two runs writing into one work folder replace each other's checkpoints, ``last_checkpoint`` and
``data_manifest.json`` without a word. :class:`RunLockHook` (in ``configs/_base_/default_runtime.py``) makes
rank 0 take a lock file in the work folder before the run writes anything there (MMEngine's runner dumps the
config at the end of its construction: the lock is taken just before, the hooks are registered by then),
holding the run's pid, host, start time and command. It works the same under ``xtuner train``, ``torchrun``
and ``tools/train.py`` (the lock is taken inside the training processes, by global rank 0 only):

* a second run while the first is alive is refused on every rank, with one line naming the first run and a
  non-zero exit (``SystemExit``, no traceback); nothing of the first run is touched;
* a lock left by a process that is gone (killed, out of memory) on this host is taken over with a warning,
  so ``--resume`` after a crash just works; a lock of another host cannot be checked from here: the message
  says to delete the file once that run is known to be over;
* the lock is removed when the run ends, also when it fails with an exception (``atexit``), and when the stall
  watchdog stops the run (``watchdog.py``);
* a run whose checkpoints go elsewhere (``default_hooks.checkpoint.out_dir``: MMEngine saves to
  ``out_dir/<the work folder's name>``, which runs in ``a/run`` and ``c/run`` share) locks that folder too.

The lock file itself (``lockfile.py``: :class:`~xtuner_plugins.engine.lockfile.RunLock`) tells a gone run's lock
from a live one's and takes a gone one over. This module holds the hook and MMEngine's ``dump_config`` patched to
take the lock before the config is written into the work folder (applied at import).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.engine.lockfile import RunLock, RunLockError

__all__ = ['RunLockHook']

_PATCH_MARK = '_xtuner_plugins_runlock_patch'


class RunLockHook(Hook):
    """See the module docstring. Rank 0 takes the lock when the runner dumps its config (or at ``before_run``
    at the latest); at ``before_run`` every rank learns whether it was refused and leaves; ``after_run``
    releases it."""

    priority = 'HIGHEST'

    def __init__(self) -> None:
        self.lock: Optional[RunLock] = None
        self.out_lock: Optional[RunLock] = None   # the checkpoint folder's, when out_dir puts it elsewhere
        self.refused = ''

    def acquire(self, runner) -> None:
        """Global rank 0 takes the lock (the other ranks return)."""
        from mmengine.dist import get_rank
        if self.lock is not None or self.refused or get_rank() != 0:
            return
        lock = RunLock(runner.work_dir)
        try:
            lock.acquire()
            self.lock = lock
        except RunLockError as exc:
            self.refused = str(exc)
            return
        folder = _checkpoint_folder(runner)
        if folder:   # out_dir/<the work folder's name>: runs in a/run and c/run share it
            lock = RunLock(folder)
            try:
                lock.acquire()
                self.out_lock = lock
            except RunLockError as exc:
                self.lock.release()
                self.lock = None
                self.refused = f'the checkpoint folder (default_hooks.checkpoint.out_dir/<work folder\'s name>): {exc}'

    def before_run(self, runner) -> None:
        from mmengine.dist import broadcast_object_list, get_dist_info
        rank, world_size = get_dist_info()
        self.acquire(runner)
        if world_size > 1:
            verdict = [self.refused]
            broadcast_object_list(verdict, src=0)
            self.refused = verdict[0]
        if self.refused:
            if rank == 0:
                print(f'train: refused: {self.refused}', file=sys.stderr, flush=True)
            raise SystemExit(2)

    def after_run(self, runner) -> None:
        for lock in (self.out_lock, self.lock):
            if lock is not None:
                lock.release()


def _checkpoint_folder(runner) -> Optional[str]:
    """The folder the checkpoints go to when it is not the work folder (``default_hooks.checkpoint.out_dir``), or
    None."""
    from xtuner_plugins.engine.refusals import checkpoint_dir
    cfg = getattr(runner, 'cfg', None)
    folder = checkpoint_dir({'work_dir': runner.work_dir, 'default_hooks': cfg.get('default_hooks')}) if cfg else None
    if not folder or os.path.realpath(folder) == os.path.realpath(runner.work_dir):
        return None
    return folder


def config_file_in_work_dir(config: Optional[str], work_dir: str) -> bool:
    """Whether MMEngine's copy of the config (``WORK_DIR/<config's name>``) would be written over the config file
    itself: a run whose ``--work-dir`` is its config's folder (before, the file with its comments and ``_base_``
    was replaced by the flattened dump)."""
    if not config:
        return False
    target = os.path.join(work_dir, os.path.basename(config))
    try:
        return os.path.samefile(target, config)
    except OSError:   # either is not there
        return False


def foreign_file_at_dump(config: Optional[str], work_dir: str) -> Optional[str]:
    """``WORK_DIR/<config's name>`` when a file is there that MMEngine's copy of the config would replace and that
    is no earlier copy (a copy holds settings only, ``name = value``, a ``model`` among them; a config file of the
    user's imports its types) and not the config itself (:func:`config_file_in_work_dir` says that); else None."""
    if not config:
        return None
    target = os.path.join(work_dir, os.path.basename(config))
    if not os.path.isfile(target) or config_file_in_work_dir(config, work_dir):
        return None
    from xtuner_plugins.models.checkpoint import config_settings
    try:
        with open(target, encoding='utf-8') as f:
            settings = config_settings(f.read(), target)
    except (OSError, ValueError):
        return target
    return None if 'model' in settings else target


def _patch_dump_config() -> bool:
    """Take the lock before the runner writes into the work folder (its config dump); refused: no dump. Taken, the
    checkpoint the run starts from is marked kept (``runstart.keep_what_this_run_starts_from``)."""
    from mmengine.runner import FlexibleRunner, Runner
    patched = False
    for cls in (Runner, FlexibleRunner):
        original = cls.dump_config
        if getattr(original, _PATCH_MARK, False):
            continue

        @functools.wraps(original)
        def dump_config(self, _original=original):
            hooks = [h for h in getattr(self, '_hooks', []) if isinstance(h, RunLockHook)]
            for hook in hooks:
                hook.acquire(self)
            if any(h.refused for h in hooks):
                return
            from xtuner_plugins.engine.runstart import keep_what_this_run_starts_from
            keep_what_this_run_starts_from(getattr(self.cfg, '_cfg_dict', self.cfg))
            kept = foreign_file_at_dump(self.cfg.filename, self.work_dir)
            if kept:
                kept = (f'{kept} is there and is no earlier copy of a run\'s config (a file of the folder given as '
                        '--work-dir), which the copy would replace')
            elif config_file_in_work_dir(self.cfg.filename, self.work_dir):
                kept = (f'{self.cfg.filename} is the config file itself (--work-dir is its folder), which the copy '
                        'would replace with its flattened text')
            if kept:
                if int(os.environ.get('RANK', '0')) == 0:
                    print_log(f'the config is not copied into the work folder: {kept}; the run\'s full config is in '
                              f'{self.work_dir}/{self.timestamp}/vis_data/config.py and in every checkpoint',
                              logger='current', level=logging.WARNING)
                return
            _original(self)

        setattr(dump_config, _PATCH_MARK, True)
        cls.dump_config = dump_config
        patched = True
    return patched


_patch_dump_config()
