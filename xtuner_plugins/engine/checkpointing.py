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
  that work folder starts, and in the folder its checkpoints go to (:class:`CheckpointCleanupHook`). The pointer
  itself is written atomically too, and read against the work folder it is in (``resume.py``).
* **Resume under torch >= 2.6, as data.** ``torch.load`` now defaults to ``weights_only=True``, which refuses
  MMEngine checkpoints (they pickle the message hub's ``HistoryBuffer`` and numpy values next to the
  weights). MMEngine's loader for local files and DeepSpeed's checkpoint engine are re-registered to read
  through ``resume_load``'s unpickler, which builds those objects and refuses any other global.
* **One line on what a load brought back.** MMEngine's ``load_state_dict`` warns with every missing key
  (thousands of characters on a resume, worded as a mismatch), yet this project's checkpoints hold only the
  trained parameters by design (``VisionLanguageModel.state_dict``): the frozen ones come from their source
  checkpoints. A non-strict load now logs one line, ``resumed from X: N tensors loaded; M frozen parameters not in
  checkpoints by design (vision_model.*, language_model.*)``, and warns loudly, by name, about what was not
  expected: trained parameters the checkpoint lacks (they keep the values they had before the load) and tensors
  of the checkpoint that match nothing in the model (the words, and the refusals of a resume into another model
  and of a load of nothing: ``load_outcome.py``). DeepSpeed checkpoints load through DeepSpeed, not this.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Union

from mmengine.hooks import Hook
from mmengine.logging import print_log

from xtuner_plugins.engine import resume_load
from xtuner_plugins.engine.load_outcome import (load_report, refuse_load_from, refuse_resume_into_another_model,
                                                 shape_mismatches)
from xtuner_plugins.errors import Stated
from xtuner_plugins.filemodes import file_mode

_PATCH_MARK = '_xtuner_plugins_checkpoint_patch'
_applied: List[str] = []


class WriteFailed(Stated, OSError):
    """A checkpoint (or the pointer) that could not be written: a full disk, a file-size limit, a folder that
    cannot be written. Its message names the file and says that the file of that name, if any, is unchanged."""

    def __str__(self) -> str:
        return str(self.strerror)


def atomic_write(data: Union[bytes, str], filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``filepath`` through a temporary file and an atomic rename. The file gets the mode a
    plain write gives (``0o666`` less the umask; ``mkstemp``'s own 0600 would hide checkpoints from the group a
    work folder is shared with); a write that fails raises :class:`WriteFailed`, leaving ``filepath`` as it was."""
    filepath = str(filepath)
    folder = os.path.dirname(os.path.abspath(filepath))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(filepath) + '.', suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            kept = 'the file of that name is unchanged' if os.path.exists(filepath) else 'no partial file was left'
            raise WriteFailed(exc.errno, f'could not write {filepath} ({len(data):,} bytes): {exc.strerror or exc}'
                              f'{_hint(exc.errno)}; {kept}') from exc
        raise


def _hint(code: Optional[int]) -> str:
    import errno
    return {errno.ENOSPC: ' (the disk is full)', errno.EDQUOT: ' (the disk quota is used up)',
            errno.EFBIG: ' (over the file-size limit: ulimit -f, or the file system\'s largest file)',
            errno.EROFS: ' (a read-only file system)', errno.EACCES: ' (no permission to write that folder)'}.get(
        code, '')


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
    try:
        save(partial)
    except (OSError, RuntimeError) as exc:
        failed = _write_failure(exc, filename)
        if failed is None:
            raise
        raise failed from exc
    _barrier()  # every rank has written its part
    if rank0:
        _remove(filename)
        os.replace(partial, filename)
    _barrier()


#: torch.save's words for a write the disk refused (its C++ writer raises a RuntimeError without an errno)
_TORCH_WRITE_FAILED = ('inline_container', 'iostream error', 'PytorchStreamWriter failed', 'file write failed')


def _write_failure(exc: BaseException, filename: str) -> Optional[WriteFailed]:
    """A :class:`WriteFailed` naming ``filename`` for a save that the disk refused (``exc``: an OSError, or
    torch.save's RuntimeError of :data:`_TORCH_WRITE_FAILED`, whose cause is told from the disk's free space and
    the file-size limit); None for any other error."""
    import errno
    import resource
    import shutil
    if isinstance(exc, WriteFailed) or not (isinstance(exc, OSError) or any(
            w in str(exc) for w in _TORCH_WRITE_FAILED)):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(filename))).free
        except OSError:
            free = None
        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
        code = errno.ENOSPC if free is not None and free < 16 << 20 else errno.EFBIG if limited else None
    cause = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0][:200])
    return WriteFailed(code, f'could not write the checkpoint {filename} ({cause}){_hint(code)}; the checkpoints '
                             f'before it are kept, and what was written of it is removed when the run resumes')


def _remove(path: str) -> None:
    import shutil
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


#: what a killed save leaves: a DeepSpeed checkpoint not yet renamed (``.iter_N.pth.incomplete``, see
#: :func:`save_then_rename`), and the atomic writer's temporary (``.NAME.XXXXXXXX.tmp``: ``mkstemp``'s eight
#: letters) of a checkpoint (``iter_N.pth``, ``epoch_N.pth``: the checkpoint hook's names), ``last_checkpoint``, the
#: data manifest or the Slurm job's record; nothing else, whatever its name's ends (another program's ``.notes.tmp``
#: or ``.export.incomplete``, a user's ``.my_model.pth.incomplete`` or ``.weights.pth.backup.tmp``, in a work folder
#: given as ``--work-dir .``, were removed)
_SAVED = r'(?:iter|epoch)_[0-9]+\.pth'
LEFT_BY_SAVES = re.compile(r'\.(?:' + _SAVED + re.escape(INCOMPLETE) + r'|(?:' + _SAVED + r'|last_checkpoint'
                           + r'|data_manifest\.json|slurm_job\.json)\.[a-z0-9_]{8}\.tmp)')


def stale_temporaries(work_dir: str) -> List[str]:
    """Leftovers of killed saves in ``work_dir`` (:data:`LEFT_BY_SAVES`)."""
    if not os.path.isdir(work_dir):
        return []
    return sorted(os.path.join(work_dir, n) for n in os.listdir(work_dir) if LEFT_BY_SAVES.fullmatch(n))


def _patch_local_checkpoint_loader() -> bool:
    from mmengine.runner.checkpoint import CheckpointLoader
    current = CheckpointLoader._schemes.get('')
    if getattr(current, _PATCH_MARK, False):
        return False

    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return resume_load.load(filename, map_location=map_location)

    setattr(load_from_local, _PATCH_MARK, True)
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)
    return True


# (verb, checkpoint) of the load under way in this thread: set by the runners' resume / load_checkpoint
_LOADING: contextvars.ContextVar = contextvars.ContextVar('xtuner_plugins_loading', default=None)


def _unwrap(module):
    from mmengine.model import BaseTTAModel, is_model_wrapper
    while is_model_wrapper(module) or isinstance(module, BaseTTAModel):
        module = module.module
    return module


def _patch_load_report() -> bool:
    from mmengine.runner import checkpoint
    original = checkpoint.load_state_dict
    if getattr(original, _PATCH_MARK, False):
        return False

    def load_state_dict(module, state_dict, strict=False, logger=None):
        if strict:  # MMEngine raises with its message
            return original(module, state_dict, strict, logger)
        seen = {}
        target = _unwrap(module)

        def record(_, incompatible):  # the top module's hook runs last, with every key the load met
            seen.update(missing=list(incompatible.missing_keys), unexpected=list(incompatible.unexpected_keys))

        handle = target.register_load_state_dict_post_hook(record)
        try:
            original(module, state_dict, strict, 'silent')
        finally:
            handle.remove()
        from mmengine.dist import get_dist_info
        unexpected, mismatched = seen.get('unexpected', []), shape_mismatches(target, state_dict)
        source = _LOADING.get()
        if source and source[0] == 'resumed from':   # every rank: none goes on to load the optimizer's state
            refuse_resume_into_another_model(target, source[1], seen.get('missing', []), mismatched)
        loaded = len(state_dict) - len(unexpected) - len(mismatched)
        if source and source[0] == 'loaded' and state_dict:   # load_from: every rank
            refuse_load_from(source[1], unexpected, mismatched, loaded)
        if get_dist_info()[0] != 0:  # as MMEngine: rank 0 reports
            return
        for level, line in load_report(target, loaded, seen.get('missing', []), unexpected, source, mismatched):
            print_log(line, logger=logger or 'current', level=level)

    setattr(load_state_dict, _PATCH_MARK, True)
    checkpoint.load_state_dict = load_state_dict
    from mmengine.runner import FlexibleRunner, Runner
    for runner in (Runner, FlexibleRunner):
        for method, verb in (('resume', 'resumed from'), ('load_checkpoint', 'loaded')):
            setattr(runner, method, _naming_the_source(getattr(runner, method), verb))
    return True


def _naming_the_source(method, verb: str):
    """``method(self, filename, ...)`` with ``(verb, filename)`` as the load under way (an outer one kept)."""
    import functools

    @functools.wraps(method)
    def named(self, filename, *args, **kwargs):
        _patch_deepspeed_load()   # DeepSpeed imported by now where the run uses it
        token = _LOADING.set(_LOADING.get() or (verb, str(filename)))
        try:
            return method(self, filename, *args, **kwargs)
        finally:
            _LOADING.reset(token)

    return named


def _patch_deepspeed_load() -> bool:
    """DeepSpeed's own reads of a checkpoint folder (model states, optimizer partitions) as resume reads files.
    Only once DeepSpeed is imported (a run without it does not import it: ``deferred_imports.py``); the runners'
    ``resume`` and ``load_checkpoint`` call this again before they load."""
    if 'deepspeed' not in sys.modules:
        return False
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:   # DeepSpeed is optional
        return False
    if getattr(TorchCheckpointEngine.load, _PATCH_MARK, False):
        return False

    def load(self, path, map_location=None):
        return resume_load.load(path, map_location=map_location)

    setattr(load, _PATCH_MARK, True)
    TorchCheckpointEngine.load = load
    return True


def apply_checkpoint_patches() -> List[str]:
    """Apply the patches once; returns the names newly applied."""
    patches = (_patch_local_backend_atomic, _patch_local_checkpoint_loader, _patch_deepspeed_save_rename,
               _patch_deepspeed_load, _patch_load_report)
    newly = [p.__name__.lstrip('_') for p in patches if p()]
    _applied.extend(newly)
    return newly


class CheckpointCleanupHook(Hook):
    """At start-up, rank 0 removes what killed saves left in the work folder, and in the folder the checkpoints go
    to when it is another (``default_hooks.checkpoint.out_dir``'s ``OUT/<work folder's name>``, locked by this run
    too: ``runlock.py``; see the module docstring)."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        if int(os.environ.get('RANK', '0')) != 0:
            return
        from xtuner_plugins.engine.runlock import _checkpoint_folder
        elsewhere = _checkpoint_folder(runner)
        for path in stale_temporaries(runner.work_dir) + (stale_temporaries(elsewhere) if elsewhere else []):
            _remove(path)
            print_log(f'removed {path}: left by a save that did not finish', logger='current')


apply_checkpoint_patches()
