"""A checkpoint's own training config: the tools use a checkpoint by its path alone.

MMEngine stores the run's whole config, the ``--cfg-options`` applied, in every checkpoint (``meta['cfg']``), and
``LineageHook`` stores where its sources and previous stage were (``meta['lineage']``, ``models/lineage.py``). So
the converter, chat, eval, the web demo and serving need nothing but the checkpoint::

    cfg = run_config('work_dirs/finetune_lora/iter_1000.pth')                     # what training used
    cfg = run_config(ckpt, remap=parse_remap(['/old/models=/new/models']))       # folders moved since

:func:`run_config` reads that config as data (``checkpoint.config_settings``: nothing of it runs) and finds each
source folder where it is now: a path the user gives on top (a config, or ``model.llm=DIR``), the recorded path
moved by ``--remap OLD=NEW``, the recorded absolute path, then the recorded path as written; the fingerprints
recorded in the lineage are checked later, where the model is built (``lineage.check_sources``).

A config or options given on top are checked, not trusted: every setting that shapes the model or its inputs
(:data:`provenance.RESULT_SETTINGS` of the model; :data:`DATA_SETTINGS` of the data set: tiling, tile size,
template, system message, image mode, video frame prefix and frame range) that differs from the recorded one is
refused, naming both values. A checkpoint that records no config (written before MMEngine stored it) takes the
given config, with a note; without one it is refused in one line.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, List, Optional, Sequence, Tuple

from xtuner_plugins.cfg_words import option_into_unset

from . import lineage
from .checkpoint import config_settings, read_meta

#: data set settings that shape what the model sees (``train_dataloader.dataset``, the packed wrapper's inner one)
DATA_SETTINGS = ('min_dynamic_patch', 'max_dynamic_patch', 'use_thumbnail', 'image_size', 'template', 'system',
                 'image_mode', 'frame_prefix', 'min_num_frame', 'max_num_frame')
#: what a tiling setting the data set leaves unset means (``InternVLDataset``'s defaults, which the converted folder
#: records too); the other data settings left unset mean "the model's" (tile size, template) or the template's
DEFAULT_TILING = dict(min_dynamic_patch=1, max_dynamic_patch=12, use_thumbnail=True)
#: the range a video sample's frame count is drawn from when the data set leaves it unset (``InternVLDataset``'s,
#: InternVL's 8 and 32), recorded in the converted folder as the tiling is
DEFAULT_FRAMES = dict(min_num_frame=8, max_num_frame=32)


def parse_remap(pairs: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """``['OLD=NEW', ...]`` (``--remap``) as path-prefix pairs; one-line ValueError for a malformed one."""
    out = []
    for pair in pairs or ():
        old, sep, new = pair.partition('=')
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f'--remap {pair!r}: give OLD=NEW, the folder as training saw it and where it is now')
        out.append((old.rstrip(os.sep) or os.sep, new.rstrip(os.sep) or os.sep))
    return out


def inner_dataset(dataset, key: str = 'train_dataloader.dataset') -> Tuple[dict, str]:
    """The data set config that takes the samples' settings, under every wrapper (online packing around a shard
    set around its samples: ``OnlinePackedDataset`` > ``ShardDataset`` > ``ShardSamples``), and its key
    (``key`` with a ``.dataset`` per wrapper); ``({}, key)`` for none."""
    while isinstance(dataset, dict) and isinstance(dataset.get('dataset'), dict):
        dataset, key = dataset['dataset'], key + '.dataset'
    return (dataset if isinstance(dataset, dict) else {}), key


def training_dataset(cfg) -> dict:
    """A config's data set settings (:func:`inner_dataset`); {} when it has none."""
    return _training_dataset(cfg)[0]


def _training_dataset(cfg) -> Tuple[dict, str]:
    loader = cfg.get('train_dataloader') if hasattr(cfg, 'get') else None
    return inner_dataset(loader.get('dataset') if isinstance(loader, dict) else None)


def data_value(dataset: dict, key: str):
    """A data set setting as training takes it: a tiling or frame-range setting left unset is its default
    (:data:`DEFAULT_TILING`, :data:`DEFAULT_FRAMES`)."""
    value = dataset.get(key)
    return {**DEFAULT_TILING, **DEFAULT_FRAMES}.get(key) if value is None else value


def setting_conflicts(recorded: dict, given) -> List[str]:
    """``'key: trained A, given B'`` for every model or data setting of ``given`` that differs from ``recorded``."""
    from .provenance import setting_differences
    out = setting_differences(recorded.get('model') or {}, given.get('model') or {})
    trained, (now, where) = training_dataset(recorded), _training_dataset(given)
    for key in DATA_SETTINGS:
        a, b = data_value(trained, key), data_value(now, key)
        if key == 'template' and (a is None or b is None):   # None: the model's (template_conflicts)
            continue
        if a != b:
            out.append(f'{where}.{key}: trained {a!r}, given {b!r}')
    return out


def template_conflicts(checkpoint: str, recorded: dict, given) -> List[str]:
    """A template given on top (``model.template``, the data set's) other than the one ``checkpoint`` trained in,
    where its config left it to the stages before it (None): :func:`setting_conflicts` cannot tell (a typed
    ``internvl2_5`` for a ``llama3`` chain was dropped without a word, and the data set's was refused as 'trained
    None')."""
    model, (data, where) = recorded.get('model') or {}, _training_dataset(given)
    typed = [('model.template', (given.get('model') or {}).get('template'), model.get('template')),
             (f'{where}.template', data.get('template'), training_dataset(recorded).get('template'))]
    typed = [(key, value) for key, value, then in typed if value is not None and then is None]
    if not typed:
        return []
    from .stages import inherited_template
    try:
        trained = model.get('template') or inherited_template(checkpoint)
    except (OSError, ValueError):   # its earlier stages not found: said where the model is built
        return []
    how = 'the model\'s' if model.get('template') else 'the stages before it'
    return [f'{key}: trained {trained!r} ({how}), given {value!r}' for key, value in typed if value != trained]


def _source(model: dict, key: str) -> Optional[str]:
    value = model.get(key)
    return value.get('path') if isinstance(value, dict) else value


def _set_source(model: dict, key: str, path: str) -> None:
    if isinstance(model.get(key), dict):
        model[key]['path'] = path
    else:
        model[key] = path


def _find_sources(model: dict, given_model: dict, record: Optional[dict], checkpoint: str,
                  log: Callable[[str], None]) -> None:
    """Point each source of ``model`` (the recorded settings) at where the folder is now (module docstring)."""
    recorded_sources = (record or {}).get('sources') or {}
    for key in lineage.SOURCE_KEYS:
        path = _source(model, key)
        if not isinstance(path, str):
            continue
        mine = _source(given_model, key)
        then = recorded_sources.get(key) or {}
        if (isinstance(mine, str) and mine != path and not os.path.exists(mine)
                and (os.path.isabs(mine) or os.path.isdir(os.path.dirname(mine) or '.'))):   # (not a hub id)
            from xtuner_plugins.errors import NotFound   # (it was passed over for the recorded one, without a word)
            raise NotFound(f'model.{key}={mine} (given) is not found; {checkpoint} was trained with {path} (at '
                           f'{then.get("abspath") or path}): give where that folder is now, or leave model.{key} out')
        candidates = [mine] if isinstance(mine, str) and mine != path else []
        for p in (then.get('abspath'), path):
            if isinstance(p, str):
                candidates += lineage.moved(p) + [p]
        found = next((p for p in candidates if os.path.exists(p)), None)
        if found is None:
            if not then.get('abspath') and not os.path.isabs(path):
                continue  # a hub id, or a relative path of an old record: the builder says what is missing
            raise FileNotFoundError(
                f'model.{key}: {path!r}, which {checkpoint} was trained with (at {then.get("abspath") or path}), is '
                f'not found; give --remap OLD=NEW for a moved folder (or model.{key}=DIR)')
        if found != path:
            log(f'model.{key}: {found} (trained with {path})')
        _set_source(model, key, found)


def run_config(checkpoint: str, config: Optional[str] = None, cfg_options: Optional[dict] = None,
               remap: Sequence[Tuple[str, str]] = (), log: Callable[[str], None] = print):
    """The MMEngine ``Config`` ``checkpoint`` was trained with, its source folders found (module docstring).

    Raises:
        ValueError: a given config or option that disagrees with the recorded settings (each named with both
            values); a checkpoint that records no config when none is given.
        FileNotFoundError: the checkpoint, the config, or a recorded source folder, not found.
    """
    from mmengine.config import Config

    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    lineage.set_remap(remap)
    meta = read_meta(checkpoint)
    if config:  # the engine's load_config (chat and eval given a checkpoint alone import no engine: its CPU patches)
        from xtuner_plugins.engine.options import load_config
    given = load_config(config, cfg_options) if config else None
    if not meta.get('cfg'):
        if given is None:
            raise ValueError(f'{checkpoint} records no training config (it was not written by training\'s '
                             'CheckpointHook); give the training config and its --cfg-options with it')
        log(f'{checkpoint}: no training config recorded in it; the settings are taken from {config}')
        return given
    recorded = config_settings(meta['cfg'], f"{checkpoint}: meta['cfg'] (the training config)")
    record = lineage.read_lineage(checkpoint)   # refused first where it and the config disagree
    if given is None:
        given = Config(copy.deepcopy(recorded))
        if cfg_options:
            problem = option_into_unset(given, cfg_options)
            if problem:
                raise ValueError(f'--cfg-options: {problem}')
            given.merge_from_dict(cfg_options)
    conflicts = setting_conflicts(recorded, given) + template_conflicts(checkpoint, recorded, given)
    if conflicts:
        what = f'{config} and --cfg-options' if config and cfg_options else config or '--cfg-options'
        raise ValueError(f'{checkpoint} was trained with other settings than {what} give (leave them out: '
                         f'the checkpoint records its own): ' + '; '.join(conflicts))
    cfg = Config(copy.deepcopy(recorded))
    given_model = dict(given.get('model') or {}) if (config or cfg_options) else {}
    kind, named = given_model.get('type'), cfg.model.get('type')
    if isinstance(kind, type) and isinstance(named, str) and named.rsplit('.', 1)[-1] == kind.__name__:
        cfg.model['type'] = kind   # the class the given config imports (a model class of the user's own)
    _find_sources(cfg.model, given_model, record, checkpoint, log)
    # the previous stage: the one the lineage records (found and checked by lineage.previous_stage_for), unless
    # the user points at it on top
    mine = given_model.get('pretrained_pth')
    cfg.model['pretrained_pth'] = mine if mine != recorded.get('model', {}).get('pretrained_pth') else None
    return cfg

