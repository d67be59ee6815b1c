"""A resume goes on with the settings its checkpoint was trained with, read from it, not typed again.

MMEngine stores the run's whole config, its ``--cfg-options`` applied, in every checkpoint (``meta['cfg']``). A
resume builds the run from the config file given, though, so a run started with
``--cfg-options model.llm=/models/Qwen2.5-7B train_dataloader.dataset.data_files=[mine.jsonl]`` and resumed with
``--resume iter_500.pth`` alone built the config file's own models and data: it stopped on a folder of the config's
example paths (``vision encoder folder not found: models/InternViT-300M-448px-V2_5``), or was refused on each
setting that shapes the model (``resume.setting_conflicts``), to be given again one by one.

:func:`take_resumed_settings`, before anything is built, takes from the resumed checkpoint's recorded config
what makes the run the one it resumes, where the command line names none of it:

* the source folders (``model.vision_encoder``, ``llm``, ``tokenizer``, ``official_checkpoint``) where the
  recorded one is still there (its absolute path first), and None where the run had none (a run from an official
  checkpoint); a folder gone is said, and the config's is used (the resume's fingerprint check compares it);
* the model's other settings (the projector, the template, what is frozen, the LoRA settings, the dtype,
  ``from_scratch``, ...), but those of how this run computes (:data:`HOW_IT_RUNS`: checkpointing, attention
  kernels, compilation), which a resume may change;
* the data set's settings at every level (packing's budgets, a shard set's folder, its files, tiling, lengths,
  template) but :data:`THIS_RUNS`: the cache and what input the run accepts (a checkpoint from a shared work folder
  does not turn the safety checks off; one that differs is said). Files and folders are taken where they are there
  (a relative path is read from this working directory): otherwise said, and the config's are used. A component
  the config builds of another class than the run's (another data set) keeps its settings, said;
* the batch size and the sampler's settings (a resume with other batches is refused by ``engine/dataagree.py``),
  and a stream's DataLoader workers (its saved position is theirs: ``engine/streamstate.py``),
  the gradient accumulation and clipping, in the optimizer wrapper's or DeepSpeed's words (``strategy``: XTuner
  moves them there under ``--deepspeed``), and the optimizer's settings, which its saved state restores anyway;
* the training length (``max_iters`` / ``max_epochs``): a resume went on to the config's, and one resumed past
  it ended at once, 'done', the iterations it was started for untrained;
* the hooks' settings, the log's window and the seed (:func:`_runtime`): under the config's ``max_keep_ckpts``
  a resume deleted the checkpoints the run kept; but not what a run lets pass (:data:`CHECKS`, said as
  :data:`SAFETY` is) nor the watchdog's time (:data:`HOOKS_HERE`).

A config whose optimizer or training loop is of another class than the run's is refused: the saved state would
not load (AdamW's into SGD: a KeyError traceback), or a loop of epochs over a run of iterations trained past its end
and saved nothing. A setting the component this run builds does not take (a setting an older version had) is
not taken. What was taken and what was not are said once the run's log is open (:func:`say_taken`); a setting the
run had from its config file, which says otherwise now (edited since: ``engine/named.py``), in a warning. A setting
named on the command line is this run's, even at the config file's own value: it stays, and the resume's checks
refuse it where it differs from the checkpoint's. A ``load_from`` without ``--resume`` starts a new run from the
weights: its settings are its own.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, List, Mapping, Tuple

from xtuner_plugins.engine.length import _LOOP   # the loop's two lengths, as the length module reads them
from xtuner_plugins.engine.settings_taker import (CHECKS, SAFETY, Taker, differs, kind_of, named_by, take_sources,
                                                  takeable, takes)
from xtuner_plugins.models.runconfig import inner_dataset

#: the model's settings of how this run computes, not what: a resume may change them (another machine, memory)
HOW_IT_RUNS = ('vision_grad_ckpt', 'llm_grad_ckpt', 'llm_grad_ckpt_layers', 'attn_implementation',
               'cudnn_attention', 'zero3_init', 'loss_chunk', 'compile_blocks', 'liger_kernel', 'cpu_attention')
#: the data set's settings that stay this run's: its cache, and what input it accepts (SAFETY: said where they differ)
THIS_RUNS = ('cache_dir',) + SAFETY
#: the hooks' settings of this machine (the stall watchdog's time, another machine's)
HOOKS_HERE = ('default_hooks.stall_watchdog.timeout',)
#: the run's shape in DeepSpeed's words (``strategy``) and the command-line keys that set each
_STRATEGY = {'gradient_accumulation_steps': 'optim_wrapper.accumulative_counts',
             'train_micro_batch_size_per_gpu': 'train_dataloader.batch_size',
             'gradient_clipping': 'optim_wrapper.clip_grad'}

#: what :func:`said_taken` took (its keys, for :func:`carry_taken`) and its log lines, said by :func:`say_taken`
_TAKEN: List[str] = []
_NOTES: List[Tuple[int, str]] = []


def _refuse_another(what: str, then: Mapping, now: Mapping, said: str) -> None:
    """Refuse a resume whose config builds another ``what`` than the run saved (its state would not load: an
    AdamW's state into SGD failed in a KeyError traceback; a loop of epochs over one of iterations trained past
    its end and saved nothing)."""
    if isinstance(then, Mapping) and isinstance(now, Mapping) and 'type' in then and 'type' in now \
            and kind_of(then) != kind_of(now):
        from xtuner_plugins.errors import Refused
        raise Refused(f'{said}: it was trained with the {what} {kind_of(then)}, and this config gives '
                      f'{kind_of(now)}: the saved state is the other\'s. Resume with the config it was trained with, '
                      'or start a new run from its weights (model.pretrained_pth=PATH, another --work-dir)')


def _streams(dataset) -> bool:
    """Whether ``dataset`` (a config) is a stream (online packing, a shard set), whose saved position is its DataLoader
    workers' (``engine/streamstate.py`` refuses another number of them): its workers are the run's, then."""
    from xtuner_plugins.data.streaming import StreamingDataset
    kind = dataset.get('type') if isinstance(dataset, Mapping) else None
    if isinstance(kind, type):
        return issubclass(kind, StreamingDataset)
    return isinstance(kind, str) and kind.rsplit('.', 1)[-1] in ('OnlinePackedDataset', 'ShardDataset')


def _shape(taker: Taker, recorded: Mapping, cfg: Mapping) -> None:
    """The batch size, accumulation and clipping, from the optimizer wrapper's or DeepSpeed's words into this
    run's."""
    def read(c) -> dict:
        strategy, optim = c.get('strategy'), c.get('optim_wrapper') or {}
        if isinstance(strategy, Mapping) and 'gradient_accumulation_steps' in strategy:
            return {k: strategy.get(k) for k in _STRATEGY}
        clip = optim.get('clip_grad')
        return {'gradient_accumulation_steps': optim.get('accumulative_counts', 1),
                'gradient_clipping': clip.get('max_norm') if isinstance(clip, Mapping) else None}
    then, now = read(recorded), read(cfg)
    strategy, optim = cfg.get('strategy'), cfg.get('optim_wrapper')
    for key, value in then.items():
        if value is None or not differs(value, now.get(key)) or key == 'train_micro_batch_size_per_gpu':
            continue   # (the batch size: the loader's, below; XTuner's strategy copies it)
        if key == 'gradient_accumulation_steps' and any(named_by(k, taker.given) for k in (
                _STRATEGY[key], f'strategy.{key}')):   # named otherwise: the optimizer's steps change from here
            taker.left.append(f'{_STRATEGY[key]}={value!r} (named {now.get(key)!r}: each optimizer step from here '
                              f'takes {now.get(key)!r} iterations\' gradients where the run\'s took {value!r}; the '
                              'resume is not exact)')
        if isinstance(strategy, dict) and 'gradient_accumulation_steps' in strategy:
            taker.take(strategy, key, value, f'strategy.{key}', given_as=_STRATEGY[key])
        elif isinstance(optim, dict) and key == 'gradient_accumulation_steps':
            taker.take(optim, 'accumulative_counts', value, 'optim_wrapper.accumulative_counts')
        elif isinstance(optim, dict) and isinstance(optim.get('clip_grad'), dict):
            taker.take(optim['clip_grad'], 'max_norm', value, 'optim_wrapper.clip_grad.max_norm')
    batch = (recorded.get('train_dataloader') or {}).get('batch_size')
    if isinstance(strategy, dict) and isinstance(batch, int) and strategy.get('train_micro_batch_size_per_gpu') \
            not in (batch, None):
        taker.take(strategy, 'train_micro_batch_size_per_gpu', batch, 'strategy.train_micro_batch_size_per_gpu',
                   given_as='train_dataloader.batch_size')


def _length(taker: Taker, recorded: Mapping, cfg: dict) -> None:
    """The loop's length the run was started for, into this run's loop (``length.resolve_training_length``
    takes a length in the loop over the config's top-level one)."""
    then, loop = recorded.get('train_cfg'), cfg.get('train_cfg')
    if not isinstance(then, Mapping) or not isinstance(loop, dict):
        return
    names = _LOOP + tuple(f'train_cfg.{k}' for k in _LOOP)   # the length's keys, at the top level and the loop's
    if any(named_by(k, taker.given) for k in names):
        return
    key = next((k for k in _LOOP if then.get(k) is not None), None)
    now = next(((k, loop[k]) for k in _LOOP if loop.get(k) is not None), None) or next(
        ((k, cfg[k]) for k in ('max_iters', 'max_epochs') if cfg.get(k) is not None), None)   # (max_iters wins)
    if key is None or now == (key, then[key]) or not takes(loop, key):
        return
    taker.note(f'train_cfg.{key}={then[key]!r} (the config: {"=".join(map(str, now)) if now else None})', names)
    loop.pop(_LOOP[1 - _LOOP.index(key)], None)
    loop[key] = then[key]


def _keeps(value) -> float:
    """How many checkpoints ``max_keep_ckpts`` keeps (-1, 0, None: all)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else float('inf')


def _runtime(taker: Taker, recorded: Mapping, cfg: dict) -> None:
    """The hooks' settings (when the run saves, how many checkpoints it keeps: a resume under the config's
    ``max_keep_ckpts=2`` deleted the checkpoints a run kept 5 of; what it logs), the log's window and the seed; not
    :data:`CHECKS` nor :data:`HOOKS_HERE`, nor a ``max_keep_ckpts`` that would keep fewer than the config's (a
    resume deletes no more than either asked). Custom hooks are matched by class, in order, where the run and the
    config have as many of a class; a class the run had that this config has not is said, not added."""
    def kept(c: Mapping):
        hook = (c.get('default_hooks') or {}).get('checkpoint') if isinstance(c.get('default_hooks'), Mapping) else None
        return hook.get('max_keep_ckpts') if isinstance(hook, Mapping) else None

    fewer = ('default_hooks.checkpoint.max_keep_ckpts',) if _keeps(kept(recorded)) < _keeps(kept(cfg)) else ()
    for key in ('save_every', 'log_processor', 'randomness', 'default_hooks'):
        then, now = recorded.get(key), cfg.get(key)
        if isinstance(then, dict) and isinstance(now, dict):
            hooks = key == 'default_hooks'   # (a hook this config lacks is not added)
            taker.walk({k: v for k, v in then.items() if k in now or not hooks}, now, key,
                       CHECKS + HOOKS_HERE + fewer)
        elif key in recorded and key in cfg and not isinstance(now, dict) and differs(then, now) \
                and takeable(then, now):
            taker.take(cfg, key, then, key)
    then, now = recorded.get('custom_hooks'), cfg.get('custom_hooks')
    if not isinstance(then, list) or not isinstance(now, list):
        return

    def by_class(hooks) -> dict:
        found: dict = {}
        for i, hook in enumerate(hooks):
            if isinstance(hook, dict) and 'type' in hook:
                found.setdefault(kind_of(hook), []).append(i)
        return found
    theirs, mine = by_class(then), by_class(now)
    for kind, places in theirs.items():
        if len(places) != len(mine.get(kind, ())):
            taker.left.append(f'custom_hooks: {len(places)} {kind} then, {len(mine.get(kind, ()))} in this config '
                              f'({"not added" if kind not in mine else "their settings are not taken"})')
            continue
        for a, b in zip(places, mine[kind]):
            taker.walk(then[a], now[b], f'custom_hooks.{b}', CHECKS)


def take_resumed_settings(cfg: dict, given: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Take the resumed checkpoint's settings into ``cfg`` (in place) where the command line (``given``: the keys
    it named) names none of them (module docstring); returns what was taken, each ``'key=value (the config:
    value)'``, and what was not, each with why."""
    taker = _take(cfg, given)
    return taker.taken, taker.left


def _take(cfg: dict, given: Iterable[str]) -> Taker:
    """:func:`take_resumed_settings`, its taker returned (what the run's config file gave otherwise, too)."""
    from xtuner_plugins.engine.loaded_lineage import loaded_checkpoint
    model = cfg.get('model')
    path = loaded_checkpoint(cfg) if cfg.get('resume') is True and isinstance(model, dict) else None
    if path is None:
        return Taker(given)
    from xtuner_plugins.engine import named
    from xtuner_plugins.models.checkpoint import config_settings, read_meta
    from xtuner_plugins.models.lineage import read_lineage
    taker = Taker(given)
    try:
        meta = read_meta(path)
        if not meta.get('cfg'):
            taker.left.append(f'it records no training config: the settings are this config\'s '
                              f'({cfg.get("filename", "")})')
            return taker
        recorded = config_settings(meta['cfg'], f"{path}: meta['cfg'] (the training config)")
        record = (read_lineage(path) or {}).get('sources') or {}
    except (OSError, ValueError) as exc:   # a checkpoint that does not read: its load says what is wrong with it
        taker.left.append(f'its training config is not read ({exc}): the settings are this config\'s')
        return taker
    taker.named_then, taker.resumed = named.recorded(meta), True
    if not isinstance(recorded.get('model'), dict):
        return taker
    take_sources(taker, model, recorded['model'], record)
    from xtuner_plugins.models.lineage import SOURCE_KEYS
    sources = tuple(f'model.{key}{end}' for key in SOURCE_KEYS for end in ('', '.path'))   # (take_sources')
    taker.walk(recorded['model'], model, 'model', ('pretrained_pth',) + HOW_IT_RUNS + sources)  # (loaded_lineage's)
    loaded, loader = recorded.get('train_dataloader'), cfg.get('train_dataloader')
    if isinstance(loaded, dict) and isinstance(loader, dict):
        if inner_dataset(loaded.get('dataset'))[1] == inner_dataset(loader.get('dataset'))[1] \
                and isinstance(loader.get('dataset'), dict):   # wrapped alike: each level, packing's budgets too
            taker.walk(loaded.get('dataset') or {}, loader['dataset'], 'train_dataloader.dataset', THIS_RUNS)
        kept = ('batch_size', 'sampler') + (('num_workers',) if _streams(loader.get('dataset')) else ())
        taker.walk({k: loaded[k] for k in kept if k in loaded}, loader, 'train_dataloader')
    optim, now_optim = recorded.get('optim_wrapper'), cfg.get('optim_wrapper')
    from xtuner_plugins.engine.resume import resume_words
    said = resume_words(cfg.get('load_from'), path)
    _refuse_another('optimizer', (optim or {}).get('optimizer'), (now_optim or {}).get('optimizer'), said)
    _refuse_another('training loop', recorded.get('train_cfg'), cfg.get('train_cfg'), said)
    if isinstance(optim, dict) and isinstance(now_optim, dict) and isinstance(optim.get('optimizer'), dict) \
            and isinstance(now_optim.get('optimizer'), dict):   # (restored by its saved state anyway)
        taker.walk(optim['optimizer'], now_optim['optimizer'], 'optim_wrapper.optimizer')
    _shape(taker, recorded, cfg)
    _length(taker, recorded, cfg)
    _runtime(taker, recorded, cfg)
    return taker


def said_taken(cfg: dict, given: Iterable[str]) -> None:
    """:func:`take_resumed_settings`, or a new run's ``previous_settings.take_previous_settings``, their lines kept for
    :func:`say_taken`; the keys the run's command line named remembered for its checkpoints (``engine/named.py``)."""
    from xtuner_plugins.engine import named
    from xtuner_plugins.engine.previous_settings import take_previous_settings
    given = list(given)
    taker = _take(cfg, given)
    previous = Taker(given) if taker.resumed else take_previous_settings(cfg, given)
    parts = [entry.partition('=')[0] for entry in previous.taken]
    _TAKEN[:] = [entry.partition('=')[0] for entry in taker.taken] + parts
    if taker.resumed and taker.named_then is None:   # (a checkpoint without the record: its command line unknown)
        named.forget()
    else:   # (a part taken from the previous stage is not the config file's: its resume takes it as given)
        named.remember(given + parts, taker.named_then)
    _NOTES.clear()
    if previous.taken or previous.left:
        what = f'model.pretrained_pth={cfg["model"]["pretrained_pth"]}'
        if previous.taken:
            _NOTES.append((logging.INFO, f'{what}: builds the model that stage trained (recorded in it; the command '
                                         f'line names none of these): {"; ".join(previous.taken)}'))
        if previous.left:
            _NOTES.append((logging.WARNING, f'{what}: not taken from it: {"; ".join(previous.left)}'))
    taken, left, edited = taker.taken, taker.left, taker.edited
    if taken or left:
        from xtuner_plugins.engine.loaded_lineage import loaded_checkpoint
        from xtuner_plugins.engine.resume import resume_words
        what = resume_words(cfg.get('load_from'), loaded_checkpoint(cfg))
        not_edited = [entry for entry in taken if entry not in edited]
        if not_edited:
            _NOTES.append((logging.INFO, f'{what}: goes on with the settings it was trained with (recorded in it; '
                                         f'the command line names none of them): {"; ".join(not_edited)}'))
        if edited:
            _NOTES.append((logging.WARNING, f'{what}: the config file gives otherwise than when the run began '
                                            '(edited since, or another file): the run goes on with what it was '
                                            f'trained with; name a setting on the command line to change it: '
                                            f'{"; ".join(edited)}'))
        if left:
            _NOTES.append((logging.WARNING, f'{what}: not taken from it: {"; ".join(left)}'))


def say_taken() -> None:
    """Log the lines of :func:`said_taken`, once, in the run's log (its logger is open: rank 0 says them)."""
    from mmengine.logging import print_log
    for level, line in _NOTES:
        print_log(line, logger='current', level=level)
    _NOTES.clear()


def took(prefix: str) -> bool:
    """Whether :func:`said_taken` took a setting under ``prefix`` (a top-level key)."""
    return any(key == prefix or key.startswith(prefix + '.') for key in _TAKEN)


def carry_taken(cfg: Mapping, runner, model) -> None:
    """Copy the settings :func:`said_taken` took into ``cfg`` over the runner's own copies of the model's, the data
    loader's and the optimizer's settings (``model``; the runner's ``_train_dataloader``, ``optim_wrapper`` and
    ``_train_loop``, dicts not built yet), for plain ``xtuner train``, whose runner copied them before this package
    saw its config."""
    cfg = getattr(cfg, '_cfg_dict', cfg)   # (an MMEngine Config is no Mapping: its ConfigDict is)
    own = {'model': model, 'train_dataloader': getattr(runner, '_train_dataloader', None),
           'optim_wrapper': getattr(runner, 'optim_wrapper', None), 'train_cfg': getattr(runner, '_train_loop', None)}
    for key in _TAKEN:
        parts = key.split('.')
        value = cfg
        for part in parts:
            value = value.get(part) if isinstance(value, Mapping) else value[int(part)] \
                if isinstance(value, list) and part.isdigit() and int(part) < len(value) else None
        if parts[0] == 'log_processor' and hasattr(getattr(runner, 'log_processor', None), parts[-1]):
            setattr(runner.log_processor, parts[-1], copy.deepcopy(value))   # (built already; the hooks: runstart)
        node = own.get(parts[0])
        for part in parts[1:-1]:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, dict):
            node[parts[-1]] = copy.deepcopy(value)
            if parts[0] == 'train_cfg':   # the length: the other one goes
                node.pop(_LOOP[1 - _LOOP.index(parts[-1])], None)
