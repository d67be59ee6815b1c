"""The training data set's tile size, tokens per tile, image mode, padding colour, template and tokenizer come
from the model, unless the config or ``--cfg-options`` set them.

The model fixes all of them: its vision encoder the tile size and mean colour, encoder and projector the
``<IMG_CONTEXT>`` tokens per tile, its ``image_mode`` and ``template`` settings their own, its LLM folder (or
official checkpoint) the tokenizer. A stage config names them once, in ``model``; the data set's settings are
None in ``configs/_base_/datasets``, and :func:`fill_dataset` sets each one left None from the model's config
before the data set is built, reading the encoder's ``config.json`` (and ``preprocessor_config.json``) and the
projector settings, never a weight. It logs once what it set::

    data set: image_size 56, num_image_token 4, image_mode tile, template internvl2_5, tokenizer tiny/llm
    (from model.vision_encoder=tiny/internvit, model.projector=pixel_shuffle_mlp, model.llm=tiny/llm)

A value set explicitly is kept; when it disagrees with the model, ``ModelDataCheckHook`` stops start-up naming
both values. ``num_image_token`` left None counts the tokens of the data set's tiles (the model's tile size, or
the one set explicitly), so a wrong tile size is named with the token count it implies.

Where it runs: both runners build the training data loader inside ``build_train_loop`` (MMEngine's ``Runner``,
and ``FlexibleRunner``, which ``xtuner train --deepspeed`` uses), from the data loader's config and with the
run's config (``runner.cfg``) at hand. :func:`apply_derive_patches` wraps that method of both classes; importing
``runtime`` applies it, which every stage config does before the runner trains (``runtime``'s docstring), under
``xtuner train`` as under ``tools/train.py``. :func:`derive_data_settings` does the same on a whole config.

The same patch wraps that data loader's sampler in :class:`~xtuner_plugins.data.epochs.EpochSampler`
(:func:`wrap_sampler`): each index then carries its epoch to the DataLoader worker that loads it, where the data set
takes it (``set_epoch``: a video's ``'rand'`` frames differ from epoch to epoch, and come back the same on a resume).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

from xtuner_plugins.errors import Refused

__all__ = ['DERIVED_KEYS', 'apply_derive_patches', 'derive_data_settings', 'encoder_conventions', 'fill_dataset',
           'model_data_settings', 'wrap_sampler']

#: the data set's settings the model decides (``InternVLDataset`` arguments)
DERIVED_KEYS = ('image_size', 'num_image_token', 'image_mode', 'image_mean', 'template', 'tokenizer')
_MODEL_ALIASES = ('InternVLModel',)  # the model's old name, which dumped work-dir configs carry
_PATCH_MARK = '_xtuner_plugins_derive_patch'


def _names(base: type) -> set:
    names, todo = set(), [base]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _is(type_, base: type, aliases=()) -> bool:
    """Whether a config's ``type`` (a class or its registered name) is ``base`` or a subclass."""
    if isinstance(type_, type):
        return issubclass(type_, base)
    return isinstance(type_, str) and type_.rsplit('.', 1)[-1] in _names(base) | set(aliases)


def encoder_conventions(spec, select_layer: Optional[int] = None):
    """The :class:`~xtuner_plugins.models.vision.base.VisionEncoder` a tower's folder gives (tile size, patch size,
    mean/std), read from its config files as ``build_vision_encoder`` reads them, without loading the weights.

    ``spec``: the model's ``vision_encoder`` (a folder, or ``dict(type=, path=, select_layer=, mean=, std=)``).
    """
    from xtuner_plugins.models.vision.base import (TransformersVisionEncoder, encoder_type_for_folder,
                                                   preprocessor_mean_std, read_json)
    from xtuner_plugins.models.vision.internvit_layout import official_to_hf_vision_config
    spec = {'path': spec} if isinstance(spec, str) else dict(spec)
    path = spec.get('path')
    if not isinstance(path, str):
        raise Refused(f'model.vision_encoder needs a path (a folder), got {spec!r}')
    cls = encoder_type_for_folder(path, spec.get('type'))
    if issubclass(cls, TransformersVisionEncoder):  # a whole CLIP/SigLIP folder: its vision_config
        config = cls.module_class.config_class.from_pretrained(path)
    else:
        config = official_to_hf_vision_config(read_json(os.path.join(path, 'config.json')))
    mean, std = preprocessor_mean_std(path)
    return cls(SimpleNamespace(config=config), select_layer=spec.get('select_layer', select_layer),
               mean=spec.get('mean', mean), std=spec.get('std', std))


def _tokens_per_tile(projector, grid: int) -> int:
    """``projector.tokens_per_tile(grid)`` of the projector the model builds (built on the meta device: no memory,
    no random numbers drawn)."""
    from xtuner_plugins.models.projector import build_projector
    with torch.device('meta'):
        return int(build_projector(projector, 4, 4).tokens_per_tile(grid))


def model_data_settings(model_cfg, image_size: Optional[int] = None) -> Optional[Dict[str, object]]:
    """What the model of ``model_cfg`` (a ``VisionLanguageModel`` config) implies for its data set: each of
    :data:`DERIVED_KEYS` and ``source`` (the settings read, for messages); ``num_image_token`` for tiles of
    ``image_size`` (default the encoder's). None for a vision tower given as a module (no folder to read)."""
    from xtuner_plugins.models.vision import InternViTEncoder
    from xtuner_plugins.models.vision.base import read_json
    from xtuner_plugins.models.vision.internvit_layout import official_to_hf_vision_config
    model_type = model_cfg.get('type')
    signature = inspect.signature(model_type if isinstance(model_type, type) else _model_class()).parameters

    def get(key):
        value = model_cfg.get(key, None)
        return value if value is not None or key not in signature else signature[key].default

    official = get('official_checkpoint')
    if official:
        raw = read_json(os.path.join(official, 'config.json'))
        encoder = InternViTEncoder(SimpleNamespace(config=official_to_hf_vision_config(raw)))
        projector = dict(type='pixel_shuffle_mlp', downsample_ratio=float(raw.get('downsample_ratio', 0.5)),
                         ps_version=raw.get('ps_version', 'v2'))
        tokenizer = get('tokenizer') or official
        source = [f'model.official_checkpoint={official}']
    else:
        vision = get('vision_encoder')
        if not isinstance(vision, (str, dict)):
            return None
        encoder = encoder_conventions(vision, get('select_layer'))
        projector = get('projector')
        if projector == 'pixel_shuffle_mlp':  # as VisionLanguageModel builds it
            projector = dict(type=projector, downsample_ratio=get('downsample_ratio'), ps_version=get('ps_version'))
        llm = get('llm')
        tokenizer = get('tokenizer') or (llm if isinstance(llm, str) else None)
        path = vision.get('path') if isinstance(vision, dict) else vision
        name = projector.get('type') if isinstance(projector, dict) else projector
        source = [f'model.vision_encoder={path}', f'model.projector={name}', f'model.llm={llm}']
    size = int(image_size or encoder.image_size)
    template = get('template')
    if template is None:   # the previous stage's, as the model takes it (stages.inherited_template)
        from xtuner_plugins.models.stages import inherited_template
        pretrained = get('pretrained_pth')
        template = inherited_template(pretrained if isinstance(pretrained, str) else None, official)
        if pretrained:
            source.append(f'model.pretrained_pth={pretrained}')
    return dict(image_size=encoder.image_size, num_image_token=_tokens_per_tile(projector, size // encoder.patch_size),
                image_mode=get('image_mode'), image_mean=list(encoder.mean), template=template,
                tokenizer=tokenizer, source=source)


def _model_class():
    from xtuner_plugins.models.internvl import VisionLanguageModel
    return VisionLanguageModel


def _inner(dataset):
    """The data set config that takes the geometry (``runconfig.inner_dataset``); ``dataset`` itself when it is
    not a dict."""
    from xtuner_plugins.models.runconfig import inner_dataset
    return inner_dataset(dataset)[0] if isinstance(dataset, dict) else dataset


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(f'{v:.4g}' if isinstance(v, float) else str(v) for v in value) + ']'
    return str(value)


def fill_dataset(dataset_cfg, model_cfg, log: bool = True) -> Dict[str, object]:
    """Set each of :data:`DERIVED_KEYS` that ``dataset_cfg`` (an ``InternVLDataset`` config, or a packing
    wrapper's) leaves None or out from the model of ``model_cfg``; returns what was set. Other data sets and
    models are left alone."""
    dataset = _inner(dataset_cfg)
    if not isinstance(dataset, dict) or not isinstance(model_cfg, dict):
        return {}
    from xtuner_plugins.data.dataset import InternVLDataset
    if not (_is(dataset.get('type'), InternVLDataset) and _is(model_cfg.get('type'), _model_class(), _MODEL_ALIASES)):
        return {}
    unset: List[str] = [key for key in DERIVED_KEYS if dataset.get(key) is None]
    if not unset:
        return {}
    implied = model_data_settings(model_cfg, image_size=dataset.get('image_size'))
    if implied is None:
        return {}
    filled = {key: implied[key] for key in unset if implied[key] is not None}
    dataset.update(filled)
    if log and filled:
        from mmengine.logging import print_log
        shown = ', '.join(f'{key} {_show(value)}' for key, value in filled.items()
                          if key != 'image_mean' or filled.get('image_mode', dataset.get('image_mode')) == 'pad')
        print_log(f'data set: {shown} (from {", ".join(implied["source"])})', logger='current')
    return filled


#: data set settings a next stage is told of when they differ from its previous stage's (the template is inherited)
CARRIED = ('system', 'frame_prefix', 'min_dynamic_patch', 'max_dynamic_patch', 'use_thumbnail')


def previous_stage_note(dataset_cfg, model_cfg) -> Optional[str]:
    """A line naming each of :data:`CARRIED` that this stage's data set gives otherwise than its previous stage
    (``model.pretrained_pth``) was trained with, or None: a DPO stage after an SFT with its own system message and
    tiling trained on the template's message and 12 tiles, where its start-up line said the template was carried
    over, and the final model had seen two system prompts."""
    from xtuner_plugins.models.checkpoint import config_settings, read_meta
    from xtuner_plugins.models.runconfig import data_value, inner_dataset, training_dataset
    pretrained = model_cfg.get('pretrained_pth') if isinstance(model_cfg, dict) else None
    if not isinstance(pretrained, str) or not os.path.exists(pretrained) or not isinstance(dataset_cfg, dict):
        return None
    try:
        text = read_meta(pretrained).get('cfg')
        recorded = config_settings(text, f"{pretrained}: meta['cfg']") if text else None
    except (OSError, ValueError):   # the model's build says what is wrong with it
        return None
    if not recorded:
        return None
    (now, key), trained = inner_dataset(dataset_cfg), training_dataset(recorded)
    differ = [(k, data_value(trained, k), data_value(now, k)) for k in CARRIED
              if data_value(trained, k) != data_value(now, k)]
    if not differ:
        return None
    return (f'{pretrained} (model.pretrained_pth) was trained with {", ".join(f"{k} {a!r}" for k, a, _ in differ)}; '
            f'this stage gives {", ".join(f"{k} {b!r}" for k, _, b in differ)} (None: the template\'s, or the '
            f'data set\'s default): a stage\'s data settings are its own, give {key}.KEY=VALUE to train as before')


def derive_data_settings(cfg, log: bool = True) -> Dict[str, object]:
    """:func:`fill_dataset` on a whole config: ``cfg.train_dataloader.dataset`` from ``cfg.model``."""
    dataloader = cfg.get('train_dataloader') if hasattr(cfg, 'get') else None
    if not isinstance(dataloader, dict):
        return {}
    return fill_dataset(dataloader.get('dataset'), cfg.get('model'), log)


def wrap_sampler(dataloader_cfg) -> bool:
    """Wrap the sampler config of a data loader of an ``InternVLDataset`` (or a packing wrapper's) in
    :class:`~xtuner_plugins.data.epochs.EpochSampler`, once; returns whether it did."""
    if not isinstance(dataloader_cfg, dict) or not isinstance(dataloader_cfg.get('sampler'), dict):
        return False
    from xtuner_plugins.data.dataset import InternVLDataset
    from xtuner_plugins.data.epochs import EpochSampler
    dataset, sampler = _inner(dataloader_cfg.get('dataset')), dataloader_cfg['sampler']
    if not isinstance(dataset, dict) or not _is(dataset.get('type'), InternVLDataset) or _is(sampler.get('type'),
                                                                                              EpochSampler):
        return False
    dataloader_cfg['sampler'] = dict(type=EpochSampler, sampler=sampler)
    return True


def _patch_build_train_loop(runner_cls) -> bool:
    original = runner_cls.build_train_loop
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def build_train_loop(self, loop):
        dataloader = getattr(self, '_train_dataloader', None)
        cfg = getattr(self, 'cfg', None)
        if isinstance(dataloader, dict) and cfg is not None:
            fill_dataset(dataloader.get('dataset'), cfg.get('model'))
            note = previous_stage_note(dataloader.get('dataset'), cfg.get('model'))
            if note:
                from mmengine.logging import print_log
                print_log(note, logger='current', level=logging.WARNING)
        wrap_sampler(dataloader)
        return original(self, loop)

    setattr(build_train_loop, _PATCH_MARK, True)
    runner_cls.build_train_loop = build_train_loop
    return True


def apply_derive_patches() -> List[str]:
    """Wrap ``build_train_loop`` of MMEngine's ``Runner`` and ``FlexibleRunner`` (once each) so that the training
    data set takes the model's settings it leaves unset and its items their epoch; returns the classes newly
    patched."""
    from mmengine.runner import Runner
    classes = [Runner]
    try:
        from mmengine.runner import FlexibleRunner
        classes.append(FlexibleRunner)
    except ImportError:  # an MMEngine without it
        pass
    return [cls.__name__ for cls in classes if _patch_build_train_loop(cls)]
