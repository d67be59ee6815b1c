"""Vision-to-language projectors, chosen by name; each owns how many LLM tokens a tile becomes.

Every projector maps the encoder's features of a tile, ``[T, g*g, C]`` for a ``g x g`` patch grid, to
``[T, tokens_per_tile(g), H]`` with ``H`` the LLM's hidden size. The model keeps it as ``mlp1`` (InternVL's
name) whatever its kind, so one name serves checkpoints and per-module learning rates.

* ``pixel_shuffle_mlp`` (:class:`InternVLProjector`): InternVL's pixel shuffle (ratio ``r``, 0.5: 2 x 2
  neighbours into one token, channels x 4) then LayerNorm -> Linear -> GELU -> Linear; ``(g*r)^2`` tokens
  (256 for a 448 px InternViT tile). Keys ``0.*``, ``1.*``, ``3.*`` are the official checkpoint's ``mlp1``.
* ``mlp`` (:class:`LlavaProjector`): LLaVA-1.5's Linear -> GELU -> Linear, one token per feature (576 for a
  336 px CLIP tile); keys ``linear_1.*``, ``linear_2.*`` as transformers' ``LlavaMultiModalProjector``.
* ``bilinear_mlp`` (:class:`BilinearProjector`): the grid resized bilinearly to ``floor(g / 2)`` per side
  (``F.interpolate(mode='bilinear', align_corners=False, antialias=False)``, computed in fp32), then
  LLaVA's MLP: 27 x 27 SigLIP features become 13 x 13 = 169 tokens.

Hand-written because no library exposes these as modules of their own with the checkpoints' key names.
Adding a projector: a subclass of ``nn.Module`` with ``name``, ``tokens_per_tile(grid)`` and ``forward``,
registered with ``@register_projector``.
"""

from __future__ import annotations

from typing import Dict, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from xtuner_plugins.errors import Refused

PROJECTORS: Dict[str, Type[nn.Module]] = {}


def register_projector(cls):
    if cls.name in PROJECTORS:
        raise ValueError(f'projector {cls.name!r} is registered twice')
    PROJECTORS[cls.name] = cls
    return cls


#: the pixel-shuffle versions (``ps_version``) there are
PS_VERSIONS = ('v1', 'v2')


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = 'v2') -> torch.Tensor:
    """Trade spatial resolution for channels, as InternVL does.

    Args:
        x: ``[N, h, w, C]`` features of a square-ish patch grid, row-major (``h`` rows, ``w`` columns).
        scale_factor: ``r``; 0.5 halves both sides and multiplies channels by 4.
        version: ``"v2"`` (InternVL 1.5 and later): output token ``(i, j)`` is row-major and its channels
            are the inputs ``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` concatenated. ``"v1"`` has the
            same channels but column-major tokens.

    Returns:
        ``[N, h*r, w*r, C/r^2]``.
    """
    n, h, w, c = x.shape
    inv = round(1 / scale_factor)
    if h % inv or w % inv:
        raise ValueError(f'pixel_shuffle with scale {scale_factor} needs a grid divisible by {inv}, got {h}x{w}')
    if version not in PS_VERSIONS:
        raise ValueError(f'unknown pixel-shuffle version {version!r}; use "v1" or "v2"')
    # merge pairs of columns into channels, swap the grid axes, merge pairs of (former) rows
    x = x.reshape(n, h, w // inv, c * inv).permute(0, 2, 1, 3)
    x = x.reshape(n, w // inv, h // inv, c * inv * inv)
    if version == 'v2':
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def check_downsample_ratio(ratio) -> None:
    """Refuse a pixel-shuffle ratio that is not ``1/n`` for a whole ``n >= 1`` (0.5, 0.25, 1/3, 1.0): the shuffle
    merges ``n x n`` neighbours, so 0.3 would train as 1/3 and 0.7 as 1.0 while the folders record 0.3 and 0.7."""
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    inv = round(1 / ratio) if number and 0 < ratio <= 1 else 0
    if not inv or abs(inv * ratio - 1) > 1e-6:
        raise Refused(f'downsample_ratio {ratio!r}: pixel shuffle merges n x n neighbouring patches into one token, '
                      f'so the ratio must be 1/n for a whole n >= 1 (0.5: 2 x 2, InternVL\'s; 0.25; 1/3; 1.0: none)')


def _grid(features: torch.Tensor) -> int:
    n = features.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f'vision features have {n} tokens per tile, not a square grid')
    return side


@register_projector
class InternVLProjector(nn.Sequential):
    """``mlp1``: pixel shuffle, then LayerNorm(in) -> Linear(in, H) -> GELU -> Linear(H, H).

    Args:
        vision_hidden_size: channels of one vision token before pixel shuffle (1024 for InternViT-300M).
        llm_hidden_size: the LLM's hidden size.
        downsample_ratio: pixel-shuffle ratio (0.5), so the input width is ``vision_hidden_size / r^2``.
        ps_version: pixel-shuffle version (``"v2"``).
    """

    name = 'pixel_shuffle_mlp'

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, downsample_ratio: float = 0.5,
                 ps_version: str = 'v2'):
        check_downsample_ratio(downsample_ratio)
        if ps_version not in PS_VERSIONS:   # (a ValueError's traceback at the first forward)
            raise Refused(f'ps_version {ps_version!r}: the pixel-shuffle version is one of {PS_VERSIONS} (InternVL '
                          f'1.5 and later: \'v2\'; set model.ps_version)')
        in_features = int(vision_hidden_size * round(1 / downsample_ratio) ** 2)
        super().__init__(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.downsample_ratio = downsample_ratio
        self.ps_version = ps_version

    def tokens_per_tile(self, grid: int) -> int:
        inv = round(1 / self.downsample_ratio)
        if grid % inv:
            raise Refused(f'pixel_shuffle with ratio {self.downsample_ratio} needs a patch grid divisible by '
                          f'{inv}, got {grid}x{grid}')
        return (grid // inv) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        t, _, c = features.shape
        side = _grid(features)
        x = pixel_shuffle(features.reshape(t, side, side, c), self.downsample_ratio, self.ps_version)
        return super().forward(x.reshape(t, -1, x.shape[-1]).to(self[0].weight.dtype))


@register_projector
class LlavaProjector(nn.Module):
    """LLaVA-1.5's projector: Linear(C, H) -> GELU -> Linear(H, H) on every feature token."""

    name = 'mlp'

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, llm_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)

    def tokens_per_tile(self, grid: int) -> int:
        return grid * grid

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


@register_projector
class BilinearProjector(LlavaProjector):
    """The feature grid resized bilinearly to half its side (rounded down), then LLaVA's 2-layer MLP."""

    name = 'bilinear_mlp'

    def tokens_per_tile(self, grid: int) -> int:
        if grid < 2:
            raise Refused(f'bilinear_mlp halves the patch grid; a {grid}x{grid} grid is too small')
        return (grid // 2) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        t, _, c = features.shape
        side = _grid(features)
        grid = features.reshape(t, side, side, c).permute(0, 3, 1, 2).float()
        pooled = F.interpolate(grid, size=(side // 2, side // 2), mode='bilinear', align_corners=False,
                               antialias=False)
        return self.mlp(pooled.flatten(2).transpose(1, 2))


def build_projector(spec: Union[str, dict], vision_hidden_size: int, llm_hidden_size: int) -> nn.Module:
    """``spec``: a registered name, or ``dict(type=NAME, **settings)`` (``downsample_ratio``, ``ps_version``
    for ``pixel_shuffle_mlp``)."""
    spec = {'type': spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop('type', None)
    if name not in PROJECTORS:
        raise Refused(f'unknown projector {name!r}; registered: {sorted(PROJECTORS)}')
    try:
        return PROJECTORS[name](vision_hidden_size, llm_hidden_size, **spec)
    except TypeError as err:
        raise Refused(f'projector {name!r}: {err}') from None
