"""Resume reads a checkpoint as training state, never as a program.

``resume=True``, ``--resume PATH``, ``load_from`` (MMEngine's loader for local files) and DeepSpeed's own loading
of a checkpoint folder (``TorchCheckpointEngine.load``) used to unpickle the files whole (``torch.load(...,
weights_only=False)``), so a tampered checkpoint in a shared work folder ran its code when resumed. They now read
through :class:`ResumeUnpickler`: torch's ``weights_only`` list (tensors, plain containers) and the exact objects
training checkpoints hold, built for real because the run needs them back, and nothing else:

* MMEngine's message hub: ``HistoryBuffer`` (numpy arrays inside, and its statistics methods, pickled as
  ``getattr(HistoryBuffer, 'mean')``: ``getattr`` gives those four methods and nothing else) and ``ConfigDict``;
* numpy arrays, scalars and dtypes, and ``_codecs.encode`` with latin-1 (how protocol 2 writes their bytes);
* DeepSpeed's loss scalers, ZeRO stage enum and ``fragment_address`` (a ZeRO folder's files);
* sets and bytes.

The list was read off real checkpoints (plain, preference, ZeRO-2 and ZeRO-3 runs) with ``pickletools``. Any
other global a file names is refused, naming the file and the global, before anything of it runs. A checkpoint
you wrote yourself that holds more (a hook of your own that stores its objects) loads whole again with
``XTUNER_PLUGINS_TRUST_CHECKPOINTS=1``.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
import types
import zipfile
from typing import Any, Optional

import torch

from xtuner_plugins.errors import Refused
from xtuner_plugins.pickling import check_records, pickle_module, torch_load_as

TRUST_ENV = 'XTUNER_PLUGINS_TRUST_CHECKPOINTS'

#: the globals a training checkpoint may name beyond torch's ``weights_only`` list (module docstring)
ALLOWED = frozenset({
    'mmengine.logging.history_buffer.HistoryBuffer', 'mmengine.config.config.ConfigDict',
    'numpy.ndarray', 'numpy.dtype', 'numpy._core.multiarray._reconstruct', 'numpy.core.multiarray._reconstruct',
    'numpy._core.multiarray.scalar', 'numpy.core.multiarray.scalar',
    'deepspeed.runtime.fp16.loss_scaler.LossScaler', 'deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler',
    'deepspeed.runtime.zero.config.ZeroStageEnum', 'deepspeed.utils.tensor_fragment.fragment_address',
    'builtins.set', 'builtins.frozenset', 'builtins.bytes', 'builtins.bytearray',
})
#: HistoryBuffer's statistics methods, which its state pickles as ``getattr(HistoryBuffer, name)``
STATISTICS = ('min', 'max', 'current', 'mean')
_ALIASES = {'__builtin__': 'builtins'}   # protocol 2 names Python 2's module


class UntrustedCheckpoint(Refused, pickle.UnpicklingError):
    """A checkpoint that names a global training checkpoints never hold: refused before any of it runs."""


def trusted() -> bool:
    """Whether the user asked for whole unpickling (:data:`TRUST_ENV`)."""
    return os.environ.get(TRUST_ENV, '') not in ('', '0')


def _resolve(full: str) -> Any:
    module, _, name = full.rpartition('.')
    return getattr(importlib.import_module(module), name)


class ResumeUnpickler(pickle.Unpickler):
    """Builds what :data:`ALLOWED` and torch's ``weights_only`` list name; refuses every other global."""

    source = 'a checkpoint'   # the file being read, for the message (set per load)

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals
        module = _ALIASES.get(module, module)
        full = f'{module}.{name}'
        if full == 'builtins.getattr':
            return self._getattr
        if full == '_codecs.encode':   # (torch's list allows any codec)
            return self._encode
        torch_allowed = _get_allowed_globals()
        if full in torch_allowed:
            return torch_allowed[full]
        if full in ALLOWED or (module == 'numpy.dtypes' and name.endswith('DType')):
            return _resolve(full)
        raise self.refusal(f'names {full}')

    def refusal(self, what: str) -> UntrustedCheckpoint:
        return UntrustedCheckpoint(
            f'{self.source} {what}, which training checkpoints never hold: not loaded, so nothing in it ran (a '
            f'tampered file, or one that a hook of your own filled). If you wrote it yourself and trust it, set '
            f'{TRUST_ENV}=1 to unpickle it whole')

    def _getattr(self, obj: Any, name: str) -> Any:
        """``getattr`` for what pickle writes as ``getattr(HistoryBuffer, 'mean')``: HistoryBuffer's default
        statistics methods, nothing else."""
        from mmengine.logging.history_buffer import HistoryBuffer
        if obj is HistoryBuffer and name in STATISTICS:
            return getattr(obj, name)
        raise self.refusal(f'asks for getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r})')

    def _encode(self, text: str, encoding: str = 'utf-8', errors: str = 'strict') -> bytes:
        """``_codecs.encode`` as protocol 2 writes bytes: latin-1 text only."""
        if isinstance(text, str) and codecs.lookup(encoding).name == 'iso8859-1' and errors == 'strict':
            return codecs.encode(text, 'latin-1')
        raise self.refusal(f'asks for _codecs.encode(..., {encoding!r}, {errors!r})')


def _pickle_module(source: str) -> types.ModuleType:
    """``torch.load``'s ``pickle_module``: :class:`ResumeUnpickler` naming ``source`` in its refusals."""
    return pickle_module(type('ResumeUnpickler', (ResumeUnpickler,), {'source': source}))


def load(path: str, map_location: Optional[Any] = None, _torch_load=None, **kwargs) -> Any:
    """``torch.load`` of a training checkpoint file for resuming (module docstring); ``kwargs`` as torch's
    (``mmap``), ``weights_only`` and ``pickle_module`` excepted."""
    kwargs.pop('weights_only', None)
    kwargs.pop('pickle_module', None)
    source = os.fspath(path) if isinstance(path, (str, os.PathLike)) else 'a checkpoint'
    if not trusted():
        kwargs['pickle_module'] = _pickle_module(source)
    check_records(path, Refused, _instead(path))
    try:
        return (_torch_load or torch.load)(path, map_location=map_location, weights_only=False, **kwargs)
    except UntrustedCheckpoint:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        if isinstance(e, RuntimeError) and 'PytorchStreamReader' not in str(e):
            raise
        if not torch_saved(path):   # a .jsonl, a .safetensors: 'cut short, perhaps' misled
            raise Refused(f'{source} is not a checkpoint torch.save wrote (not a zip archive nor a pickle: a '
                          f'.safetensors, a data or text file?); resume from a run\'s iter_N.pth (--resume PATH)') \
                from None
        raise Refused(f'{source} does not read as a checkpoint ({str(e).splitlines()[0]}): cut short, perhaps (a '
                      f'copy or a save that was interrupted); {_instead(path)}') from None


def _instead(path) -> str:
    """What to do instead of loading the damaged checkpoint ``path``: in a folder with a checkpoint before it, move
    it away and resume from that one (``--resume`` of an earlier checkpoint is refused while a later one is beside
    it: ``resume.later_checkpoints``)."""
    from xtuner_plugins.outcome import find_checkpoints
    anywhere = 'resume from an earlier iter_N.pth (--resume PATH), or start the run again'
    if not isinstance(path, (str, os.PathLike)):
        return anywhere
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    saved = [os.path.abspath(c) for c in find_checkpoints(folder)]
    if path not in saved or saved.index(path) == 0:
        return anywhere
    return (f'move {path} out of {folder} (a resume from an earlier checkpoint is refused while a later one is '
            f'there) and resume from the one before it: --resume {saved[saved.index(path) - 1]}')


def torch_saved(path) -> bool:
    """Whether ``path`` begins as ``torch.save`` writes: a zip archive (``PK\\x03\\x04``), or the legacy format's
    pickle (protocol 2 and up: ``\\x80``), or is empty; True for what cannot be read here (its error is said as it
    is)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except (OSError, TypeError):
        return True
    return not head or head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'   # (empty: cut short)


def torch_load_for_resume():
    """``torch.load`` reading as :func:`load` does, for code that calls it itself (XTuner's seed reader): a
    context manager."""
    return torch_load_as(lambda real, f, map_location, **kwargs: load(f, map_location, _torch_load=real, **kwargs))
