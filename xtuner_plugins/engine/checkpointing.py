"""Checkpoints that a kill cannot corrupt, and that resume loads with torch >= 2.6.

Applied when ``xtuner_plugins.engine`` is imported (configs import it), on GPUs and CPUs alike:

* **Atomic writes.** MMEngine writes ``iter_N.pth`` and then the ``last_checkpoint`` pointer that
  ``resume=True`` follows, both straight into their final paths: a kill (SIGKILL, preemption, out of
  memory) during a write leaves a truncated file under the real name. Local writes now go to a temporary
  file in the same folder, are flushed and fsync'ed, and are renamed into place, so a reader sees the old
  file or the complete new one. DeepSpeed checkpoints are folders written by DeepSpeed itself: they are
  written as ``.iter_N.pth.incomplete`` and renamed to ``iter_N.pth`` by rank 0 once every rank has written
  its part (a shared file system, as DeepSpeed assumes); the pointer to one is written after that, so
  neither resume nor the converter meets a half-written folder under a checkpoint's name (the converter
  refuses an ``.incomplete`` one). Temporaries a killed save left behind are removed when the next run in
  that work folder starts (:class:`CheckpointCleanupHook`).
* **Resume under torch >= 2.6.** ``torch.load`` now defaults to ``weights_only=True``, which refuses
  MMEngine checkpoints (they pickle the message hub's ``HistoryBuffer`` and numpy values next to the
  weights). MMEngine's loader for local files is re-registered to load with ``weights_only=False``;
  allow-listing the globals instead would mean allowing ``builtins.getattr``. Only load checkpoints you
  trust (your own runs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Union

from mmengine.hooks import Hook
from mmengine.logging import print_log

_PATCH_MARK = '_xtuner_plugins_checkpoint_patch'
_applied: List[str] = []


def atomic_write(data: Union[bytes, str], filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``filepath`` through a temporary file and an atomic rename."""
    filepath = str(filepath)
    folder = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(filepath) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _patch_local_backend_atomic() -> bool:
    from mmengine.fileio.backends.local_backend import LocalBackend
    if getattr(LocalBackend.put, _PATCH_MARK, False):
        return False

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(obj, filepath, encoding)

    for fn in (put, put_text):
        setattr(fn, _PATCH_MARK, True)
        fn.__doc__ = 'Atomic version (xtuner_plugins.engine.checkpointing): temporary file, fsync, rename.'
    LocalBackend.put, LocalBackend.put_text = put, put_text
    return True


INCOMPLETE = '.incomplete'


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _patch_deepspeed_save_rename() -> bool:
    try:
        from mmengine._strategy.deepspeed import DeepSpeedStrategy
    except ImportError:  # no deepspeed installed
        return False
    original = DeepSpeedStrategy.save_checkpoint
    if getattr(original, _PATCH_MARK, False):
        return False

    def save_checkpoint(self, filename, *args, **kwargs):
        save_then_rename(lambda partial: original(self, partial, *args, **kwargs), str(filename))

    setattr(save_checkpoint, _PATCH_MARK, True)
    DeepSpeedStrategy.save_checkpoint = save_checkpoint
    return True


def save_then_rename(save, filename: str) -> None:
    """``save(path)`` on every rank into ``.NAME.incomplete`` beside ``filename``; rank 0 renames it once all
    ranks are done."""
    folder, name = os.path.split(filename)
    partial = os.path.join(folder, '.' + name + INCOMPLETE)
    rank0 = int(os.environ.get('RANK', '0')) == 0
    if rank0:
        _remove(partial)
    _barrier()
    save(partial)
    _barrier()  # every rank has written its part
    if rank0:
        _remove(filename)
        os.replace(partial, filename)
    _barrier()


def _remove(path: str) -> None:
    import shutil
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def stale_temporaries(work_dir: str) -> List[str]:
    """Leftovers of killed saves in ``work_dir``: DeepSpeed folders not yet renamed, atomic-write temp files."""
    if not os.path.isdir(work_dir):
        return []
    return sorted(os.path.join(work_dir, n) for n in os.listdir(work_dir)
                  if n.startswith('.') and (n.endswith(INCOMPLETE) or n.endswith('.tmp')))


def _patch_local_checkpoint_loader() -> bool:
    import torch
    from mmengine.runner.checkpoint import CheckpointLoader
    current = CheckpointLoader._schemes.get('')
    if getattr(current, _PATCH_MARK, False):
        return False

    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(filename, map_location=map_location, weights_only=False)

    setattr(load_from_local, _PATCH_MARK, True)
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)
    return True


def apply_checkpoint_patches() -> List[str]:
    """Apply the patches once; returns the names newly applied."""
    patches = (_patch_local_backend_atomic, _patch_local_checkpoint_loader, _patch_deepspeed_save_rename)
    newly = [p.__name__.lstrip('_') for p in patches if p()]
    _applied.extend(newly)
    return newly


class CheckpointCleanupHook(Hook):
    """At start-up, rank 0 removes what killed saves left in the work folder (see the module docstring)."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        if int(os.environ.get('RANK', '0')) != 0:
            return
        for path in stale_temporaries(runner.work_dir):
            _remove(path)
            print_log(f'removed {path}: left by a save that did not finish', logger='current')


apply_checkpoint_patches()
