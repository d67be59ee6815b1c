"""Checkpoints that a kill cannot corrupt, and that resume loads with torch >= 2.6.

Applied when ``xtuner_plugins.engine`` is imported (configs import it), on GPUs and CPUs alike:

* **Atomic writes.** MMEngine writes ``iter_N.pth`` and then the ``last_checkpoint`` pointer that
  ``resume=True`` follows, both straight into their final paths: a kill (SIGKILL, preemption, out of
  memory) during a write leaves a truncated file under the real name. Local writes now go to a temporary
  file in the same folder, are flushed and fsync'ed, and are renamed into place, so a reader sees the old
  file or the complete new one. DeepSpeed checkpoints are folders written by DeepSpeed itself; the pointer
  to one is written last, atomically, so resume never picks a half-written folder.
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
    """Apply both patches once; returns the names newly applied."""
    newly = [p.__name__.lstrip('_') for p in (_patch_local_backend_atomic, _patch_local_checkpoint_loader) if p()]
    _applied.extend(newly)
    return newly


apply_checkpoint_patches()
