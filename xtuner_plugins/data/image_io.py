"""Reading images safely: path containment, header-only sizes, decoding with clear errors.

Every failure is a :class:`~xtuner_plugins.data.errors.SampleError` with a countable reason:

==========================  =====================================================================
reason                      when
==========================  =====================================================================
``unsafe_image_path``       the path leaves its image folder (``../``, or an absolute path outside)
``missing_image``           no file at the resolved path
``corrupt_image``           Pillow cannot identify or decode the file, or it is truncated
``image_too_large``         more pixels than the decompression-bomb limit
==========================  =====================================================================

Modes other than RGB are converted to RGB. Most go through Pillow's own ``convert('RGB')``, as
InternVL's loader does, so the pixels stay identical to it (RGBA/LA drop alpha, P uses its palette,
CMYK uses Pillow's conversion). 16-bit greyscale (``I;16*``, and ``I`` holding values above 255) is
scaled by 255/65535 and float greyscale in [0, 1] (``F``) by 255 first: Pillow's ``convert`` would clip
them to 255 and give a white image.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SampleError

#: Pillow's own decompression-bomb threshold (pixels); images above it are refused by default.
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def resolve_image_path(path: str, image_folder: Optional[str], base_dir: Optional[str] = None,
                       allow_links_outside: bool = False) -> str:
    """Turn a sample's image path into a file path, refusing paths that escape ``image_folder``.

    Args:
        path: the path as written in the sample.
        image_folder: the folder the sample's images live in. When given, the path must stay inside it: as
            written (``../``) and as resolved (a symbolic link inside the folder to a file or folder outside
            it), unless ``allow_links_outside`` (for data linked in on purpose). The folder itself may be a link.
        base_dir: where relative paths are resolved when there is no ``image_folder`` (the annotation
            file's folder); absolute paths are then taken as they are.
    """
    if not isinstance(path, str) or not path:
        raise SampleError('bad_image_field', f'image path must be a non-empty string, got {path!r}')
    if image_folder is None:
        return os.path.normpath(os.path.join(base_dir or '', path))
    root = os.path.normpath(os.path.abspath(image_folder))
    full = os.path.normpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise SampleError('unsafe_image_path',
                          f'image path {path!r} escapes its image folder {image_folder!r} (resolves to {full})')
    if not allow_links_outside:
        real_root, real = os.path.realpath(root), os.path.realpath(full)
        if os.path.commonpath([real_root, real]) != real_root:
            raise SampleError('unsafe_image_path',
                              f'image path {path!r} is a symbolic link to {real}, outside its image folder '
                              f'{image_folder!r} (set the data set\'s allow_links_outside=True to allow it)')
    return full


def _check_pixels(path: str, size: Tuple[int, int], max_pixels: Optional[int]) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise SampleError(
            'image_too_large',
            f'{path}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels is over the decompression-bomb limit of '
            f'{max_pixels} pixels (raise max_image_pixels if the image is trusted)')


@contextlib.contextmanager
def _open_image(path: str, max_pixels: Optional[int], action: str):
    """``Image.open`` with every failure turned into a :class:`SampleError` (``action`` names the step)."""
    if not os.path.isfile(path):
        raise SampleError('missing_image', f'image file not found: {path}')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(path, img.size, max_pixels)
                yield img
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError('image_too_large', f'{path}: {exc}') from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError('corrupt_image', f'cannot {action} {path}: {exc}') from None


def read_image_size(path: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[int, int]:
    """Return ``(width, height)`` from the file header, without decoding the pixels."""
    with _open_image(path, max_pixels, 'read image header of') as img:
        return img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules)."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith('I;16') or (img.mode == 'I' and top > 255.0):
            arr = arr / 257.0  # 16-bit range: 65535 -> 255
        elif img.mode == 'F' and top <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
    return img.convert('RGB')


def load_image(path: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and return it as RGB.

    Raises:
        SampleError: ``missing_image``, ``corrupt_image`` (unreadable or truncated) or ``image_too_large``.
    """
    with _open_image(path, max_pixels, 'decode image') as img:
        img.load()  # raises OSError on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off)
        return to_rgb(img)


def load_image_tiles(path: str, image_size: int = 448, max_num: int = 12, min_num: int = 1,
                     use_thumbnail: bool = True, dtype=None):
    """InternVL's ``load_image`` for inference: the image's tiles (and thumbnail), normalised with the
    ImageNet mean and std, as a ``[N, 3, S, S]`` tensor (float32 unless ``dtype``)."""
    import torch

    from .tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles, tile_image
    tiles = tile_image(load_image(path), min_num=min_num, max_num=max_num, image_size=image_size,
                       use_thumbnail=use_thumbnail)
    return normalize_tiles(tiles, IMAGENET_MEAN, IMAGENET_STD, dtype=dtype or torch.float32)
