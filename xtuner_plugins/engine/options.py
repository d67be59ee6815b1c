"""A config file with its ``--cfg-options`` (:func:`load_config`), the options checked against the config before
anything is built (:func:`check_cfg_options`).

MMEngine merges any key silently. Two mistakes then cost a run: setting a config file's own variable
(``llm_path=...``), which the file already copied into the entries that use it when it was read, so the
run goes on with the old value; and a misspelt setting of a component (``model.vision_encodr=...``), which
fails only when the component is built, deep in a traceback. :func:`check_cfg_options` names both, with the
entries to set instead or the closest valid names. Keys a component does not declare but may accept (a
``**kwargs`` or a function MMEngine cannot inspect), and new sub-dicts, are left alone.

A value of the wrong kind (``max_length=abc``, which MMEngine keeps as the text ``'abc'``) is named with the kind
expected: a number where the config (or, for a setting it leaves out, the component's default) has a number,
``true``/``false`` where it has a boolean. ``None`` is always let through (many settings take it).

Every other key is checked too: a top-level name the run does not read (``max_epoch=3``), an entry missing from
a set of components (``default_hooks.chekpoint.interval``) and a setting a component's class does not take,
through the classes it passes ``**kwargs`` on to (``train_cfg.max_epoch``), named with the closest valid ones.
MMEngine's ``CheckpointHook`` passes its ``**kwargs`` to ``Runner.save_checkpoint``, which gets every argument
it has from the hook already: its documented arguments are all it takes (``default_hooks.checkpoint.intervall``).
The training length in the user's words (``max_epochs``, ``max_iters``, ``save_every``) is ``engine/length.py``'s;
what a component takes, ``engine/signatures.py``'s; a value against its setting's kind and range,
``engine/option_values.py``'s.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterator, List, Mapping, Optional, Tuple

from xtuner_plugins.engine.length import LENGTH_KEYS, both_lengths_problem, length_value_problem
from xtuner_plugins.cfg_words import option_into_unset
from xtuner_plugins.engine.option_values import (brace_dict, component_name, default_of, out_of_range, resolved_type,
                                                 takes_list, takes_str, type_problem, wrong_kind)
from xtuner_plugins.engine.signatures import accepted

# what MMEngine's (and XTuner's) runner reads from a config; every other top-level name is the file's own variable
RUNNER_KEYS = {
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg',
    'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg',
    'log_processor', 'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name', 'strategy',
    'runner_type', 'compile', 'cfg', 'train_dataset', 'model_wrapper_cfg',
}
# what XTuner's train script reads besides
XTUNER_KEYS = {'framework', 'training_args', 'trainer', 'lora', 'use_varlen_attn', 'sequence_parallel',
               'sequence_parallel_size'}


def load_config(config: str, cfg_options: Optional[dict] = None):
    """An MMEngine config file with ``--cfg-options``-style overrides; a ValueError of one line for an option
    MMEngine cannot merge (:func:`option_into_unset`)."""
    from mmengine.config import Config
    if os.path.isdir(config):
        raise FileNotFoundError(f'{config} is a folder: give a config file in it (e.g. {config}/finetune_lora.py)')
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config not found: {config}')
    cfg = Config.fromfile(config)
    if cfg_options:
        problem = option_into_unset(cfg, cfg_options)
        if problem:
            raise ValueError(f'--cfg-options: {problem}')
        cfg.merge_from_dict(cfg_options)
    return cfg


def _leaves(node, prefix: str = '') -> Iterator[Tuple[str, object]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, f'{prefix}{key}.')
    elif isinstance(node, (list, tuple)) and any(isinstance(v, Mapping) for v in node):
        for i, value in enumerate(node):
            yield from _leaves(value, f'{prefix}{i}.')
    else:
        yield prefix[:-1], node


def _closest(word: str, choices, prefix: List[str]) -> str:
    close = difflib.get_close_matches(word, sorted(set(choices)), n=3, cutoff=0.6)
    return f'; closest: {", ".join(".".join(prefix + [c]) for c in close)}' if close else ''


#: settings a builder takes out of an entry before it builds the entry's component, by the entry's path:
#: MMEngine's ``build_optim_wrapper`` the wrapper's ``constructor`` and ``paramwise_cfg``, and this project's
#: constructor the optimizer's ``paramwise_cfg`` (``engine/optim.py``)
TAKEN_OUT = {('optim_wrapper',): ('constructor', 'paramwise_cfg'), ('optim_wrapper', 'optimizer'): ('paramwise_cfg',)}
#: and the runner's ``build_param_scheduler`` from each scheduler (its ``convert_to_iter_based``, whatever its index)
SCHEDULER_TAKEN_OUT = ('convert_to_iter_based',)


def _unknown_setting(parts: List[str], component, node=None) -> Optional[str]:
    """``parts[-1]`` is not a setting of ``component`` (the entry at ``parts[:-1]``, ``node``), or None. Where an
    entry inside ``node`` has that setting (a packed data set wraps the data set: ``dataset.dataset.data_files``),
    that entry is named first. MMEngine's ``_delete_`` (replace the entry, do not merge) is every entry's."""
    if parts[-1] == '_delete_' or parts[-1] in TAKEN_OUT.get(tuple(parts[:-1]), ()) or (
            parts[0] == 'param_scheduler' and parts[-1] in SCHEDULER_TAKEN_OUT):
        return None
    takes = accepted(component)
    if takes is None or parts[-1] in takes:
        return None
    inner = [path for path, value in _nodes(node or {}) if path.endswith('.' + parts[-1]) or path == parts[-1]]
    hint = f'; it is {".".join(parts[:-1] + [inner[0]])}' if inner else _closest(parts[-1], takes, parts[:-1])
    return f'{".".join(parts)}: {component_name(component)} has no setting {parts[-1]!r}{hint}'


def _is_component(node) -> bool:
    return isinstance(node, Mapping) and 'type' in node


def _env_cfg(cudnn_benchmark: bool = False, mp_cfg: Optional[dict] = None, dist_cfg: Optional[dict] = None,
             resource_limit: int = 4096) -> None:
    """The settings MMEngine's ``Runner.setup_env`` reads from ``env_cfg``, a plain dict (0.10)."""


def _clip_grad(type: str = 'norm', max_norm: Optional[float] = None, norm_type: float = 2.0,
               error_if_nonfinite: bool = False, foreach: Optional[bool] = None,
               clip_value: Optional[float] = None) -> None:
    """The settings of an optimizer wrapper's ``clip_grad``: its kind (``'norm'`` or ``'value'``), then the
    arguments of ``torch.nn.utils.clip_grad_norm_`` or ``clip_grad_value_`` (MMEngine's ``OptimWrapper``)."""


_env_cfg.__name__, _clip_grad.__name__ = "MMEngine's env_cfg", "OptimWrapper's clip_grad"   # in the messages

#: what reads the settings of entries that are plain dicts (no ``type``), by their path; ``module:name`` is
#: imported on use (peft and MMEngine's runner are not imported for a config that does not set them)
UNTYPED = {('env_cfg',): _env_cfg, ('randomness',): 'mmengine.runner:Runner.set_randomness',
           ('log_processor',): 'mmengine.runner:LogProcessor', ('optim_wrapper', 'clip_grad'): _clip_grad,
           ('model', 'llm_lora'): 'peft:LoraConfig', ('model', 'vision_lora'): 'peft:LoraConfig'}


def _reader(path: List[str]):
    """What takes the plain dict at ``path`` (:data:`UNTYPED`; a data loader's are torch's ``DataLoader``'s), or
    None."""
    if len(path) == 1 and path[0].endswith('_dataloader'):
        from torch.utils.data import DataLoader
        return DataLoader
    reader = UNTYPED.get(tuple(path))
    if isinstance(reader, str):
        import importlib
        module, name = reader.split(':')
        reader = importlib.import_module(module)
        for attr in name.split('.'):
            reader = getattr(reader, attr)
    return reader


def _as_component(node, path: List[str]):
    """``node`` with a ``type``: a plain dict with the one that reads it (:func:`_reader`)."""
    if isinstance(node, Mapping) and 'type' not in node:
        reader = _reader(path)
        if reader is not None:
            return dict(node, type=reader)
    return node


def _nodes(node, prefix: str = '') -> Iterator[Tuple[str, object]]:
    """Every entry under ``node``, sub-dicts included, with its path."""
    if prefix:
        yield prefix[:-1], node
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _nodes(value, f'{prefix}{key}.')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _nodes(value, f'{prefix}{i}.')


def _file_variable(cfg: Mapping, parts: List[str]) -> str:
    """``parts[0]`` is a variable of the file: name the entries that hold its value (``llm_lora.r``: the
    ``r`` of the entries that hold the ``llm_lora`` dict)."""
    value, rest = cfg[parts[0]], ''.join(f'.{p}' for p in parts[1:])
    holders = [path + rest for path, v in _nodes({k: v for k, v in cfg.items() if k in RUNNER_KEYS})
               if v == value and v not in (None, True, False)] if value is not None else []
    # a dict, a list or a path names its holders; a number is only found among the settings of that value
    # (save_total_limit=2 matched train_dataloader.num_workers, 2 as well, beside max_keep_ckpts)
    telling = isinstance(value, (Mapping, list, tuple)) or (isinstance(value, str) and len(value) > 3)
    where = ('set the entries that use it instead' if not holders else f'set {", ".join(holders[:6])} instead'
             if telling else f'set the entry that uses it instead; those holding its value ({value!r}) are '
             f'{", ".join(holders[:6])}')
    return (f'{".".join(parts)}: a variable of the config file, already used when the file was read; '
            f'--cfg-options cannot change what it set: {where}')


def _walk(cfg: Mapping, parts: List[str], options: Mapping):
    """The entry that holds ``parts[-1]`` (None when there is none), or the problem of a missing entry on the
    way: a setting its component does not take, or an entry missing from a set of components."""
    node = cfg
    for i, part in enumerate(parts[:-1]):
        node = _as_component(node, parts[:i]) if i else node
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif _is_component(node):
            return None, _unknown_setting(parts[:i + 1], node['type'])
        elif (isinstance(node, Mapping) and node and i and all(_is_component(v) for v in node.values())
              and '.'.join(parts[:i + 1] + ['type']) not in options):
            return None, (f'{".".join(parts)}: {".".join(parts[:i])} has no entry {part!r} (a new one needs '
                          f'a type){_closest(part, node, parts[:i])}')
        else:
            return None, None
    return _as_component(node, parts[:-1]), None


def check_cfg_options(cfg: Mapping, options: Mapping) -> List[str]:
    """Problems of ``options`` (``--cfg-options``) against ``cfg`` (the config as read), one line each."""
    cfg = getattr(cfg, '_cfg_dict', cfg)  # an mmengine Config holds its ConfigDict
    problems = [p for p in [both_lengths_problem(options)] if p]
    cfg, problems = _with_given_types(cfg, options, problems)
    known = RUNNER_KEYS | XTUNER_KEYS | set(LENGTH_KEYS)
    for key in options:
        parts = key.split('.')
        top = parts[0]
        if len(parts) == 1 and top in LENGTH_KEYS:
            problem = length_value_problem(top, options[key])
        elif top in cfg and top not in known:
            problem = _file_variable(cfg, parts)
        elif top not in cfg and top not in known:
            settings = [k for k in cfg if isinstance(cfg[k], Mapping)] + sorted(known)
            problem = f'{key}: {top!r} is not a setting the run reads{_closest(top, settings, [])}'
        else:
            problem = (type_problem(key, options[key])
                       or _brace_problem(cfg, parts, key, options) or _split_text_problem(cfg, parts, key, options)
                       or _delete_problem(cfg, parts, key, options)
                       or _check_entry(cfg, parts, key, options) or out_of_range(key, options[key]))
        if problem:
            problems.append(problem)
    return problems


def _with_given_types(cfg: Mapping, options: Mapping, problems: List[str]):
    """``cfg`` with the types ``options`` name (``optim_wrapper.optimizer.type=SGD``) in place, so that the entry's
    other settings are checked against what the run builds, and ``problems`` with each setting the config gives such
    an entry that its new type does not take (AdamW's ``betas`` under SGD: a TypeError once the model had loaded)."""
    given = [(key[:-len('.type')], resolved_type(key, value)) for key, value in options.items()
             if key.endswith('.type')]
    given = [(entry, found) for entry, found in given if found is not None]
    if not given:
        return cfg, problems
    import copy
    cfg = copy.deepcopy(cfg)
    for entry, found in given:
        parts = entry.split('.')
        node, _ = _walk(cfg, parts + ['type'], options)
        if not _is_component(node):
            continue
        node['type'] = found
        for name in [] if options.get(f'{entry}._delete_') else node:   # (_delete_: the config's are dropped)
            if name != 'type' and f'{entry}.{name}' not in options:
                unknown = _unknown_setting(parts + [name], found)
                if unknown:
                    problems.append(f'{entry}.type={options[entry + ".type"]}: {unknown}, which the config gives '
                                    f'({entry}.{name}={node[name]!r:.40}): give {entry}._delete_=True with the '
                                    f'settings {component_name(found)} takes')
    return cfg, problems


def _brace_problem(cfg: Mapping, parts: List[str], key: str, options: Mapping) -> Optional[str]:
    """The line for a ``{...}`` dict written out (``option_values.brace_dict``) as a setting that holds settings, or
    None (no such value; a setting that takes text, ``frame_prefix={i}``, ``system={...}``: the config gives it text,
    or its component's argument takes ``str``)."""
    if not brace_dict(options[key]):
        return None
    node, _ = _walk(cfg, parts, options)
    absent = object()
    current = node.get(parts[-1], absent) if isinstance(node, Mapping) else absent
    if isinstance(current, str):
        return None
    if current in (None, absent) and _is_component(node) and takes_str(node['type'], parts[-1]):
        return None
    fresh = f' beside {key}._delete_=True' if current is not absent and not isinstance(current, Mapping) else ''
    return (f'{key}: --cfg-options does not read a {{...}} dict (MMEngine took {options[key]!r}): set each entry on '
            f'its own, {key}.NAME=VALUE{fresh}')


def _delete_problem(cfg: Mapping, parts: List[str], key: str, options: Mapping) -> Optional[str]:
    """The line for ``KEY._delete_`` where the config gives no ``KEY``: MMEngine drops ``_delete_`` only when it
    replaces an entry the config has, and otherwise hands it on (peft's ``LoraConfig`` then failed on it, with a
    traceback, once the models had loaded)."""
    if len(parts) < 2 or parts[-1] != '_delete_':
        return None
    node, _ = _walk(cfg, parts[:-1], options)
    if not isinstance(node, Mapping) or parts[-2] in node:
        return None
    parent = '.'.join(parts[:-1])
    return (f'{key}: the config gives no {parent} to replace (_delete_ replaces a setting the config has): leave '
            f'it out, and set {parent}.NAME=VALUE')


def _split_text_problem(cfg: Mapping, parts: List[str], key: str, options: Mapping) -> Optional[str]:
    """The line for a text setting MMEngine's parser cut at its commas into a list (``system=Hi,there``:
    ``['Hi', 'there']``; the model or data set then took a list for its text), or None: a setting of a component
    whose argument is annotated to take text and no list (``data_files`` takes both: a list stays a list)."""
    value = options[key]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value) or brace_dict(value):
        return None
    node, _ = _walk(cfg, parts, options)
    absent = object()
    current = node.get(parts[-1], absent) if isinstance(node, Mapping) else absent
    if not (isinstance(current, str) or current in (None, absent)) or not _is_component(node):
        return None
    if not takes_str(node['type'], parts[-1]) or takes_list(node['type'], parts[-1]):
        return None
    return (f'{key}: takes one text, and MMEngine\'s --cfg-options cut the value at its commas into '
            f'{len(value)} ({list(value)!r:.80}): set a text holding a comma in a config file')


def _check_entry(cfg: Mapping, parts: List[str], key: str, options: Mapping) -> Optional[str]:
    node, problem = _walk(cfg, parts, options)
    if problem or not isinstance(node, Mapping):
        return problem
    if parts[-1] in node:
        return wrong_kind(key, options[key], node[parts[-1]], f'the config has {node[parts[-1]]!r}',
                           node.get('type'))
    if 'type' not in node:
        return None
    current, where = default_of(node['type'], parts[-1])
    return (wrong_kind(key, options[key], current, where, node['type'])
            or _unknown_setting(parts, node['type'], node))
