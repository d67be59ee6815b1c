"""Dynamic high-resolution tiling of images, as in InternVL 1.5 / 2 / 2.5.

An image is cut into a grid of ``cols x rows`` square tiles of ``image_size`` pixels (448 for InternVL).
The grid is the candidate whose ratio ``cols / rows`` is closest to the image's ``width / height``, among all
grids with ``min_num <= cols * rows <= max_num``. The whole image is resized once to
``(image_size * cols, image_size * rows)`` with Pillow's default filter (bicubic for RGB), and the tiles are
read row-major: left to right, then top to bottom. With ``use_thumbnail`` and more than one tile, the whole
image resized to ``image_size x image_size`` is appended as the last tile.

Two entry points produce the same pixels:

* :func:`dynamic_preprocess` returns a list of PIL tiles and is pixel-identical to InternVL's function of
  the same name (it is the reference, and what evaluation code expects);
* :func:`tile_image` is the training path: one resize, one conversion to an array, and one copy into a
  single ``uint8`` tensor ``[N, 3, S, S]``. Normalisation is deferred to :func:`normalize_tiles`, which can
  run on the accelerator and gives bit-identical floats to torchvision's ``ToTensor()`` + ``Normalize()``.

The grid's choice, and :func:`~xtuner_plugins.data.tile_grid.num_tiles`, the number of tiles from the image size
alone (sample lengths are computed from image headers without decoding pixels), are in ``tile_grid.py``.

All functions are pure (no global state besides small caches of immutable values).
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .tile_grid import choose_grid

__all__ = [
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'dynamic_preprocess',
    'tile_image',
    'pad_to_square',
    'image_tiles',
    'IMAGE_MODES',
    'pad_colour',
    'normalize_tiles',
]

# How an image becomes tiles: InternVL's dynamic tiling, one resized tile, or one tile of the image padded
# to a square first (LLaVA's ``image_aspect_ratio='pad'``).
IMAGE_MODES = ('tile', 'resize', 'pad')

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> List[Image.Image]:
    """Cut an image into tiles, pixel-identical to InternVL 2.5's ``dynamic_preprocess``.

    Args:
        image: PIL image of any mode (InternVL passes RGB); its mode is kept.
        min_num: smallest allowed number of grid tiles.
        max_num: largest allowed number of grid tiles.
        image_size: tile side ``S`` in pixels.
        use_thumbnail: append the whole image resized to ``S x S`` when there is more than one tile.

    Returns:
        ``cols * rows`` PIL images of size ``S x S`` in row-major order (left to right, top to bottom),
        then the thumbnail if any.

    Raises:
        ValueError: as :func:`choose_grid`.
    """
    cols, rows = choose_grid(image.width, image.height, min_num, max_num, image_size)
    # No resample argument: Pillow's default filter (bicubic for RGB/L, nearest for "1"/"P"), as InternVL.
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def tile_image(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> torch.Tensor:
    """Training path: all tiles of an RGB image as one ``uint8`` tensor.

    Same pixels as ``dynamic_preprocess`` (same grid, same single Pillow resize), but the tiles are cut by
    reshaping the resized array instead of cropping PIL images: the resized pixels are copied exactly once,
    straight into the final contiguous tensor.

    Args:
        image: RGB PIL image.
        min_num: smallest allowed number of grid tiles.
        max_num: largest allowed number of grid tiles.
        image_size: tile side ``S`` in pixels.
        use_thumbnail: append the whole image resized to ``S x S`` when there is more than one tile.

    Returns:
        ``torch.uint8`` tensor ``[N, 3, S, S]`` (channels RGB), ``N = num_tiles(...)``: grid tiles in
        row-major order, then the thumbnail if any.

    Raises:
        ValueError: if the image is not RGB, or as :func:`choose_grid`.
    """
    if image.mode != 'RGB':
        raise ValueError(f"tile_image needs an RGB image, got mode {image.mode!r}; call .convert('RGB') first")
    s = image_size
    cols, rows = choose_grid(image.width, image.height, min_num, max_num, s)
    n_grid = cols * rows
    with_thumb = use_thumbnail and n_grid > 1
    out = np.empty((n_grid + int(with_thumb), 3, s, s), dtype=np.uint8)

    resized = np.asarray(image.resize((s * cols, s * rows)))  # [rows*S, cols*S, 3], read-only view
    # [rows*S, cols*S, 3] -> [rows, S, cols, S, 3] -> [rows, cols, 3, S, S]; one strided copy into `out`.
    out[:n_grid].reshape(rows, cols, 3, s, s)[...] = (
        resized.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3))
    if with_thumb:
        out[n_grid] = np.asarray(image.resize((s, s))).transpose(2, 0, 1)
    return torch.from_numpy(out)


def pad_colour(mean: Sequence[float]) -> Tuple[int, ...]:
    """LLaVA's padding colour: the normalisation mean in 0..255, truncated (``int(x * 255)``)."""
    return tuple(int(x * 255) for x in mean)


def pad_to_square(image: Image.Image, colour: Sequence[int]) -> Image.Image:
    """The image centred on a square of its longer side filled with ``colour`` (offset
    ``(long - short) // 2``), as LLaVA's ``expand2square`` and transformers' ``LlavaImageProcessor(do_pad=True)``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(c) for c in colour))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_tiles(image: Image.Image, mode: str = 'tile', image_size: int = 448, min_num: int = 1,
                max_num: int = 12, use_thumbnail: bool = False,
                mean: Sequence[float] = IMAGENET_MEAN) -> torch.Tensor:
    """An RGB image as ``uint8`` tiles ``[N, 3, S, S]`` in one of :data:`IMAGE_MODES`: ``'tile'`` is
    :func:`tile_image`; ``'resize'`` one tile, the image resized to ``S x S``; ``'pad'`` one tile, the image
    padded to a square with :func:`pad_colour` of ``mean`` first."""
    if mode not in IMAGE_MODES:
        raise ValueError(f'unknown image mode {mode!r}; use one of {IMAGE_MODES}')
    if mode == 'tile':
        return tile_image(image, min_num=min_num, max_num=max_num, image_size=image_size,
                          use_thumbnail=use_thumbnail)
    if mode == 'pad':
        image = pad_to_square(shrunk_for_padding(image, image_size), pad_colour(mean))
    return tile_image(image, min_num=1, max_num=1, image_size=image_size)


#: the largest square :func:`image_tiles` pads to before resizing it to one tile, in pixels: a 336-byte PNG of
#: 1 x 65000 asked for a 65000 x 65000 square (12.7 GB)
MAX_PAD_SQUARE = 1 << 26


def shrunk_for_padding(image: Image.Image, image_size: int) -> Image.Image:
    """``image`` as it is, or, when its padded square would be over :data:`MAX_PAD_SQUARE` pixels and over twice
    its own (and its longer side over ``4 * image_size``), first resized (bicubic) to a longer side of
    ``4 * image_size``: the tile then differs from padding at full size only by the resampling's rounding. Other
    images are padded at full size, as LLaVA and transformers' processor do, pixel for pixel."""
    side = max(image.size)
    if side <= 4 * image_size or side * side <= max(MAX_PAD_SQUARE, 2 * image.width * image.height):
        return image
    scale = 4 * image_size / side
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


@functools.lru_cache(maxsize=32)
def _mean_std(mean: Tuple[float, ...], std: Tuple[float, ...],
              device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    # float32 [C, 1, 1], exactly as torchvision's Normalize builds them (torch.as_tensor(..., float32)).
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    d = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return m, d


def normalize_tiles(
    tiles: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Convert ``uint8`` tiles to normalised floats on the tiles' own device.

    Bit-identical to torchvision's ``T.Normalize(mean, std)(T.ToTensor()(tile))`` for every tile: the
    same float32 operations in the same order, ``x.float() / 255``, then ``- mean``, then ``/ std``
    (division, not multiplication by a reciprocal, which would round differently).

    Args:
        tiles: ``torch.uint8`` tensor ``[..., C, S, S]`` (usually ``[N, 3, S, S]`` from :func:`tile_image`).
        mean: per-channel mean, ``C`` values.
        std: per-channel standard deviation, ``C`` values (non-zero).
        dtype: output dtype; computed in float32, then cast (e.g. ``torch.bfloat16`` for training).

    Returns:
        Tensor of the same shape as ``tiles``, dtype ``dtype``, on ``tiles.device``.

    Raises:
        ValueError: if ``tiles`` is not uint8, has too few dimensions, or its channel count does not
            match ``mean``/``std``; or if a std is zero.
    """
    if tiles.dtype != torch.uint8:
        raise ValueError(f'normalize_tiles needs uint8 tiles, got dtype {tiles.dtype}')
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if tiles.dim() < 3 or not (tiles.shape[-3] == len(mean_t) == len(std_t)):
        raise ValueError(
            f'tiles shape {tuple(tiles.shape)} does not match {len(mean_t)} means and {len(std_t)} stds '
            f'(expected [..., C, H, W] with C equal to both)')
    if any(v == 0.0 for v in std_t):
        raise ValueError(f'std must be non-zero, got {std_t}')
    m, d = _mean_std(mean_t, std_t, tiles.device)
    x = tiles.to(torch.float32).div_(255).sub_(m).div_(d)
    return x if dtype == torch.float32 else x.to(dtype)
