"""Training length in the user's words: ``max_epochs=N`` or ``max_iters=N``, and ``save_every=N``.

These are top-level settings of a config (``configs/_base_/schedules/cosine.py``,
``configs/_base_/default_runtime.py``), also as ``--cfg-options max_epochs=3`` or ``max_iters=200 save_every=50``.
A config file's variables are copied into the entries that use them when the file is read, so a later change
would reach neither the loop nor the learning-rate schedule. Here nothing is copied at parse time: the loop
(``train_cfg``) carries no length, the schedule's ``begin``/``end`` are fractions of the run
(``schedule_unit = 'run'``) and the checkpoint hook no interval. :func:`resolve_training_length` fills them in
from the final values when the runner is built (``engine/runstart.py``): the loop gets the length, the warm-up
and the cosine decay are stretched over it (by iterations with ``max_iters``), and the checkpoint hook saves
every ``save_every`` iterations.

Which value wins: an entry set explicitly (``train_cfg.max_epochs=3``, ``default_hooks.checkpoint.interval=10``)
over the config's top-level default; a top-level setting given on the command line over the entry; both on the
command line with different values, or ``max_epochs`` and ``max_iters`` both there: refused, named.
"""

from __future__ import annotations

from numbers import Number
from typing import Mapping, MutableMapping, Optional

from xtuner_plugins.engine.signatures import accepted
from xtuner_plugins.errors import Refused

#: the top-level settings this module reads (``schedule_unit``: the config's own, not for the command line)
LENGTH_KEYS = ('max_epochs', 'max_iters', 'save_every', 'schedule_unit')
_LOOP = ('max_epochs', 'max_iters')


def length_value_problem(key: str, value) -> Optional[str]:
    """The problem of one top-level length setting's value, or None."""
    if key == 'schedule_unit':
        return None if value in ('run', 'loop', 'epochs', 'iters', None) else (
            f"schedule_unit: expected 'run' (param_scheduler's begin/end are fractions of the run), got {value!r}")
    if value is None and key in _LOOP:
        return None
    whole = isinstance(value, int) and not isinstance(value, bool)
    number = isinstance(value, Number) and not isinstance(value, bool)
    if (whole or (key == 'max_epochs' and number)) and value > 0:
        return None
    kind = 'a positive number of epochs' if key == 'max_epochs' else 'a positive whole number'
    return f'{key}: expected {kind}, got {value!r} ({type(value).__name__})'


def both_lengths_problem(options: Mapping) -> Optional[str]:
    """``max_epochs`` and ``max_iters`` both given (not None): one or the other."""
    if options.get('max_epochs') is not None and options.get('max_iters') is not None:
        return (f'max_epochs={options["max_epochs"]} and max_iters={options["max_iters"]}: give one of them '
                '(max_epochs counts passes over the data, max_iters iterations)')
    return None


def _target(cfg: Mapping, loop: Mapping, changed: Mapping):
    """``('max_epochs'|'max_iters', N)`` the run should last, or None when the config gives no length."""
    given = {k: changed[k] for k in _LOOP if changed.get(k) is not None}
    in_loop = {k: changed[f'train_cfg.{k}'] for k in _LOOP if changed.get(f'train_cfg.{k}') is not None}
    for k in _LOOP:   # the loop's own length, checked as the top-level one (-5 ran 0 iterations, exit 0)
        problem = length_value_problem(k, loop.get(k))
        if problem:
            raise Refused(f'train_cfg.{problem}')
    for problem in (both_lengths_problem(given), both_lengths_problem(in_loop)):
        if problem:
            raise Refused(problem)
    if given and in_loop and set(given.items()) != set(in_loop.items()):
        (key, value), (lkey, lvalue) = next(iter(given.items())), next(iter(in_loop.items()))
        raise Refused(f'{key}={value} and train_cfg.{lkey}={lvalue}: give {key} only (the learning-rate '
                      'schedule follows it)')
    if given:
        return next(iter(given.items()))
    explicit = {k: loop[k] for k in _LOOP if loop.get(k) is not None}
    if len(explicit) == 2:
        raise Refused(f'train_cfg has max_epochs={explicit["max_epochs"]} and max_iters={explicit["max_iters"]}: '
                      'set one of them (max_epochs=N or max_iters=N at the top level)')
    if explicit:
        return next(iter(explicit.items()))
    if cfg.get('max_iters') is not None:  # max_iters, when set, wins over the base's max_epochs
        return 'max_iters', cfg['max_iters']
    if cfg.get('max_epochs') is not None:
        return 'max_epochs', cfg['max_epochs']
    return None


def _scale_schedule(schedulers, key: str, n) -> None:
    """Stretch ``begin``/``end`` given as fractions of the run over ``n`` epochs, or ``n`` iterations (integers,
    a ``WarmupLR`` span at least two iterations, every span at least one)."""
    from xtuner_plugins.engine.schedulers import WarmupLR
    entries = [s for s in (schedulers if isinstance(schedulers, (list, tuple)) else [schedulers])
               if isinstance(s, MutableMapping)]
    if key == 'max_epochs':
        for entry in entries:
            for end in ('begin', 'end'):
                if end in entry:
                    entry[end] = entry[end] * n
        return
    bounds = sorted({float(e[k]) for e in entries for k in ('begin', 'end') if k in e})
    warm = {(float(e.get('begin', 0)), float(e['end'])) for e in entries
            if 'end' in e and isinstance(e.get('type'), type) and issubclass(e['type'], WarmupLR)}
    new = {}
    for i, bound in enumerate(bounds):
        new[bound] = round(bound * n)
        if i:
            gap = 2 if (bounds[i - 1], bound) in warm else 1
            new[bound] = max(new[bound], new[bounds[i - 1]] + gap)
    for entry in entries:
        for end in ('begin', 'end'):
            if end in entry:
                entry[end] = new[float(entry[end])]
        entry['by_epoch'] = False
        entry.pop('convert_to_iter_based', None)


def schedule_value_problem(schedulers, unit: Optional[str] = None) -> Optional[str]:
    """A learning-rate schedule's number that is NaN or infinite, or an ``eta_min`` below 0, named; or None.
    (``eta_min=nan`` trained on, and the run ended in a non-finite loss blamed on the batch's samples.) A linear
    warm-up's ``start_factor`` of 0 (MMEngine divides by it: a ZeroDivisionError once the model had loaded) or past 1,
    and with ``unit='run'`` a ``begin``/``end`` that is no fraction of the run (a warm-up to ``end=2.0`` lasted twice
    the run, its learning rate never reached), are named too."""
    import math

    from mmengine.optim import LinearLR
    entries = schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            continue
        linear = isinstance(entry.get('type'), type) and issubclass(entry['type'], LinearLR)
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, Number):
                continue
            if not math.isfinite(value) or (key in ('eta_min', 'eta_min_ratio') and value < 0):
                return f'param_scheduler.{i}.{key}: expected a finite number{" >= 0" if "eta" in key else ""}, ' \
                       f'got {value!r}'
            if linear and key in ('start_factor', 'end_factor') and not (0 < value <= 1 or key == 'end_factor'
                                                                          and value == 0):
                return (f'param_scheduler.{i}.{key}: expected a number > 0 and <= 1 (the share of the learning rate '
                        f'{"the warm-up starts" if key == "start_factor" else "it ends"} at), got {value!r}')
            if unit == 'run' and key in ('begin', 'end') and not 0 <= value <= 1:
                return (f'param_scheduler.{i}.{key}: expected a fraction of the run from 0 to 1 '
                        f"(schedule_unit='run'), got {value!r}")
        if unit == 'run' and all(isinstance(entry.get(k), Number) for k in ('begin', 'end')) \
                and entry['begin'] >= entry['end']:
            return (f'param_scheduler.{i}: begin {entry["begin"]!r} is not before end {entry["end"]!r} (fractions of '
                    f"the run, schedule_unit='run')")
    return None


def schedule_over_loop(schedulers, max_iters: int) -> None:
    """Stretch ``begin``/``end`` left as fractions of the run (``schedule_unit = 'loop'``: a fractional
    ``max_epochs``) over the loop's ``max_iters`` iterations, in place, as for ``max_iters``."""
    _scale_schedule(schedulers, 'max_iters', max_iters)


def resolve_training_length(cfg: MutableMapping, changed: Mapping = ()) -> None:
    """Fill in the loop's length, the schedule and the checkpoint interval from the final top-level settings
    (in place; see the module docstring). ``changed``: ``{key: value}`` the command line set (the run's
    config compared with its file); a config whose schedule is resolved already is left as it is."""
    changed = dict(changed or {})
    for key in LENGTH_KEYS:
        problem = length_value_problem(key, cfg.get(key)) if key in cfg else None
        if problem:
            raise Refused(problem)
    problem = schedule_value_problem(cfg.get('param_scheduler'), cfg.get('schedule_unit'))
    if problem:
        raise Refused(problem)
    loop = cfg.get('train_cfg')
    target = _target(cfg, loop, changed) if isinstance(loop, MutableMapping) else None
    if target is not None:
        key, n = target
        other = 'max_iters' if key == 'max_epochs' else 'max_epochs'
        takes = accepted(loop.get('type'))
        if takes is not None and key not in takes:
            name = getattr(loop['type'], '__name__', loop['type'])
            raise Refused(f'{key}={n}: train_cfg\'s {name} takes {other}, not {key}: set {other} instead')
        loop.pop(other, None)
        loop[key] = n
        if key in cfg or other in cfg:
            cfg[key], cfg[other] = n, None
        if cfg.get('schedule_unit') == 'run' and cfg.get('param_scheduler') is not None:
            if key == 'max_epochs' and not float(n).is_integer():
                # MMEngine would truncate 0.1 x 6 iterations to an end of 0 and refuse it with a traceback: the
                # loop, which knows its iterations, stretches the fractions (schedule_over_loop, engine/epochs.py)
                cfg['schedule_unit'] = 'loop'
            else:
                _scale_schedule(cfg['param_scheduler'], key, n)
                cfg['schedule_unit'] = 'epochs' if key == 'max_epochs' else 'iters'
    _resolve_checkpoint(cfg, changed)


def _resolve_checkpoint(cfg: MutableMapping, changed: Mapping) -> None:
    every = cfg.get('save_every')
    hooks = cfg.get('default_hooks')
    hook = hooks.get('checkpoint') if isinstance(hooks, Mapping) else None
    interval = 'default_hooks.checkpoint.interval'
    if 'save_every' in changed and interval in changed and changed['save_every'] != changed[interval]:
        raise Refused(f'save_every={changed["save_every"]} and {interval}={changed[interval]}: give save_every '
                      'only')
    if every is None:
        return
    if not isinstance(hook, MutableMapping):
        if 'save_every' in changed:
            raise Refused(f'save_every={every}: the config has no default_hooks.checkpoint to set')
        return
    if 'save_every' in changed or hook.get('interval') is None:
        hook['interval'] = every
        hook['by_epoch'] = False


def accumulation(cfg: Mapping) -> int:
    """Iterations per optimizer step: DeepSpeed's ``gradient_accumulation_steps`` (``xtuner train --deepspeed``
    moves ``optim_wrapper.accumulative_counts`` there), else ``optim_wrapper.accumulative_counts``."""
    strategy, wrapper = cfg.get('strategy'), cfg.get('optim_wrapper')
    if isinstance(strategy, Mapping) and isinstance(strategy.get('gradient_accumulation_steps'), int):
        return max(strategy['gradient_accumulation_steps'], 1)
    counts = wrapper.get('accumulative_counts', 1) if isinstance(wrapper, Mapping) else 1
    return counts if isinstance(counts, int) and counts > 0 else 1
