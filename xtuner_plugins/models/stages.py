"""Loading trained tensors onto a ``VisionLanguageModel``: one checkpoint (:func:`load_trained`, the converter's
strict check included) or a chain of stages (:func:`load_stages`, ``lineage.py``), LoRA adapters merged between
stages."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from mmengine.logging import print_log

from xtuner_plugins.errors import Refused

from .checkpoint import load_trained_state_dict
from .lineage import check_sources, resolve_chain
from .lora import apply_lora
from .zero3 import gathered, shape_of


def load_stages(model, path: str) -> None:
    """Load the checkpoint chain that ends at ``path`` (``lineage.resolve_chain``), oldest first, each stage's
    recorded source folders checked against the model's. A stage that trained LoRA adapters is loaded into
    adapters of its recorded settings, which are then merged into the weights (peft's ``merge_and_unload``;
    on a 4-bit LLM this rounds to 4 bits), so the next stage starts from exactly the model that stage left."""
    for stage in resolve_chain(path):
        check_sources(stage.lineage, model.lineage['sources'], stage.path)
        wrapped = []
        for attr, key, task in (('language_model', 'llm_lora', 'CAUSAL_LM'), ('vision_model', 'vision_lora', None)):
            if stage.get(key):
                module = getattr(model, attr)
                trainable = {n for n, p in module.named_parameters() if p.requires_grad}
                setattr(model, attr, apply_lora(module, stage.get(key), task_type=task,
                                                key=f'{stage.path}: its {key}'))
                wrapped.append((attr, trainable))
        load_trained(model, stage.path)
        for attr, trainable in wrapped:
            with torch.no_grad():
                merged = getattr(model, attr).merge_and_unload()
            for name, p in merged.named_parameters():  # peft froze the base; this stage's choice comes back
                p.requires_grad_(name in trainable)
            setattr(model, attr, merged)
            print_log(f'Merged the LoRA adapters of {stage.path} into {attr}', logger='current')


def recorded_template(path: str) -> Optional[str]:
    """The ``model.template`` a checkpoint's recorded config names (None: none recorded, or left to inheritance)."""
    from .checkpoint import config_settings, read_meta
    text = read_meta(path).get('cfg')
    if not isinstance(text, str):
        return None
    recorded = (config_settings(text, f"{path}: meta['cfg']").get('model') or {}).get('template')
    return recorded if isinstance(recorded, str) else None


def inherited_template(pretrained_pth: Optional[str], official_checkpoint: Optional[str] = None) -> str:
    """The chat template of a stage that names none (``model.template=None``, the stage configs'): the newest one a
    previous stage records (``model.pretrained_pth`` and the stages before it), else the official folder's
    (``config.json``'s ``template``), else ``internvl2_5``. What a checkpoint was trained with is read from it: a
    preference stage after a ``llama3`` SFT trains in Llama 3's turns without being told again."""
    from xtuner_plugins.data.template import DEFAULT_TEMPLATE, TEMPLATES
    if pretrained_pth:
        for stage in reversed(resolve_chain(pretrained_pth)):
            found = recorded_template(stage.path)
            if found:
                return found
    if official_checkpoint:
        import json
        import os
        try:
            with open(os.path.join(official_checkpoint, 'config.json'), encoding='utf-8') as f:
                found = json.load(f).get('template')
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str) and found in TEMPLATES:
            return found
    return DEFAULT_TEMPLATE


def check_template(path: str, template: str, official_checkpoint: Optional[str] = None) -> None:
    """Refuse a run giving another chat template (``model.template``) than the stages before it trained with
    (:func:`inherited_template`): a later stage given the default after a ``Hermes-2`` or ``phi3-chat`` one
    trained on other turns without a word, and its converted model recorded the wrong template."""
    before = inherited_template(path, official_checkpoint)
    if before != template:
        raise Refused(f'model.template: {path} (model.pretrained_pth, or a stage before it) was trained with the '
                      f'template {before!r}, this run gives {template!r}: the model answers in the turns it '
                      f'learnt; leave model.template unset (None: the previous stage\'s) or set it to {before}')


def _encoder_defaults(vision) -> Tuple[Optional[int], Optional[tuple]]:
    """What a vision encoder (a folder, or ``dict(type=..., path=...)``) gives by default: the hidden layer (its
    registered type's ``default_select_layer``: CLIP's second-to-last, as LLaVA takes it) and the pixel
    normalisation (``(mean, std)``: its folder's ``preprocessor_config.json``, else its type's); None where it
    cannot be told."""
    from .vision import VISION_ENCODERS, encoder_type_for_folder
    from .vision.base import preprocessor_mean_std
    spec = {'path': vision} if isinstance(vision, str) else vision if isinstance(vision, dict) else {}
    try:
        path = spec.get('path') if isinstance(spec.get('path'), str) else None
        cls = VISION_ENCODERS[spec['type']] if spec.get('type') else encoder_type_for_folder(path) if path else None
        if cls is None:
            return None, None
        mean, std = preprocessor_mean_std(path) if path else (None, None)
        return cls.default_select_layer, (cls.default_mean if mean is None else mean,
                                          cls.default_std if std is None else std)
    except (KeyError, TypeError, OSError, ValueError):   # the model's build names what is wrong
        return None, None


def _numbers(values) -> Optional[tuple]:
    try:
        return tuple(round(float(v), 6) for v in values)
    except (TypeError, ValueError):
        return None


def vision_geometry(settings: dict, defaults: Tuple[Optional[int], Optional[tuple]]) -> dict:
    """What shapes the features the projector (mlp1) learns on, as the model builds it from ``settings`` (a
    ``model`` config): the projector's kind, its pixel-shuffle ratio and version (for ``pixel_shuffle_mlp`` only:
    a name or a dict, the model's own keys under it), the image mode, the vision layer (in the encoder's dict or
    the model's key) and the pixels' normalisation (the encoder dict's ``mean``/``std``); where unset,
    ``defaults`` (:func:`_encoder_defaults`: the layer, ``(mean, std)``)."""
    projector = settings.get('projector', 'pixel_shuffle_mlp')
    spec = dict(projector) if isinstance(projector, dict) else {'type': projector}
    name = spec.get('type')
    name = name.rsplit('.', 1)[-1] if isinstance(name, str) else getattr(name, 'name', getattr(name, '__name__', name))
    out = dict(projector=name, image_mode=settings.get('image_mode') or 'tile')
    if name == 'pixel_shuffle_mlp':
        out.update(downsample_ratio=float(spec.get('downsample_ratio', settings.get('downsample_ratio') or 0.5)),
                   ps_version=spec.get('ps_version', settings.get('ps_version') or 'v2'))
    vision = settings.get('vision_encoder')
    vision = vision if isinstance(vision, dict) else {}
    layer = vision.get('select_layer')
    layer = settings.get('select_layer') if layer is None else layer
    out['select_layer'] = defaults[0] if layer is None else int(layer)
    for i, key in enumerate(('mean', 'std')):
        given = vision.get(key)
        out[f'vision_encoder.{key}'] = _numbers(defaults[1][i] if given is None and defaults[1] else given)
    return out


def geometry_problem(path: str, settings: dict) -> Optional[str]:
    """Why a run of ``settings`` (its ``model`` config) may not start from the checkpoint ``path``
    (``model.pretrained_pth``): another vision geometry (:func:`vision_geometry`) than it was trained with, or None.
    A warm-up trained with ``ps_version='v1'`` and ``select_layer=-2`` was fine-tuned on v2 and the last layer, its
    projector loaded all the same (same shapes, other features), without a word; another ``downsample_ratio`` was a
    shape mismatch naming no setting. A run from an official folder takes its projector from there: not compared."""
    from .checkpoint import recorded_model_config
    if settings.get('official_checkpoint'):
        return None
    try:
        recorded = recorded_model_config(path)
    except (OSError, ValueError):   # pretrained_refusal says what is wrong with it
        return None
    if recorded is None:   # no config recorded (written before MMEngine stored it): nothing to compare
        return None
    # the encoder folder's defaults, this run's: the folders themselves are compared by their fingerprints
    defaults = _encoder_defaults(settings.get('vision_encoder'))
    trained, given = vision_geometry(recorded, defaults), vision_geometry(settings, defaults)
    unknown = ('select_layer', 'vision_encoder.mean', 'vision_encoder.std')   # None: cannot be told
    # (another projector: its own settings are not the other's to give; they were listed as 'trained None')
    keys = [k for k in given if k in trained or trained['projector'] == given['projector']]
    differ = [f'model.{key}: trained {trained.get(key)!r}, given {given.get(key)!r}' for key in keys
              if trained.get(key) != given[key] and not (key in unknown and None in (trained[key], given[key]))]
    if not differ:
        return None
    return (f'{path} (model.pretrained_pth) was trained with another vision geometry than this run gives '
            f'({"; ".join(differ)}): its projector (mlp1) learnt on those features; give the trained values '
            '(--cfg-options model.KEY=VALUE), or leave model.pretrained_pth out to train a new projector')


def load_trained(model, path: str, strict: bool = False) -> None:
    """Load a checkpoint of trained parameters (mmengine ``.pth`` or DeepSpeed folder) onto ``model``.

    Tensors are read one at a time (memory-mapped / lazily consolidated), so loading needs little more
    memory than the model. ``strict``: the checkpoint must hold exactly the parameters the model trains
    (the converter's check that checkpoint and config belong together); otherwise (a previous stage's
    checkpoint) any subset of the model's parameters is accepted, but not none, nor a part of the projector.
    """
    state = load_trained_state_dict(path, lazy=True)
    # earlier stages load before this stage's adapters go on (load_stages), each into adapters of its own
    # settings: the checkpoint's names are the model's
    own = dict(model.named_parameters())
    unexpected = sorted(k for k in state if k not in own)
    if strict:
        trained = model.trainable_keys()
        unexpected = sorted(k for k in state if k not in trained)
        missing = sorted(trained - set(state))
        if missing:
            raise Refused(f'{path}: {len(missing)} trained parameters of this config are missing from '
                          f'the checkpoint: {missing[:8]}; was it trained with another config or options?')
    if unexpected:
        raise Refused(f'{path}: {len(unexpected)} keys do not belong to '
                      f'{"what this config trains" if strict else "this model"} (first: {unexpected[:8]}); '
                      f'was it trained with another config or options?')
    if not state:   # (a previous stage's projector, adapters and weights would all stay as built: random)
        raise Refused(f'{path}: the checkpoint holds no tensors (its state_dict is empty), so nothing its stage '
                      f'trained would load; give a checkpoint as its run saved it')
    projector = [k for k in own if k.startswith('mlp1.')]   # always trained whole: a part of it is a cut file
    held = [k for k in projector if k in state]
    if held and len(held) < len(projector):
        raise Refused(f'{path}: it holds {len(held)} of the projector\'s {len(projector)} tensors (mlp1; missing: '
                      f'{[k for k in projector if k not in state][:4]}), and the rest would stay random; give a '
                      f'checkpoint as its run saved it')
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(shape_of(own[k]))}'
                  for k, v in state.items() if tuple(v.shape) != tuple(shape_of(own[k]))]
    if mismatched:
        raise Refused(f'{path}: the checkpoint does not match the config: shape mismatch for '
                      f'{len(mismatched)} keys: {mismatched[:5]}')
    from xtuner_plugins.engine.nonfinite import non_finite_tensors
    count, numel, bad = len(state), 0, []
    with torch.no_grad():
        for key in list(state):
            value = state.pop(key).contiguous()
            bad += non_finite_tensors([(key, value)])  # one tensor in memory at a time
            param = own[key]
            with gathered([param], modify=True):
                param.copy_(value.to(param.dtype))
            numel += value.numel()
            del value
    if bad:
        raise Refused(f'{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[:8]}); the run '
                      f'that wrote it diverged: use an earlier checkpoint')
    print_log(f'Loaded {count} tensors ({numel} parameters) from {path}', logger='current')
