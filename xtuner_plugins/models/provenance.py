"""The converter's check that a checkpoint is converted with the settings it was trained with.

Key names and shapes catch most mismatches (``VisionLanguageModel.load_pretrained(strict=True)``), but not the
settings that leave them alone and change the result: a LoRA checkpoint trained with ``lora_alpha=32`` and
merged with 64 has the same tensors and gives weights off by up to 0.05. MMEngine records the run's whole
config in every checkpoint (``meta['cfg']``, its text; under DeepSpeed in the folder's ``*model_states.pt``);
:func:`check_trained_settings` reads it back, as data (``checkpoint.config_settings``: never run), and refuses any
of :data:`RESULT_SETTINGS` that differs from the config given to the converter, naming both values.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, List, Optional

import torch

# VisionLanguageModel settings that change the converted weights or the prompt, but not key names or shapes
RESULT_SETTINGS = ('projector', 'image_mode', 'select_layer', 'downsample_ratio', 'ps_version', 'template',
                   'llm_lora', 'vision_lora', 'llm_quantization')
# LoRA settings that do not change the merged weights
_LORA_IGNORED = ('lora_dropout',)


def recorded_config_text(checkpoint: str) -> Optional[str]:
    """The training config's text MMEngine stored in ``checkpoint`` (file or DeepSpeed folder), if any."""
    from .checkpoint import read_meta
    return read_meta(checkpoint).get('cfg')


def comparable(value, key: str = ''):
    """Comparable form: a class and its config text (``'transformers.BitsAndBytesConfig'``) give its name, a
    dtype its text, tuples lists; LoRA settings that do not change merged weights are left out."""
    if key == 'type':
        name = value if isinstance(value, str) else getattr(value, '__qualname__', repr(value))
        return name.rsplit('.', 1)[-1]
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, dict):
        return {k: comparable(v, k) for k, v in value.items() if k not in _LORA_IGNORED}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value


def _model_settings(model_cfg) -> Dict[str, object]:
    from xtuner_plugins.models.internvl import VisionLanguageModel
    defaults = {name: p.default for name, p in inspect.signature(VisionLanguageModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings = {key: comparable(model_cfg.get(key, defaults.get(key))) for key in RESULT_SETTINGS}
    settings.update(_encoder_settings(model_cfg.get('vision_encoder'), settings['select_layer']))
    return settings


def _encoder_settings(encoder, model_layer) -> Dict[str, object]:
    """The encoder's type and layer as training builds them (its path may move): a folder given alone (or a dict
    without them) has its ``config.json``'s type and that type's default layer, where the folder is there to read
    (None where it is not: not compared, as the model is built from the recorded settings)."""
    if not isinstance(encoder, (dict, str)):
        return {}
    from xtuner_plugins.models.vision import VISION_ENCODERS
    from xtuner_plugins.models.vision.base import folder_model_type
    given = dict(encoder) if isinstance(encoder, dict) else {'path': encoder}
    kind = comparable(given['type'], 'type') if given.get('type') is not None else None
    layer, path, cls = given.get('select_layer'), given.get('path'), VISION_ENCODERS.get(kind)
    if kind is None and isinstance(path, str) and os.path.isfile(os.path.join(path, 'config.json')):
        try:
            model_type = folder_model_type(path)
        except (OSError, ValueError):   # a config.json that does not read: said where the model is built
            model_type = None
        cls = next((c for c in VISION_ENCODERS.values() if model_type in c.model_types), None)
        kind = cls.name if cls is not None else None
    if layer is None and cls is not None:
        layer = model_layer if model_layer is not None else cls.default_select_layer
    return {'vision_encoder.type': kind, 'vision_encoder.select_layer': layer}


def setting_differences(trained_model_cfg, given_model_cfg) -> List[str]:
    """``'key: trained A, given B'`` for every result-changing setting that differs."""
    trained, given = _model_settings(trained_model_cfg), _model_settings(given_model_cfg)
    out = []
    for key in sorted(set(trained) | set(given)):
        a, b = trained.get(key), given.get(key)
        if key == 'template' and (a is None or b is None):   # None: the previous stage's (inherited_template); the
            continue                                         # recorded setting builds the model either way
        if key.startswith('vision_encoder.') and (a is None or b is None):   # a folder not there to read
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # name the LoRA setting that differs
            out += [f'model.{key}.{k}: trained {a.get(k)!r}, given {b.get(k)!r}'
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f'model.{key}: trained {a!r}, given {b!r}')
    return out


def check_trained_settings(cfg, checkpoint: str, log: Callable[[str], None] = print) -> None:
    """Raise ValueError when ``checkpoint`` was trained with other result-changing settings than ``cfg``."""
    from .checkpoint import recorded_model_config
    trained = recorded_model_config(checkpoint)
    if trained is None:
        log(f'{checkpoint}: no training config recorded in it; its settings are not compared with the config')
        return
    problems = setting_differences(trained, cfg.model)
    if problems:
        raise ValueError(f'{checkpoint} was trained with other settings than the config gives (leave the config '
                         f'out: the checkpoint records its own): ' + '; '.join(problems))
