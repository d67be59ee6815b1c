"""A resume goes on with the settings its checkpoint was trained with, read from it, not typed again.

MMEngine stores the run's whole config, its ``--cfg-options`` applied, in every checkpoint (``meta['cfg']``). A
resume builds the run from the config file given, though, so a run started with
``--cfg-options model.llm=/models/Qwen2.5-7B train_dataloader.dataset.data_files=[mine.jsonl]`` and resumed with
``--resume iter_500.pth`` alone built the config file's own models and data: it stopped on a folder of the config's
example paths (``vision encoder folder not found: models/InternViT-300M-448px-V2_5``), or was refused on each
setting that shapes the model (``resume.setting_conflicts``), to be given again one by one.

:func:`take_resumed_settings`, before anything is built, takes from the resumed checkpoint's recorded config
what makes the run the one it resumes, where the command line gives none of it:

* the source folders (``model.vision_encoder``, ``llm``, ``tokenizer``, ``official_checkpoint``), where the
  recorded one is still there (its absolute path first; otherwise the config's stays, and the resume's
  fingerprint check says whether it is the same model);
* the model's other settings (the projector, the template, what is frozen, the LoRA settings, the dtype,
  ``from_scratch``, ...), but those of how this run computes (:data:`HOW_IT_RUNS`: checkpointing, attention
  kernels, compilation), which a resume may change;
* the data set's settings (its files, tiling, lengths, template; not its ``cache_dir``), the batch size and the
  sampler's settings (a resume with other batches is refused by ``engine/dataagree.py``);
* the optimizer's settings: the gradient accumulation and clipping (a resume went on accumulating the config's 16
  batches a step where the run had taken 1), and the learning rate and the rest, which the optimizer's saved
  state restores anyway (MMEngine's resume loads them over the config's).

Each is said in one log line, with the config's value it replaced. A setting given on the command line is this
run's: it stays, and the resume's checks refuse it where it differs from the checkpoint's (as before). A
``load_from`` without ``--resume`` starts a new run from the weights: its settings are its own.
"""

from __future__ import annotations

import copy
import os
from typing import Iterable, List, Mapping

from xtuner_plugins.models.runconfig import inner_dataset

#: the model's settings of how this run computes, not what: a resume may change them (another machine, memory)
HOW_IT_RUNS = ('vision_grad_ckpt', 'llm_grad_ckpt', 'llm_grad_ckpt_layers', 'attn_implementation',
               'cudnn_attention', 'zero3_init', 'loss_chunk', 'compile_blocks', 'liger_kernel', 'cpu_attention')


def _given(key: str, changed: Iterable[str]) -> bool:
    """Whether the command line set ``key``, a part of it, or a setting that holds it."""
    return any(k == key or k.startswith(key + '.') or key.startswith(k + '.') for k in changed)


def _differs(a, b) -> bool:
    from xtuner_plugins.models.provenance import comparable
    return comparable(a) != comparable(b)


def _takeable(recorded, now) -> bool:
    """Whether a recorded value (read as data) can stand where ``now`` is: the same kind (a number for a number, a
    list for a tuple), or None on either side; a class or a dtype the config names is read as its text."""
    if recorded is None or now is None or isinstance(recorded, type(now)):
        return True
    kinds = ((int, float), (list, tuple))
    return any(isinstance(recorded, k) and isinstance(now, k) and not isinstance(now, bool) for k in kinds)


def _walk(then: dict, now: dict, prefix: str, take, skip) -> None:
    """``take`` each setting of ``then`` (the recorded) that ``now`` (this run's) holds otherwise, setting by
    setting into nested ones; a class (``type``), a setting in ``skip`` and one of another shape are left as
    they are (the resume's checks compare them)."""
    for key, value in then.items():
        name, mine = f'{prefix}.{key}', now.get(key)
        if key == 'type':
            continue
        if isinstance(value, dict) and isinstance(mine, dict):
            _walk(value, mine, name, take, skip)
        elif not isinstance(value, dict) and not isinstance(mine, dict) and name not in skip \
                and _differs(value, mine) and _takeable(value, mine):
            take(now, key, value, name)


def take_resumed_settings(cfg: Mapping, changed: Iterable[str]) -> List[str]:
    """Take the resumed checkpoint's settings into ``cfg`` (in place) where the command line (``changed``, the keys
    it set: ``checks.check_run_options``) gives none of them (module docstring); returns what was taken, each
    ``'key=value (the config: value)'``, said in the log."""
    from xtuner_plugins.engine.loaded_lineage import loaded_checkpoint
    model = cfg.get('model')
    path = loaded_checkpoint(cfg) if cfg.get('resume') is True and isinstance(model, dict) else None
    if path is None:
        return []
    from xtuner_plugins.models.checkpoint import config_settings, read_meta
    from xtuner_plugins.models.lineage import SOURCE_KEYS, read_lineage
    try:
        text = read_meta(path).get('cfg')
        recorded = config_settings(text, f"{path}: meta['cfg'] (the training config)") if text else None
        sources = ((read_lineage(path) or {}).get('sources') or {}) if recorded else {}
    except (OSError, ValueError):   # a checkpoint that does not read: its load says what is wrong with it
        return []
    if not isinstance(recorded, dict) or not isinstance(recorded.get('model'), dict):
        return []
    changed, then, taken = list(changed), recorded['model'], []

    def take(node: dict, key: str, value, name: str) -> None:
        if not _given(name, changed):
            taken.append(f'{name}={value!r} (the config: {node.get(key)!r})')
            node[key] = copy.deepcopy(value)

    skip = {'model.pretrained_pth'}   # loaded_lineage's (found by its content, beside the checkpoint too)
    for key in SOURCE_KEYS:
        skip |= {f'model.{key}', f'model.{key}.path'}
        mine, theirs = model.get(key), then.get(key)
        node, name = (mine, 'path') if isinstance(mine, dict) else (model, key)
        recorded_path = theirs.get('path') if isinstance(theirs, dict) else theirs
        if not isinstance(recorded_path, str) or recorded_path == node.get(name):
            continue
        found = next((p for p in ((sources.get(key) or {}).get('abspath'), recorded_path)
                      if isinstance(p, str) and os.path.exists(p)), None)
        if found is not None and found != node.get(name):
            take(node, name, found, f'model.{key}.path' if node is mine else f'model.{key}')
    _walk(then, model, 'model', take, skip | {f'model.{key}' for key in HOW_IT_RUNS})
    optim, now_optim = recorded.get('optim_wrapper'), cfg.get('optim_wrapper')
    if isinstance(optim, dict) and isinstance(now_optim, dict):   # its accumulation and clipping, its optimizer's
        _walk(optim, now_optim, 'optim_wrapper', take, set())      # (which the saved state restores anyway)
    loaded, loader = recorded.get('train_dataloader'), cfg.get('train_dataloader')
    if not isinstance(loaded, dict) or not isinstance(loader, dict):
        return taken
    trained, where = inner_dataset(loaded.get('dataset'))
    now, here = inner_dataset(loader.get('dataset'))
    if trained and now and where == here:   # the same data set, wrapped alike
        _walk(trained, now, here, take, {f'{here}.cache_dir'})
    _walk({key: loaded[key] for key in ('batch_size', 'sampler') if key in loaded}, loader, 'train_dataloader',
          take, set())
    return taken


#: the settings :func:`said_taken` took in this process, by their keys (``model.llm``), for :func:`carry_taken`
_TAKEN: List[str] = []


def said_taken(cfg: Mapping, changed: Iterable[str]) -> None:
    """:func:`take_resumed_settings`, each setting taken said in the log (one line)."""
    taken = take_resumed_settings(cfg, changed)
    _TAKEN[:] = [entry.partition('=')[0] for entry in taken]
    if taken:
        from mmengine.logging import print_log

        from xtuner_plugins.engine.loaded_lineage import loaded_checkpoint
        print_log(f'--resume {loaded_checkpoint(cfg)}: goes on with the settings it was trained with (recorded in '
                  f'it; the command line gives none of them): {"; ".join(taken)}', logger='current')


def carry_taken(cfg: Mapping, runner, model) -> None:
    """Copy the settings :func:`said_taken` took into ``cfg`` over the runner's own copies of the model's, the data
    loader's and the optimizer's settings (``model``; the runner's ``_train_dataloader`` and ``optim_wrapper``,
    dicts not built yet), for plain ``xtuner train``, whose runner copied them before this package saw its config."""
    own = {'model': model, 'train_dataloader': getattr(runner, '_train_dataloader', None),
           'optim_wrapper': getattr(runner, 'optim_wrapper', None)}
    for key in _TAKEN:
        parts = key.split('.')
        value = cfg
        for part in parts:
            value = value.get(part) if isinstance(value, Mapping) else None
        node = own.get(parts[0])
        for part in parts[1:-1]:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, dict):
            node[parts[-1]] = copy.deepcopy(value)
