"""InternVL's vision-to-language projector: pixel shuffle, then the ``mlp1`` MLP.

Hand-written because no library exposes it as a module of its own (transformers has it inside
``InternVLModel``, not separately loadable with the official ``mlp1.*`` keys). Shapes:

* :func:`pixel_shuffle` ``[N, h, w, C] -> [N, h*r, w*r, C/r^2]`` for ratio ``r`` (0.5: 32x32x1024 ->
  16x16x4096 for a 448 px tile of InternViT-300M);
* :class:`InternVLProjector` ``[..., C/r^2] -> [..., H]`` with ``H`` the LLM's hidden size. Its parameter
  names are the official checkpoint's: ``0`` LayerNorm, ``1`` Linear, ``2`` GELU, ``3`` Linear.
"""

from __future__ import annotations

import torch
from torch import nn


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
    if version not in ('v1', 'v2'):
        raise ValueError(f'unknown pixel-shuffle version {version!r}; use "v1" or "v2"')
    # merge pairs of columns into channels, swap the grid axes, merge pairs of (former) rows
    x = x.reshape(n, h, w // inv, c * inv).permute(0, 2, 1, 3)
    x = x.reshape(n, w // inv, h // inv, c * inv * inv)
    if version == 'v2':
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


class InternVLProjector(nn.Sequential):
    """``mlp1``: LayerNorm(in) -> Linear(in, H) -> GELU -> Linear(H, H), applied after pixel shuffle.

    Args:
        vision_hidden_size: channels of one vision token before pixel shuffle (1024 for InternViT-300M).
        llm_hidden_size: the LLM's hidden size.
        downsample_ratio: pixel-shuffle ratio (0.5), so the input width is ``vision_hidden_size / r^2``.
    """

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, downsample_ratio: float = 0.5):
        in_features = int(vision_hidden_size * round(1 / downsample_ratio) ** 2)
        super().__init__(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.downsample_ratio = downsample_ratio
