"""A ``--cfg-options`` value checked against the setting it goes to (``options.check_cfg_options`` finds the entry
and its component; nothing here walks the config).

* **Of the wrong kind** (:func:`wrong_kind`): a number where the config has a number, ``true``/``false`` where it
  has a boolean; for a setting the config leaves out, the component's default, or the kind its annotation names
  (:func:`default_of`). ``None`` is always let through; a list where the argument takes one, and a text where a
  boolean's argument takes text too, are let through.
* **What an argument takes** by its annotation (:func:`takes_str`, :func:`takes_list`), and a ``{...}`` dict written
  out (:func:`brace_dict`), which MMEngine's parser keeps as text or cuts at its commas.
* **Out of its range** (:data:`RANGES`, :func:`out_of_range`): a learning rate below 0, a batch of 0, ...; not
  one of its names (:data:`CHOICES`: a distributed backend torch does not have).
* **A type no registry has** (:data:`REGISTRIES`, :func:`type_problem`, :func:`resolved_type`):
  ``optim_wrapper.type=Foo`` is looked up in MMEngine's registry of optimizer wrappers, as the runner would, or
  refused with the closest names there.
"""

from __future__ import annotations

import inspect
import re
from typing import Mapping, Optional, Tuple

from xtuner_plugins.engine.signatures import parameter


def component_name(component) -> str:
    """A component as the messages name it (its class's or function's name)."""
    return getattr(component, '__name__', str(component))


_KINDS = {'int': 0, 'float': 0.0, 'bool': False}  # by the annotation's name


def default_of(component, name: str) -> Tuple[object, str]:
    """The default of ``component``'s setting ``name`` and how to name it; for a default of None, a value of
    the kind its annotation names (``Optional[int]``: a number), so that the kind can be checked."""
    param = parameter(component, name)
    if param is None:
        return None, ''
    if param.default is not param.empty and param.default is not None:
        return param.default, f"{component_name(component)}'s default is {param.default!r}"
    annotation = param.annotation
    if isinstance(annotation, str) and annotation.startswith('Optional[') and annotation.endswith(']'):
        annotation = annotation[len('Optional['):-1]
    elif getattr(annotation, '__args__', None) and type(None) in annotation.__args__ and len(annotation.__args__) == 2:
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    kind = _KINDS.get(getattr(annotation, '__name__', annotation)) if isinstance(annotation, (str, type)) else None
    return kind, f'{component_name(component)} takes {getattr(annotation, "__name__", annotation)}'


def _takes_sequence(component, name: str) -> bool:
    """Whether ``component``'s argument ``name`` is annotated to take a list (``repeat_times``: one per file)."""
    try:
        param = inspect.signature(component).parameters.get(name)
    except (TypeError, ValueError):
        return False
    text = str(param.annotation) if param is not None and param.annotation is not param.empty else ''
    return any(word in text for word in ('Sequence', 'List', 'list', 'Tuple', 'tuple', 'Iterable'))


def _takes_text(component, name: str) -> bool:
    """Whether ``component``'s argument ``name`` is annotated to take a string beside a boolean
    (``Union[bool, str]``: ``llm_grad_ckpt='keep_attention'``, ``liger_kernel='fused_loss'``; a ``Literal`` of
    names: peft's ``init_lora_weights='gaussian'``)."""
    param = parameter(component, name) if component is not None else None
    if param is None or param.annotation is param.empty:
        return False
    text = (param.annotation if isinstance(param.annotation, str) else str(param.annotation)).replace('typing.', '')
    if text.startswith('Union[') and text.endswith(']'):
        text = text[len('Union['):-1]
    depth, word, words = 0, '', []   # the Union's members, at the top level of its brackets
    for char in text + ',':
        depth += (char == '[') - (char == ']')
        if char in ',|' and depth == 0:
            words.append(word.strip())
            word = ''
        else:
            word += char
    # (a Literal of names: peft's init_lora_weights, bool | Literal['gaussian', 'pissa', ...])
    return 'str' in words or "<class 'str'>" in words or any(w.startswith("Literal['") for w in words)


def wrong_kind(key: str, value, current, where: str, component=None) -> Optional[str]:
    """The problem of ``value`` for a setting whose value is ``current`` now, or None."""
    if value is None or current is None:
        return None
    if isinstance(current, Mapping):   # an entry of settings: a number in its place is no setting of anything (a
        # text may be: a tokenizer's folder where the config builds one; True/False a switch a component takes)
        if not isinstance(value, (int, float, list, tuple)) or isinstance(value, bool):
            return None
        what = f"{component_name(current['type'])}'s settings" if 'type' in current else 'settings'
        return (f'{key}: expected a dict of settings or None (the config has {what} there), got {value!r} '
                f'({type(value).__name__}); set its settings one by one ({key}.NAME=VALUE)')
    if isinstance(value, (list, tuple)) and component is not None and _takes_sequence(component, key.split('.')[-1]):
        return None
    if isinstance(current, bool):
        if not isinstance(value, str) or _takes_text(component, key.split('.')[-1]):
            return None
        expected = 'true or false'
    elif isinstance(current, (int, float)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        expected = 'a number'
    else:
        return None
    return f'{key}: expected {expected} ({where}), got {value!r} ({type(value).__name__})'


def takes_list(component, name: str) -> bool:
    """Whether ``component``'s argument ``name`` is annotated to take a list (``Sequence[str]``, ``List``)."""
    param = parameter(component, name)
    words = re.findall(r'\w+', str(param.annotation)) if param is not None else []
    return any(w in ('List', 'Sequence', 'Tuple', 'list', 'tuple', 'Iterable') for w in words)


def takes_str(component, name: str) -> bool:
    """Whether ``component``'s argument ``name`` is annotated to take text (``Optional[str]``)."""
    param = parameter(component, name)
    if param is None or param.annotation is param.empty:
        return False
    return 'str' in re.findall(r'\w+', str(param.annotation))


def brace_dict(value) -> bool:
    """Whether a ``--cfg-options`` value is a ``{...}`` dict written out, which MMEngine's parser keeps as text, or
    cuts at its commas into a list of texts (``{'r':4,'lora_alpha':8}``: ``["{'r':4", "lora_alpha':8}"]``); the
    model then failed on it with a traceback once everything had loaded."""
    texts = list(value) if isinstance(value, (list, tuple)) else [value]
    return bool(texts) and all(isinstance(t, str) for t in texts) and texts[0].lstrip().startswith('{') \
        and texts[-1].rstrip().endswith('}')


#: settings whose values have a range, by the key's ending: (what is expected, whole numbers only, the least,
#: the least excluded[, the most, excluded]); torch and MMEngine refuse them only once the optimizer is built, with a
#: traceback, or (a NaN learning rate) train on with it
RANGES = {
    'optim_wrapper.optimizer.lr': ('a finite number >= 0', False, 0, False),
    'optim_wrapper.optimizer.weight_decay': ('a finite number >= 0', False, 0, False),
    'optim_wrapper.optimizer.eps': ('a finite number >= 0', False, 0, False),
    'randomness.seed': ('a whole number >= 0 and < 2**32', True, 0, False, 2 ** 32),   # (numpy's seed)
    'optim_wrapper.clip_grad.max_norm': ('a finite number > 0', False, 0, True),
    'optim_wrapper.accumulative_counts': ('a whole number >= 1', True, 1, False),
    'train_dataloader.batch_size': ('a whole number >= 1', True, 1, False),
    'train_dataloader.sampler.per_device_batch_size': ('a whole number >= 1', True, 1, False),
    'train_dataloader.num_workers': ('a whole number >= 0', True, 0, False),
    # torch's worker iterator asserted it (a traceback once the model had loaded)
    'train_dataloader.prefetch_factor': ('a whole number >= 1', True, 1, False),
    # the data set's and the loop's: a traceback after the model loaded, or a division by zero in the logger
    'train_dataloader.dataset.max_length': ('a whole number >= 1', True, 1, False),
    'train_dataloader.dataset.max_dynamic_patch': ('a whole number >= 1', True, 1, False),
    'train_dataloader.dataset.min_dynamic_patch': ('a whole number >= 1', True, 1, False),
    'train_dataloader.dataset.max_tokens': ('a whole number >= 1', True, 1, False),
    'train_dataloader.dataset.max_tiles': ('a whole number >= 1', True, 1, False),
    'default_hooks.logger.interval': ('a whole number >= 1', True, 1, False),
    'model.llm_lora.r': ('a whole number >= 1', True, 1, False),
    'model.vision_lora.r': ('a whole number >= 1', True, 1, False),
    # torch's dropout refused them as the adapters were built, in a traceback after the models loaded
    'model.llm_lora.lora_dropout': ('a number >= 0 and < 1', False, 0, False, 1),
    'model.vision_lora.lora_dropout': ('a number >= 0 and < 1', False, 0, False, 1),
    'model.vision_drop_path': ('a number >= 0 and < 1', False, 0, False, 1),
    # peft takes a negative one (each update of the adapters applied with its sign turned) and 0 (none applied)
    'model.llm_lora.lora_alpha': ('a number > 0', False, 0, True),
    'model.vision_lora.lora_alpha': ('a number > 0', False, 0, True),
    # MMEngine's CheckpointHook saved nothing but the last checkpoint at 0 or below, without a word (save_every's
    # range, engine/length.py)
    'default_hooks.checkpoint.interval': ('a whole number >= 1 (iterations between checkpoints)', True, 1, False),
}


#: backends other packages register with torch.distributed when they are imported, which may be after this check:
#: Ascend's torch_npu (hccl), Intel's oneCCL bindings (ccl), Cambricon's (cncl), Moore Threads' (mccl)
REGISTERED_ON_IMPORT = ('hccl', 'ccl', 'cncl', 'mccl')


def _backends():
    import torch.distributed
    return [name for name in torch.distributed.Backend.backend_list if name not in ('undefined', 'fake')] + [
        name for name in REGISTERED_ON_IMPORT if name not in torch.distributed.Backend.backend_list]


def _start_methods():
    import multiprocessing
    return multiprocessing.get_all_start_methods()


def _log_levels():
    import logging
    return [name for name in logging._nameToLevel if name not in ('FATAL', 'WARN', 'NOTSET')]


#: settings that take one of some names, by key: (the names, in words, a function giving them); each was taken on
#: to a traceback: a distributed backend torch does not have by a run of one process, and a run of several stopped in
#: 'AssertionError: Unknown backend type foo' from every rank; log_level=info (MMEngine's logger reads the upper-case
#: names only: 'KeyError: info') and mp_start_method=spwan ('cannot find context') as the runner was built;
#: clip_grad.type=foo once the model had loaded
CHOICES = {'env_cfg.dist_cfg.backend': ("torch.distributed's backends; the configs' DIST_BACKEND is nccl with CUDA, "
                                        'gloo without', _backends),
           'env_cfg.mp_cfg.mp_start_method': ("multiprocessing's start methods here", _start_methods),
           'log_level': ("logging's level names, in capitals, or a level's number", _log_levels),
           'optim_wrapper.clip_grad.type': ("MMEngine's kinds of clipping: the gradients' norm, or each value",
                                            lambda: ['norm', 'value'])}


def _choice_problem(key: str, value) -> Optional[str]:
    """The problem of a value of :data:`CHOICES` that is not one of its names (a backend also as torch writes a
    device's each, ``cpu:gloo,cuda:nccl``, in any case; a log level also as a number), or None."""
    words, names = CHOICES[key]
    known = names()
    if key == 'env_cfg.dist_cfg.backend' and isinstance(value, str):
        given = [part.rpartition(':')[2].strip().lower() for part in value.split(',')]
    else:
        given = [value]
    if value is None or all(isinstance(name, str) and name in known for name in given) or (
            key == 'log_level' and isinstance(value, int) and not isinstance(value, bool)):
        return None
    return f'{key}: expected one of {", ".join(known)} ({words}), got {value!r}'


#: settings that take a pair of numbers, by key: (what is expected, the least, the most excluded); torch's AdamW
#: refused another value once the model had loaded, with a traceback ('float' object is not subscriptable)
PAIRS = {'optim_wrapper.optimizer.betas': ("two numbers, each >= 0 and < 1 (AdamW's [beta1,beta2], e.g. "
                                           '[0.9,0.999])', 0, 1)}


def _pair_problem(key: str, value) -> Optional[str]:
    """The problem of a value of :data:`PAIRS` that is not two numbers in its range, or None."""
    import math
    expected, least, most = PAIRS[key]
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and least <= v < most
            for v in value)):
        return None
    return f'{key}: expected {expected}, got {value!r}'


#: a data set under packing's wrapper (``train_dataloader.dataset.dataset.max_length``): its settings' ranges are
#: the unwrapped data set's (a packed config's max_length=0 was refused by the data set after the model loaded)
_PACKED = re.compile(r'^train_dataloader\.dataset\.(?:dataset\.)+')


def out_of_range(key: str, value) -> Optional[str]:
    """The problem of a number outside its setting's range (:data:`RANGES`), or of a pair's (:data:`PAIRS`), or
    None."""
    import math
    if key in PAIRS:
        return _pair_problem(key, value)
    if key in CHOICES:
        return _choice_problem(key, value)
    rule = RANGES.get(key) or RANGES.get(_PACKED.sub('train_dataloader.dataset.', key))
    if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    expected, whole, least, excluded = rule[:4]
    most = rule[4] if len(rule) > 4 else math.inf   # (excluded)
    if (math.isfinite(value) and (not whole or float(value).is_integer())
            and (value > least if excluded else value >= least) and value < most):
        return None
    return f'{key}: expected {expected}, got {value!r}'


#: the MMEngine registry that builds the entry at a path (a list's index written N, any default hook's name *) from
#: a ``type`` given by name: the runner looked ``optim_wrapper.type=Foo`` up there once the model had loaded, and
#: stopped with a KeyError traceback
REGISTRIES = {'model': 'MODELS', 'optim_wrapper': 'OPTIM_WRAPPERS', 'optim_wrapper.optimizer': 'OPTIMIZERS',
              'param_scheduler': 'PARAM_SCHEDULERS', 'param_scheduler.N': 'PARAM_SCHEDULERS',
              'default_hooks.*': 'HOOKS', 'custom_hooks.N': 'HOOKS', 'train_cfg': 'LOOPS',
              'train_dataloader.sampler': 'DATA_SAMPLERS', 'visualizer': 'VISUALIZERS',
              'visualizer.vis_backends.N': 'VISBACKENDS', 'log_processor': 'LOG_PROCESSORS'}


def _registry(key: str):
    """The MMEngine registry of the ``type`` at ``key`` (``ENTRY.type``), or None."""
    if not key.endswith('.type'):
        return None
    path = re.sub(r'\.\d+(?=\.|$)', '.N', key[:-len('.type')])
    name = REGISTRIES.get(path) or REGISTRIES.get(re.sub(r'^default_hooks\.[^.]+$', 'default_hooks.*', path))
    if name is None:
        return None
    import mmengine.registry
    import mmengine.runner  # noqa: F401  (its optimizers, wrappers, schedulers, hooks, loops and samplers register)
    import xtuner_plugins.engine.progress  # noqa: F401  (this project's: its hooks, WarmupLR)
    import xtuner_plugins.engine.schedulers  # noqa: F401
    import xtuner_plugins.engine.streamstate  # noqa: F401
    return getattr(mmengine.registry, name)


def resolved_type(key: str, value):
    """What the runner builds for ``value`` given as ``ENTRY.type`` (``key``): the class or function the entry's
    registry has under that name (or a dotted path's), or None: not a name, no registry for the entry, none there."""
    registry = _registry(key) if isinstance(value, str) and value else None
    if registry is None:
        return None
    try:
        found = registry.get(value)
    except Exception:   # (MMEngine's 'Failed to get', a dotted path that does not import)
        found = None
    return found if callable(found) else None


def type_problem(key: str, value) -> Optional[str]:
    """The problem of a ``type`` given by a name its entry's registry does not have (:data:`REGISTRIES`), or
    None."""
    registry = _registry(key) if isinstance(value, str) else None
    if registry is None or resolved_type(key, value) is not None:
        return None
    import difflib
    names = sorted(registry.module_dict)
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
    which = (f'one of {", ".join(names)}' if len(names) <= 8 else f'one of its {len(names)} names' +
             (f' (closest: {", ".join(close)})' if close else ''))
    return (f'{key}: no {value!r} in MMEngine\'s {registry.name} registry, which the runner builds it from: give '
            f'{which}, or a class by its dotted path (module.Class)')
