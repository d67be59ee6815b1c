"""Reading training checkpoints: an MMEngine ``.pth`` file or a DeepSpeed checkpoint folder.

MMEngine's CheckpointHook writes ``work_dirs/<cfg>/iter_N.pth``: a file in plain runs, and under
DeepSpeed a *folder* of that name holding DeepSpeed's own files (ZeRO-2/3 optimizer partitions and the
module states). Both give back the model's state dict here, consolidated to fp32 on the CPU (no GPU
needed). XTuner saves DeepSpeed checkpoints with ``exclude_frozen_parameters``: they hold only what was
trained, like our ``VisionLanguageModel.state_dict``.

A checkpoint is read as data: nothing in it runs. Its pickle builds torch's tensors and plain containers only
(torch's own ``weights_only`` list, and sets), and DeepSpeed's ZeRO stage number (an enum a ZeRO folder's files
hold); any other class or function it names (MMEngine's ``HistoryBuffer``, numpy arrays of the message hub,
DeepSpeed's loss scaler, or a tampered file's ``os.system``) becomes an inert placeholder, never called. A DeepSpeed
folder's files are read so too: DeepSpeed's own consolidation (``zero_to_fp32``) unpickles them whole
(``weights_only=False``), so it runs here with its ``torch.load`` reading through the same unpickler. The
training config MMEngine records in it (``meta['cfg']``, Python text) is parsed as ``name = value`` lines of
literals and ``dict(...)`` (:func:`config_settings`), never executed; anything else is refused by line.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from typing import Dict, Optional

import torch

from xtuner_plugins.pickling import check_records, pickle_module, torch_load_as


class _Inert:
    """Built in place of a class or function a checkpoint's pickle names outside torch's tensor list: it takes
    whatever the pickle hands it and calls nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_INERT: Dict[str, type] = {}


def _inert(name: str) -> type:
    if name not in _INERT:
        _INERT[name] = type(name, (_Inert,), {'__module__': __name__, '__qualname__': f'inert {name}'})
    return _INERT[name]


#: what a checkpoint's pickle may build besides torch's ``weights_only`` list: plain sets, and DeepSpeed's ZeRO
#: stage (an ``IntEnum``: calling it looks a member up), which ``zero_to_fp32`` compares with numbers
_ALSO_ALLOWED = {'builtins.set': lambda: set, '__builtin__.set': lambda: set,
                 'deepspeed.runtime.zero.config.ZeroStageEnum': lambda: _zero_stage_enum()}


def _zero_stage_enum() -> type:
    from deepspeed.runtime.zero.config import ZeroStageEnum
    return ZeroStageEnum


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = _get_allowed_globals()
        full = f'{module}.{name}'
        if full in allowed:
            return allowed[full]
        return _ALSO_ALLOWED[full]() if full in _ALSO_ALLOWED else _inert(full)


#: ``torch.load``'s ``pickle_module``: the checkpoint's pickle with :class:`_Unpickler`
_SAFE_PICKLE = pickle_module(_Unpickler)


def load_checkpoint_file(path: str, mmap: bool = False):
    """What ``torch.load`` gives for an MMEngine or DeepSpeed checkpoint file, without running any of its code:
    tensors and plain values; anything else an inert placeholder (module docstring)."""
    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_SAFE_PICKLE, mmap=mmap)


def _loads_as_data():
    """``torch.load`` reading through :class:`_Unpickler` while DeepSpeed's ``zero_to_fp32`` consolidates a folder
    (it calls ``torch.load(file, map_location=..., weights_only=False[, mmap=True])``): a context manager."""
    def load(real, f, map_location, mmap=None, **kwargs):
        check_records(f)
        try:
            return real(f, map_location=map_location, weights_only=False, pickle_module=_SAFE_PICKLE, mmap=mmap)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:   # DeepSpeed's traceback named no file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f'{f}: cannot be read ({first}): the file is truncated or damaged (a copy or a save '
                             'that did not finish?); copy it again, or use another checkpoint') from None
    return torch_load_as(load)


def _kind(value) -> str:
    """How to name a value of the wrong type in a message."""
    if isinstance(value, _Inert):
        return f'a pickled {type(value).__name__} object (not loaded)'
    return f'{type(value).__name__} {value!r}'[:120]


def load_trained_state_dict(path: str, lazy: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict stored at ``path`` (file or DeepSpeed folder), on the CPU.

    ``lazy``: a ``.pth`` is memory-mapped and a DeepSpeed folder consolidated lazily (DeepSpeed's
    ``lazy_mode``); call ``.contiguous()`` on a value to get its tensor. Memory then grows with the tensor
    being read, not with the whole checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if os.path.basename(os.path.normpath(path)).endswith('.incomplete'):
        raise ValueError(f'{path} is a checkpoint whose save did not finish (the run was killed while writing it); '
                         f'use the one before it')
    if os.path.isdir(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        parent, tag = os.path.split(os.path.normpath(os.path.abspath(path)))
        from xtuner_plugins.outcome import deepspeed_checkpoint
        if not deepspeed_checkpoint(path):
            raise ValueError(f'{path} is a folder but not a DeepSpeed checkpoint (no *model_states.pt inside)')
        try:
            with _loads_as_data():
                state = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag, lazy_mode=lazy)
        except (TypeError, AttributeError) as exc:   # a value it needs was pickled as another class: inert here
            raise ValueError(
                f'{path}: DeepSpeed could not consolidate it with its files read as data ({type(exc).__name__}: '
                f'{exc}): a DeepSpeed version that pickles other objects than this one reads? If you trust the '
                f'folder (your own run), consolidate it with DeepSpeed\'s own script, which runs its pickles: '
                f'python -m deepspeed.utils.zero_to_fp32 {parent} OUT --tag {tag} --max_shard_size '
                f'1000GB, and give OUT/pytorch_model.bin instead (it records no config: the converter takes it as '
                f'CONFIG OUT/pytorch_model.bin OUT_DIR)') from None
    else:
        # MMEngine checkpoints pickle training state (message hub, HistoryBuffer, ...) next to the weights,
        # which torch's weights_only loader refuses: they become inert placeholders here
        check_records(path)
        ckpt = load_checkpoint_file(path, mmap=lazy)
        state = (ckpt.get('state_dict', ckpt.get('module', ckpt)) if isinstance(ckpt, dict) else None)
        if not isinstance(state, dict):
            raise ValueError(f'{path}: no state dict found (keys: {list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt)})')
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def read_meta(checkpoint: str) -> dict:
    """The ``meta`` MMEngine stores in a checkpoint (a file, or under DeepSpeed the folder's
    ``*model_states.pt``): the run's config text (``cfg``), its lineage (``models/lineage.py``), ...; {} if none.
    The file is memory-mapped: the weights are not read.

    Raises:
        ValueError: naming the file, when it is not a checkpoint torch can read (a safetensors file, a
            converted folder's weights, a truncated copy), or its ``meta`` or ``meta['cfg']`` is not what
            training writes (a mapping; text).
    """
    path = checkpoint
    if os.path.isdir(checkpoint):
        found = sorted(name for name in os.listdir(checkpoint) if name.endswith('model_states.pt'))
        if not found:
            return {}
        path = os.path.join(checkpoint, found[0])
    what = 'give a checkpoint of training: work_dirs/<config>/iter_N.pth (a file, or the folder DeepSpeed saves)'
    import zipfile
    if os.path.isfile(path) and not zipfile.is_zipfile(path):   # (torch's words were of its mmap)
        size = os.path.getsize(path)
        raise ValueError(f'{path} is empty (0 bytes); {what}' if not size else
                         f'{path} is not a training checkpoint: its {size:,} bytes are not in torch.save\'s format '
                         f'(another program\'s file, or a copy cut short); {what}')
    try:
        ckpt = load_checkpoint_file(path, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling and zip errors alike
        reason = (str(exc).splitlines() or [''])[0][:200]
        raise ValueError(f'{path} is not a training checkpoint torch can read ({type(exc).__name__}: {reason}); '
                         f'{what}') from exc
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its meta is {_kind(meta)}, not the mapping training writes; use a checkpoint "
                         'as training wrote it')
    if meta.get('cfg') is not None and not isinstance(meta['cfg'], str):
        raise ValueError(f"{path}: its meta['cfg'] (the training config) is {_kind(meta['cfg'])}, not text; use a "
                         'checkpoint as training wrote it')
    return meta


class _NotPlain(Exception):
    """A part of a config text that is not a plain setting (``args[0]``: its node)."""


def _literal(node: ast.AST):
    """The value of a settings expression: literals, lists, tuples, sets, ``{...}`` and ``dict(key=...)``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else set(items) if isinstance(node, ast.Set) else items
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args
            and all(k.arg is not None for k in node.keywords)):
        return {k.arg: _literal(k.value) for k in node.keywords}
    raise _NotPlain(node)


def config_settings(text: str, where: str) -> dict:
    """The settings of a config text MMEngine dumped (``name = value`` lines, see :func:`_literal`), read as data:
    nothing of it runs. ``where`` names the text in the error.

    Raises:
        ValueError: naming ``where`` and the line, for text that is not such settings (an ``import``, a call).
    """
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise ValueError(f'{where}: not Python settings (line {exc.lineno}: {exc.msg})') from exc
    settings = {}
    for stmt in tree.body:
        try:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
                raise _NotPlain(stmt)
            settings[stmt.targets[0].id] = _literal(stmt.value)
        except (_NotPlain, TypeError) as exc:  # TypeError: an unhashable key ({[1]: 2})
            node = exc.args[0] if isinstance(exc, _NotPlain) else stmt
            code = (ast.get_source_segment(text, node) or '').splitlines()[0][:80]
            raise ValueError(f'{where}: line {getattr(node, "lineno", stmt.lineno)} is not a plain setting '
                             f'({code!r}); a checkpoint\'s config is read as data, never run: use a checkpoint as '
                             'training wrote it') from None
    return settings


def recorded_model_config(checkpoint: str, meta: Optional[dict] = None) -> Optional[dict]:
    """The ``model`` settings of the training config recorded in ``checkpoint`` (``meta``: its :func:`read_meta`,
    when read already), parsed as data (:func:`config_settings`); None when it records no config."""
    meta = read_meta(checkpoint) if meta is None else meta
    if not meta.get('cfg'):
        return None
    model = config_settings(meta['cfg'], f"{checkpoint}: meta['cfg'] (the training config)").get('model', {})
    if not isinstance(model, dict):
        raise ValueError(f"{checkpoint}: meta['cfg'] (the training config) sets model to {_kind(model)}, not the "
                         'settings training writes; use a checkpoint as training wrote it')
    return model


_WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors', 'pytorch_model.bin.index.json',
                 'pytorch_model.bin')


def _load_file(path: str, prefix: str) -> Dict[str, torch.Tensor]:
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    sd = torch.load(path, map_location='cpu', weights_only=True)
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def read_hf_weights(folder: str, prefix: str = '', weights_file: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` from a Hugging Face-style folder: ``model.safetensors``,
    sharded safetensors with an index (only the shards holding ``prefix`` are read), or
    ``pytorch_model.bin`` (loaded with ``weights_only=True``)."""
    if weights_file is not None:
        return _load_file(weights_file, prefix)
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith('.index.json'):
            return _load_file(path, prefix)
        with open(path, encoding='utf-8') as f:
            weight_map = json.load(f)['weight_map']
        shards = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
        from .folder import names_outside
        outside = names_outside(shards)
        if outside:   # ('../x', '/x': another folder's file, read without a word)
            raise ValueError(f'{path}: it names {outside[0]!r} as a weight file, not a file of this folder (an index '
                             'names its shards by their names in it)')
        sd = {}
        for shard in shards:
            sd.update(_load_file(os.path.join(folder, shard), prefix))
        return sd
    raise FileNotFoundError(f'{folder}: no weights found (looked for {", ".join(_WEIGHT_FILES)})')
