"""The vision-encoder seam: each encoder type owns its conventions and its loading; the model asks it.

An encoder type is a subclass of :class:`VisionEncoder` registered with :func:`register_vision_encoder`.
The class says how to load a folder of its own on-disk layout (``load``), which ``config.json``
``model_type`` values such folders carry (``model_types``), and how to run the loaded tower into features
(``features``). An instance holds the conventions of one loaded tower: tile size, patch size, the
mean/std the pixels are normalised with, whether a CLS token is dropped and which hidden layer is used.
The model keeps the tower itself as ``vision_model`` (so checkpoint keys stay the tower's own) and the
instance beside it as ``vision``; the data pipeline and the exporters read the conventions from there.

Adding an encoder: one module with a subclass (``name``, ``model_types``, ``module_class``, defaults,
``load``, ``features``), decorated with ``@register_vision_encoder``, imported in ``vision/__init__.py``.
``clip.py`` is the worked example.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar, Dict, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from xtuner_plugins.data.errors import check_model_path
from xtuner_plugins.errors import NotFound, Refused

VISION_ENCODERS: Dict[str, Type['VisionEncoder']] = {}


def register_vision_encoder(cls: Type['VisionEncoder']) -> Type['VisionEncoder']:
    """Class decorator: make ``cls`` available as ``vision_encoder=dict(type=cls.name, ...)``."""
    if cls.name in VISION_ENCODERS:
        raise ValueError(f'vision encoder {cls.name!r} is registered twice')
    VISION_ENCODERS[cls.name] = cls
    return cls


def read_json(path: str) -> dict:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


class VisionEncoder:
    """Conventions of one loaded vision tower, and how its type loads and runs.

    Subclasses set the class attributes; ``__init__`` takes the loaded module and overrides.

    Attributes:
        name: registry key (``'internvit'``, ``'siglip'``, ``'clip'``).
        model_types: ``config.json`` ``model_type`` values of folders of this type (a whole CLIP/SigLIP
            model's folder carries ``'clip'``/``'siglip'``, a vision tower's own ``'clip_vision_model'``...).
        module_class: the class of the loaded tower (used to recognise a tower passed as a module).
        default_select_layer: hidden state used by default (-1: the last; CLIP for LLaVA: -2).
        drop_cls: whether position 0 of the features is a CLS token to drop.
        default_mean, default_std: pixel normalisation when the folder has no ``preprocessor_config.json``.
    """

    name: ClassVar[str] = ''
    model_types: ClassVar[Tuple[str, ...]] = ()
    module_class: ClassVar[type] = nn.Module
    default_select_layer: ClassVar[int] = -1
    drop_cls: ClassVar[bool] = False
    default_mean: ClassVar[Tuple[float, float, float]] = (0.5, 0.5, 0.5)
    default_std: ClassVar[Tuple[float, float, float]] = (0.5, 0.5, 0.5)

    def __init__(self, module: nn.Module, select_layer: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        config = module.config
        self.image_size = square_side(config.image_size, 'image_size')
        self.patch_size = square_side(config.patch_size, 'patch_size')
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.select_layer = self.default_select_layer if select_layer is None else int(select_layer)
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise Refused(f'select_layer {self.select_layer} (model.select_layer) is out of range for the vision '
                          f'encoder\'s {self.num_layers} layers (valid: {-(self.num_layers + 1)}..{self.num_layers})')
        self.mean = tuple(float(x) for x in (self.default_mean if mean is None else mean))
        self.std = tuple(float(x) for x in (self.default_std if std is None else std))

    # ------------------------------------------------------------------ what the data and projector need
    @property
    def grid(self) -> int:
        """Patches per side of a tile (the patch convolution floors: 384 px / 14 px = 27)."""
        return self.image_size // self.patch_size

    @property
    def num_features(self) -> int:
        """Feature tokens per tile handed to the projector (CLS dropped where the type does)."""
        return self.grid * self.grid

    def describe(self) -> str:
        return (f'{self.name} ({self.image_size} px, patch {self.patch_size}, layer {self.select_layer}, '
                f'{"CLS dropped" if self.drop_cls else "no CLS"})')

    # ------------------------------------------------------------------ type-specific
    @classmethod
    def load(cls, path: str, torch_dtype: torch.dtype, attn_implementation: str = 'sdpa',
             drop_path_rate: float = 0.0) -> nn.Module:
        raise NotImplementedError

    def features(self, module: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised tiles ``[T, 3, S, S]`` -> features ``[T, grid * grid, C]``."""
        raise NotImplementedError

    def unused_parameters(self, module: nn.Module):
        """Parameters the features never reach (a pooling head, the final norm when an earlier layer is
        selected); they are kept (an export writes the whole tower) but never trained."""
        return []


def square_side(value, name: str) -> int:
    """A square size given as an int or as ``[s, s]`` (transformers' vision configs)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'a square {name} is needed, got {list(value)}')
        value = value[0]
    return int(value)


def folder_model_type(path: str) -> str:
    """``model_type`` of a model folder's ``config.json`` (an InternVL chat folder counts as its vision part)."""
    config_path = os.path.join(path, 'config.json')
    check_model_path(path, 'model.vision_encoder')
    if not os.path.isdir(path):
        raise NotFound(f'model.vision_encoder: vision encoder folder not found: {path}')
    if not os.path.isfile(config_path):
        raise NotFound(f'model.vision_encoder: {config_path} does not exist; is {path} a vision encoder folder?')
    config = read_json(config_path)
    if 'vision_config' in config and config.get('model_type') == 'internvl_chat':
        config = config['vision_config']
    return str(config.get('model_type', ''))


def encoder_type_for_folder(path: str, expected: Optional[str] = None) -> Type[VisionEncoder]:
    """The registered type whose ``model_types`` holds the folder's ``model_type``; with ``expected``, that
    type, after checking the folder is of its kind."""
    model_type = folder_model_type(path)
    if expected is not None:
        if expected not in VISION_ENCODERS:
            raise Refused(f'model.vision_encoder: unknown vision encoder type {expected!r}; registered: '
                          f'{sorted(VISION_ENCODERS)}')
        cls = VISION_ENCODERS[expected]
        if model_type not in cls.model_types:
            raise Refused(f'model.vision_encoder: {os.path.join(path, "config.json")}: model_type {model_type!r} is '
                          f'not a {expected} encoder (expects one of {list(cls.model_types)})')
        return cls
    for cls in VISION_ENCODERS.values():
        if model_type in cls.model_types:
            return cls
    raise Refused(f'model.vision_encoder: {os.path.join(path, "config.json")}: model_type {model_type!r} is no known '
                  'vision encoder; registered: ' + ', '.join(f'{n} {list(c.model_types)}' for n, c in
                                                             VISION_ENCODERS.items()))


def preprocessor_mean_std(path: str) -> Tuple[Optional[list], Optional[list]]:
    """``image_mean``/``image_std`` of the folder's ``preprocessor_config.json`` (None where absent)."""
    config_path = os.path.join(path, 'preprocessor_config.json')
    if not os.path.isfile(config_path):
        return None, None
    config = read_json(config_path)
    return config.get('image_mean'), config.get('image_std')


def build_vision_encoder(spec: Union[str, dict, nn.Module], torch_dtype: torch.dtype,
                         attn_implementation: str = 'sdpa', drop_path_rate: float = 0.0,
                         select_layer: Optional[int] = None) -> Tuple[nn.Module, VisionEncoder]:
    """Load a vision tower and its conventions.

    Args:
        spec: a folder (its type read from ``config.json``), ``dict(type=NAME, path=FOLDER, select_layer=,
            mean=, std=)``, or a loaded tower (``module_class`` of a registered type).
        select_layer: overrides the type's default (a ``select_layer`` in ``spec`` wins).
    """
    if isinstance(spec, nn.Module):
        for cls in VISION_ENCODERS.values():
            if isinstance(spec, cls.module_class):
                return spec, cls(spec, select_layer=select_layer)
        raise TypeError(f'{type(spec).__name__} is no registered vision tower ({sorted(VISION_ENCODERS)})')
    spec = {'path': spec} if isinstance(spec, str) else {k: v for k, v in dict(spec).items()}
    path = spec.pop('path', None)
    if not isinstance(path, str):
        raise Refused(f'model.vision_encoder needs a path (a folder), got {spec!r}')
    cls = encoder_type_for_folder(path, spec.pop('type', None))
    mean, std = preprocessor_mean_std(path)
    layer = spec.pop('select_layer', select_layer)
    mean, std = spec.pop('mean', mean), spec.pop('std', std)
    if spec:
        raise Refused(f'unknown model.vision_encoder settings {sorted(spec)} (known: type, path, select_layer, '
                      f'mean, std)')
    module = cls.load(path, torch_dtype, attn_implementation, drop_path_rate=drop_path_rate)
    return module, cls(module, select_layer=layer, mean=mean, std=std)


class TransformersVisionEncoder(VisionEncoder):
    """A tower with a transformers class of its own (``SiglipVisionModel``, ``CLIPVisionModel``): loaded
    with ``module_class.from_pretrained`` from the vision tower's folder or a whole dual-encoder's (its text
    tower is not read); features are ``hidden_states[select_layer]`` as transformers' LLaVA takes them."""

    @classmethod
    def load(cls, path, torch_dtype, attn_implementation='sdpa', drop_path_rate=0.0):
        if drop_path_rate:
            raise Refused(f'{cls.name} has no stochastic depth; model.vision_drop_path {drop_path_rate} is for '
                          'InternViT')
        module, info = cls.module_class.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                                        attn_implementation=attn_implementation)
        if info['missing_keys'] or info['mismatched_keys']:
            raise Refused(f'model.vision_encoder: {path}: the weights do not match {cls.module_class.__name__}: '
                          f'missing {sorted(info["missing_keys"])[:8]}, shape mismatch {info["mismatched_keys"][:4]}')
        return module.eval()

    def features(self, module, pixel_values):
        """``hidden_states[select_layer]``, CLS dropped where the type has one, as transformers' LLaVA takes it."""
        out = module(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[self.select_layer]
        return hidden[:, 1:] if self.drop_cls else hidden

    def unused_parameters(self, module):
        depth = self.select_layer % (self.num_layers + 1)
        unused = []
        for name, param in module.named_parameters():
            parts = name.split('.')
            if 'post_layernorm' in parts or 'head' in parts:
                unused.append(param)
            elif 'layers' in parts and int(parts[parts.index('layers') + 1]) >= depth:
                unused.append(param)
        return unused
