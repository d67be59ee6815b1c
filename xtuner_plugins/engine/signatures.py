"""What a component of a config takes: the keyword arguments of its class or function, through the classes it
passes ``**kwargs`` on to. Read by the ``--cfg-options`` checks (``engine/options.py``) and by the training
length (``engine/length.py``: a loop that takes ``max_iters`` but not ``max_epochs``).
"""

from __future__ import annotations

import inspect
from typing import Iterator, List, Optional


def stand_in(component):
    """What ``component``'s settings are read from: a class that builds another one in ``__new__`` (``**kwargs``
    only: ``AutoOptimWrapper``) names it in a static ``builds()``; anything else is its own."""
    builds = getattr(component, 'builds', None) if inspect.isclass(component) else None
    return builds() if callable(builds) else component


def signatures(component) -> Iterator[inspect.Signature]:
    """The signature of ``component`` (its :func:`stand_in`'s), then, while it takes ``**kwargs``, those of the
    classes it passes them on to: the next ``__init__`` up its class hierarchy."""
    component = stand_in(component)
    try:
        yield inspect.signature(component)
    except (TypeError, ValueError):
        return
    if not inspect.isclass(component):
        return
    for base in component.__mro__[1:]:
        if base is object:
            return
        if '__init__' in vars(base):
            try:
                yield inspect.signature(vars(base)['__init__'])
            except (TypeError, ValueError):
                return


def _takes_no_more(component) -> bool:
    """MMEngine's CheckpointHook passes its ``**kwargs`` to ``runner.save_checkpoint``, which it gives every
    argument of already: its documented arguments are the valid set."""
    from mmengine.hooks import CheckpointHook
    return inspect.isclass(component) and issubclass(component, CheckpointHook)


def accepted(component) -> Optional[List[str]]:
    """The keyword arguments ``component`` takes ([] for none: a hook without settings), or None when it takes
    any (``**kwargs`` that reach no class that says) or cannot tell."""
    if not callable(component):
        return None
    names = []
    for signature in signatures(component):
        params = signature.parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ('self', 'cls') and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params) or _takes_no_more(component):
            return names
    return None


def parameter(component, name: str) -> Optional[inspect.Parameter]:
    """``component``'s parameter ``name`` (looked up through its ``**kwargs``), or None."""
    for signature in signatures(component) if callable(component) else ():
        if name in signature.parameters:
            return signature.parameters[name]
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return None
    return None


def hook_option(runner, hook: str, setting: str) -> str:
    """The ``--cfg-options`` that gives ``setting`` (``key=value``) to ``runner``'s custom hook of the class named
    ``hook`` (by its index in ``custom_hooks``), or the hook's setting in words when the config lists none."""
    hooks = (getattr(runner, 'cfg', None) or {}).get('custom_hooks') or []
    for index, entry in enumerate(hooks):
        kind = entry.get('type') if isinstance(entry, dict) else None
        if getattr(kind, '__name__', str(kind)).rsplit('.', 1)[-1] == hook:
            return f'--cfg-options custom_hooks.{index}.{setting}'
    key, _, value = setting.partition('=')
    return f"{hook}'s {key}={value!r}"
