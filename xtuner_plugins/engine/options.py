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
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Iterator, List, Mapping, Optional, Tuple

# what MMEngine's (and XTuner's) runner reads from a config; every other top-level name is the file's own variable
RUNNER_KEYS = {
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg',
    'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg',
    'log_processor', 'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name', 'strategy',
    'runner_type', 'compile', 'cfg', 'train_dataset',
}


def load_config(config: str, cfg_options: Optional[dict] = None):
    """An MMEngine config file with ``--cfg-options``-style overrides."""
    from mmengine.config import Config
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config not found: {config}')
    cfg = Config.fromfile(config)
    if cfg_options:
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


def _accepted(component) -> List[str]:
    """The keyword arguments ``component`` declares, or [] when it takes any (``**kwargs``) or cannot tell."""
    if not callable(component):
        return []
    try:
        params = inspect.signature(component).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _default(component, name: str):
    try:
        param = inspect.signature(component).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is param.empty else param.default


def _takes_sequence(component, name: str) -> bool:
    """Whether ``component``'s argument ``name`` is annotated to take a list (``repeat_times``: one per file)."""
    try:
        param = inspect.signature(component).parameters.get(name)
    except (TypeError, ValueError):
        return False
    text = str(param.annotation) if param is not None and param.annotation is not param.empty else ''
    return any(word in text for word in ('Sequence', 'List', 'list', 'Tuple', 'tuple', 'Iterable'))


def _wrong_kind(key: str, value, current, where: str, component=None) -> Optional[str]:
    """The problem of ``value`` for a setting whose value is ``current`` now, or None."""
    if value is None or current is None:
        return None
    if isinstance(value, (list, tuple)) and component is not None and _takes_sequence(component, key.split('.')[-1]):
        return None
    if isinstance(current, bool):
        if not isinstance(value, str):
            return None
        expected = 'true or false'
    elif isinstance(current, (int, float)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        expected = 'a number'
    else:
        return None
    return f'{key}: expected {expected} ({where} {current!r}), got {value!r} ({type(value).__name__})'


def check_cfg_options(cfg: Mapping, options: Mapping) -> List[str]:
    """Problems of ``options`` (``--cfg-options``) against ``cfg`` (the config as read), one line each."""
    cfg = getattr(cfg, '_cfg_dict', cfg)  # an mmengine Config holds its ConfigDict
    problems = []
    for key in options:
        parts = key.split('.')
        top = parts[0]
        if len(parts) == 1 and top in cfg and top not in RUNNER_KEYS and not isinstance(cfg[top], Mapping):
            value = cfg[top]
            holders = [path for path, v in _leaves({k: v for k, v in cfg.items() if k in RUNNER_KEYS})
                       if v == value and v not in (None, True, False)] if value is not None else []
            where = f'set {", ".join(holders[:6])} instead' if holders else 'set the entries that use it instead'
            problems.append(f'{key}: a variable of the config file, already used when the file was read; '
                            f'--cfg-options cannot change what it set: {where}')
            continue
        node = cfg
        for part in parts[:-1]:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
                break
        if isinstance(node, Mapping) and parts[-1] in node:
            wrong = _wrong_kind(key, options[key], node[parts[-1]], 'the config has', node.get('type'))
        elif isinstance(node, Mapping) and 'type' in node:
            name = getattr(node['type'], '__name__', str(node['type']))
            wrong = _wrong_kind(key, options[key], _default(node['type'], parts[-1]), f'{name}\'s default is')
        else:
            wrong = None
        if wrong:
            problems.append(wrong)
            continue
        if not isinstance(node, Mapping) or parts[-1] in node or 'type' not in node:
            continue
        accepted = _accepted(node['type'])
        if accepted and parts[-1] not in accepted:
            close = difflib.get_close_matches(parts[-1], accepted, n=3, cutoff=0.6)
            name = getattr(node['type'], '__name__', str(node['type']))
            hint = f'; closest: {", ".join(".".join(parts[:-1] + [c]) for c in close)}' if close else ''
            problems.append(f'{key}: {name} has no setting {parts[-1]!r}{hint}')
    return problems
