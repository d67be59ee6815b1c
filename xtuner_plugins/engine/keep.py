"""A checkpoint a later stage was trained from is kept: its run's rotation (``max_keep_ckpts``) does not delete it.

A fine-tuning stage records the checkpoint it starts from (``model.pretrained_pth``) in its own checkpoints'
lineage, and converting it reads that checkpoint again. When the earlier stage's run went on afterwards (resumed
for more iterations, or still running when the next stage started from one of its checkpoints), MMEngine's
checkpoint rotation deleted that checkpoint like any other old one: the later stage could no longer be converted,
and ``--remap`` to another checkpoint of the warm-up is refused (it is not the one trained from).

So a run started from ``model.pretrained_pth=DIR/iter_N.pth`` writes ``DIR/iter_N.pth.kept`` (a line with its own
work folder; :func:`mark_kept`), and the rotation of any run in ``DIR`` skips a checkpoint that has one, saying so
once (:func:`apply_keep_patches`, applied when ``runtime`` is imported). Remove the ``.kept`` file to let the
rotation delete it again. A folder that cannot be written keeps no mark (a warning says so).

The rotation also deletes the oldest checkpoint only once the new one is written (MMEngine deletes it first, so
that the new one records the list without it): with ``max_keep_ckpts=1`` (the demo's stages) a run killed while
it saved was left with no checkpoint at all, ``last_checkpoint`` naming the one deleted. The list a checkpoint
records then still names the one deleted after it, which a resume's rotation finds gone and passes over.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from typing import List, Optional

from mmengine.logging import print_log

__all__ = ['KEPT_SUFFIX', 'apply_keep_patches', 'kept_by', 'mark_kept']

KEPT_SUFFIX = '.kept'
_PATCH_MARK = '_xtuner_plugins_keep_patch'
_applied: List[str] = []


def mark_kept(checkpoint: str, by: str) -> Optional[str]:
    """Write (append) ``checkpoint + '.kept'`` naming the work folder ``by`` trained from it, unless it is in ``by``
    itself; the warning to log when it cannot be written, else None."""
    if not checkpoint or not os.path.exists(checkpoint):
        return None
    checkpoint = os.path.realpath(checkpoint)   # beside the file its run rotates, not beside a link to it
    if by and os.path.dirname(checkpoint) == os.path.realpath(by):
        return None
    mark = checkpoint + KEPT_SUFFIX
    line = os.path.abspath(by or '.') + '\n'
    try:
        with open(mark, 'a+', encoding='utf-8') as f:
            f.seek(0)
            if line not in f.readlines():
                f.write(line)
    except OSError as exc:
        return (f'{mark}: cannot be written ({exc.strerror or exc}): the run of {os.path.dirname(checkpoint)} may '
                f'delete {os.path.basename(checkpoint)} when it rotates its checkpoints, and this stage could then '
                'not be converted; keep a copy of it')
    return None


def kept_by(checkpoint: str) -> Optional[str]:
    """The first work folder a ``.kept`` mark of ``checkpoint`` names, or None when it has none."""
    try:
        with open(os.path.normpath(checkpoint) + KEPT_SUFFIX, encoding='utf-8') as f:
            return next((line.strip() for line in f if line.strip()), '(a later stage)')
    except OSError:
        return None


def _kept_out(hook, out_dir: str, steps) -> list:
    """``steps`` (a rotation's checkpoints, oldest first) without those kept (said, each), in order."""
    left = []
    for step in steps:
        path = os.path.join(out_dir, hook.filename_tmpl.format(step))
        child = kept_by(path)
        if child is None:
            left.append(step)
        else:   # out of the rotation: never deleted by it
            print_log(f'{path} is kept, not rotated out: {child} was trained from it (its {KEPT_SUFFIX} file; '
                      'remove that file to let the rotation delete it)', logger='current', level=logging.WARNING)
    return left


def _patch_rotation() -> bool:
    """Both places MMEngine's checkpoint hook deletes old checkpoints: each save (``_save_checkpoint_with_step``)
    and a resume with fewer ``max_keep_ckpts`` than the saved run kept (``before_train``, from the message hub's
    ``keep_ckpt_ids``)."""
    from mmengine.dist import is_main_process
    from mmengine.hooks import CheckpointHook
    save, before_train = CheckpointHook._save_checkpoint_with_step, CheckpointHook.before_train
    if getattr(save, _PATCH_MARK, False):
        return False

    @functools.wraps(save)
    def _save_checkpoint_with_step(self, runner, step, meta):
        ids = getattr(self, 'keep_ckpt_ids', None)
        if self.max_keep_ckpts > 0 and ids:
            left = _kept_out(self, self.out_dir, list(ids))
            if len(left) != len(ids):
                ids.clear()
                ids.extend(left)
        if not (self.max_keep_ckpts > 0 and ids and len(ids) >= self.max_keep_ckpts and ids[-1] != step):
            return save(self, runner, step, meta)
        # room for one more while the new one is written (the deque's own limit would drop the oldest silently)
        keep = self.max_keep_ckpts
        self.max_keep_ckpts, self.keep_ckpt_ids = keep + 1, deque(ids, keep + 1)
        try:
            result = save(self, runner, step, meta)
        finally:
            self.max_keep_ckpts = keep
        old = list(self.keep_ckpt_ids)
        self.keep_ckpt_ids = deque(old[len(old) - keep:], keep)
        runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        if is_main_process():
            written = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(step))
            for gone in old[:len(old) - keep]:
                path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(gone))
                if path == written:   # a filename_tmpl without the step's field names one file: the one just saved
                    continue
                if self.file_backend.isfile(path):
                    self.file_backend.remove(path)
                elif self.file_backend.isdir(path):   # DeepSpeed's checkpoints are folders
                    self.file_backend.rmtree(path)
        return result

    @functools.wraps(before_train)
    def patched_before_train(self, runner):
        hub = runner.message_hub
        if self.max_keep_ckpts > 0 and 'keep_ckpt_ids' in hub.runtime_info:
            saved = list(hub.get_info('keep_ckpt_ids'))
            left = _kept_out(self, self.out_dir or runner.work_dir, saved)
            if len(left) != len(saved):
                hub.update_info('keep_ckpt_ids', left)
        return before_train(self, runner)

    for fn in (_save_checkpoint_with_step, patched_before_train):
        setattr(fn, _PATCH_MARK, True)
    CheckpointHook._save_checkpoint_with_step = _save_checkpoint_with_step
    CheckpointHook.before_train = patched_before_train
    return True


def apply_keep_patches() -> List[str]:
    """Apply the patch once (module docstring); returns the names newly applied."""
    newly = ['rotation'] if _patch_rotation() else []
    _applied.extend(newly)
    return newly
