"""Reading images safely: path checks, header-only sizes, decoding with clear errors, one pixel rule.

:func:`load_image` is the one image loader of the package: training (the data set), ``tools/check_dataset.py``,
``tools/chat.py``, ``tools/eval.py`` and the web demo (which hands it the uploaded file, never gradio's decoded
copy) all give it the file (a path, or its bytes) and get the same RGB pixels.

Every failure is a :class:`~xtuner_plugins.data.errors.SampleError` with a countable reason:

==========================  =====================================================================
reason                      when
==========================  =====================================================================
``bad_image_field``         the image field is not a non-empty string
``bad_image_path``          the path cannot name a file: a NUL byte, a character the file system's
                            encoding cannot hold (a lone surrogate), a name part or a whole path
                            longer than the system allows
``unsafe_image_path``       the path leaves its image folder (``../``, or an absolute path outside)
``missing_image``           no file at the resolved path (a symbolic link loop or a broken link is
                            named as such)
``corrupt_image``           Pillow cannot identify or decode the file, or it is truncated
``image_too_large``         more pixels than the decompression-bomb limit
==========================  =====================================================================

The pixel rule, the same on every path:

* **Modes.** Modes other than RGB are converted to RGB. Most go through Pillow's own ``convert('RGB')``, as
  InternVL's loader does, so the pixels stay identical to it (RGBA/LA drop alpha, P uses its palette, CMYK uses
  Pillow's conversion, L/1 are repeated into three channels). 16-bit greyscale (``I;16*``, and ``I`` holding
  values above 255) is scaled by 255/65535 and float greyscale in [0, 1] (``F``) by 255 first: Pillow's
  ``convert`` would clip them to 255 and give a white image.
* **EXIF orientation is not applied, anywhere**: the pixels are used as the file stores them. InternVL's own
  loader (the model card's ``load_image``, which serves the released models and the folders converted here)
  does ``Image.open(path).convert('RGB')`` without ``ImageOps.exif_transpose``; honouring the tag here would
  make a model fine-tuned here see other pixels than it is served with. The header-only sizes (the length
  pass, ``check_dataset``) then agree with the decoded ones too. A photo whose camera only tagged it as rotated
  is seen as stored (sideways): rotate such files once before use if it matters (``exiftran -ai``, or
  ``ImageOps.exif_transpose`` and save).
* **An image of several frames** (an animated GIF, PNG or WebP; a TIFF of several pages) is its first frame, as
  InternVL's loader reads it. :func:`frame_note` says so where a person reads it (``check_dataset``'s
  ``animated_image`` notes, ``chat``'s images); a sample whose frames matter is a ``"video"`` (a GIF is read as one).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import time
import unicodedata
import warnings
from typing import Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SampleError

#: Pillow's own decompression-bomb threshold (pixels); images above it are refused by default.
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
#: the limit where a caller of :func:`load_image` / :func:`read_image_size` gives none, and the setting that raises
#: it: Pillow's and the data set's ``max_image_pixels``, or what a tool was given (:func:`max_image_pixels_within`)
_PROCESS_LIMIT = {'pixels': DEFAULT_MAX_IMAGE_PIXELS, 'setting': 'max_image_pixels'}
_UNSET = object()


@contextlib.contextmanager
def max_image_pixels_within(pixels: Optional[int], setting: str):
    """Within, the limit of images where a caller gives none (None: none), and the setting that raises it in
    messages: chat's and eval's ``--max-image-pixels``, over their run. Their images were refused past Pillow's
    limit, told to 'raise max_image_pixels', a data set's setting these tools do not have."""
    before = dict(_PROCESS_LIMIT)
    _PROCESS_LIMIT.update(pixels=pixels, setting=setting)
    try:
        yield
    finally:
        _PROCESS_LIMIT.update(before)


def _pixel_limit(max_pixels) -> Tuple[Optional[int], str]:
    if max_pixels is _UNSET:
        return _PROCESS_LIMIT['pixels'], _PROCESS_LIMIT['setting']
    return max_pixels, 'max_image_pixels'

#: What :func:`load_image` takes: a file's path, its bytes, or an image already open (only converted).
ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]


def _shown(path: str, most: int = 80) -> str:
    """``path`` for a message: ``repr`` (NUL bytes and surrogates escaped), shortened when long."""
    return repr(path) if len(path) <= most else f'{path[:most]!r}... ({len(path)} characters)'


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf('/', name))
    except (OSError, ValueError, AttributeError):  # not POSIX, or no such limit
        return default


def check_path_string(path: str) -> None:
    """Refuse a path no file can have (``bad_image_path``): a NUL byte, a character the file system's encoding
    cannot hold, a name part or the whole path over the system's limits. Without this the first ``os`` call
    raises ``ValueError`` ("embedded null byte") or ``UnicodeEncodeError`` outside any sample's accounting."""
    if '\0' in path:
        raise SampleError('bad_image_path', f'image path {_shown(path)} contains a NUL byte; no file can have it')
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise SampleError('bad_image_path', f'image path {_shown(path)} has character {path[exc.start]!r} at '
                                            f'{exc.start}, which the file system\'s encoding cannot hold '
                                            f'({exc.reason})') from None
    name_max, path_max = _limit('PC_NAME_MAX', 255), _limit('PC_PATH_MAX', 4096)
    longest = max(raw.split(os.fsencode(os.sep)), key=len)
    if len(longest) > name_max:
        raise SampleError('bad_image_path', f'image path {_shown(path)} has a {len(longest)}-byte name part, over '
                                            f'the system\'s limit of {name_max} bytes')
    if len(raw) >= path_max:
        raise SampleError('bad_image_path', f'image path {_shown(path)} is {len(raw)} bytes long, over the '
                                            f'system\'s limit of {path_max - 1} bytes')


_URL = re.compile(r'[A-Za-z][A-Za-z0-9+.-]+://')  # http://, https://, s3:// (InternVL's Ceph paths)


def resolve_image_path(path: str, image_folder: Optional[str], base_dir: Optional[str] = None,
                       allow_links_outside: bool = False) -> str:
    """Turn a sample's image path into a file path, refusing paths that escape ``image_folder``.

    Args:
        path: the path as written in the sample.
        image_folder: the folder the sample's images live in. When given, the path must stay inside it: as
            written (``../``) and as resolved (a symbolic link inside the folder to a file or folder outside
            it), unless ``allow_links_outside`` (for data linked in on purpose). The folder itself may be a link.
        base_dir: where relative paths resolve when there is no ``image_folder`` (the annotation file's
            folder); they may not leave it as written (``../``). An absolute path is then read as written, as
            InternVL and LLaVA read it: an image folder (``image_folders``, a meta file's ``root``) confines those.

    Raises:
        SampleError: ``bad_image_field``, ``bad_image_path`` (also for the joined path) or ``unsafe_image_path``.
    """
    if not isinstance(path, str) or not path:
        raise SampleError('bad_image_field', f'image path must be a non-empty string, got {path!r}')
    if path[:5].lower() == 'data:':   # was 'a 401-byte name part, over the system's limit': it is no path at all
        raise SampleError('bad_image_path', f'image {_shown(path, 40)} is a data URL: a sample names its images by '
                                            'their files (inside the image folder); write the image to a file')
    if _URL.match(path):   # was 'not found: FOLDER/https:/host/x.jpg', counted as missing: nothing here fetches
        raise SampleError('bad_image_path', f'image {_shown(path, 80)} is a URL: images are read from files only; '
                                            f'download them and name the files (inside the image folder)')
    check_path_string(path)
    if image_folder is None:
        full = os.path.normpath(os.path.join(base_dir or '', path))
        check_path_string(full)
        root = os.path.normpath(os.path.abspath(base_dir or '.'))
        if not os.path.isabs(path) and os.path.commonpath([root, os.path.abspath(full)]) != root:
            raise SampleError('unsafe_image_path',   # was read as it was (docs/data.md: "may not leave it")
                              f'path {path!r} leaves the annotation file\'s folder {root!r} (resolves to '
                              f'{os.path.abspath(full)}), against which relative paths resolve when no image '
                              f'folder is set: set the file\'s image folder (image_folders, a meta file\'s root, '
                              f'--image-folder) to the folder that holds it, or write the path in full')
        return full
    root = os.path.normpath(os.path.abspath(image_folder))
    full = os.path.normpath(os.path.join(root, path))
    check_path_string(full)
    if os.path.commonpath([root, full]) != root:
        raise SampleError('unsafe_image_path',
                          f'image path {path!r} escapes its image folder {image_folder!r} (resolves to {full})')
    if not allow_links_outside:
        refuse_link_outside(full, image_folder, f'image path {path!r}')
    return full


REAL_DIR_TTL_S = 5.0  # how long a folder's resolved path is reused (samples share a few folders)
_real_dirs: Dict[str, Tuple[float, str]] = {}


def _real_dir(folder: str) -> str:
    """``os.path.realpath(folder)``, reused for :data:`REAL_DIR_TTL_S` seconds: resolving every component of
    every sample's path (an ``lstat`` each) was a tenth of the start-up check."""
    now = time.monotonic()
    hit = _real_dirs.get(folder)
    if hit is not None and now - hit[0] < REAL_DIR_TTL_S:
        return hit[1]
    if len(_real_dirs) >= 4096:
        _real_dirs.clear()
    real = os.path.realpath(folder)
    _real_dirs[folder] = (now, real)
    return real


def real_path(full: str) -> str:
    """``os.path.realpath(full)``: for a normalised absolute path, its folder's (:func:`_real_dir`) and one
    ``lstat`` of its last part (resolved when it is a link)."""
    if not os.path.isabs(full) or os.path.normpath(full) != full:
        return os.path.realpath(full)
    folder, name = os.path.split(full)
    path = os.path.join(_real_dir(folder), name)
    return os.path.realpath(path) if name and os.path.islink(path) else path


def refuse_link_outside(full: str, image_folder: str, what: str) -> None:
    """``unsafe_image_path`` when ``full`` (a path inside ``image_folder``) resolves, through symbolic links, to a
    file outside it; ``what`` names it in the message, the error's ``link`` holds ``(full, where it resolved)``."""
    real_root, real = _real_dir(image_folder), real_path(full)
    if os.path.commonpath([real_root, real]) != real_root:
        err = SampleError('unsafe_image_path',
                          f'{what} is a symbolic link to {real}, outside its image folder {image_folder!r} (set '
                          f'the data set\'s allow_links_outside=True to allow it)')
        err.link = (full, real)   # a refusal of what the file system holds now: the cached check looks again
        raise err


def why_missing(path: str, what: str) -> str:
    """Why there is no file at ``path``, for a message naming it as ``what``: not found, a folder, a symbolic link
    loop (``ELOOP``), a symbolic link to nothing, or the system's own reason (a permission)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f'{what} is a symbolic link loop (ELOOP): {path}'
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f'{what} is a symbolic link to nothing: {path} -> {os.readlink(path)}'
        if exc.errno != errno.ENOENT:
            return f'{what} cannot be read: {path}: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})'
    else:
        if stat.S_ISDIR(mode):
            return f'{what} expected, found a folder: {path}'
        if not stat.S_ISREG(mode):  # a FIFO, socket, device: never opened (a FIFO blocks)
            return f'{what} is not a regular file (a FIFO, socket or device): {path}'
    return f'{what} not found: {path}{near_miss(path)}'


def near_miss(path: str) -> str:
    """'' or, for a missing path whose near spelling exists, what to write instead: ``\\`` as the folder separator
    (a Windows path), spaces around the name, the name in the other Unicode normal form (macOS writes NFD). One
    ``stat`` a guess, asked only for a path not found. A Windows path that climbs out (``..\\secret\\a.jpg``) gets
    no guess: the annotation's path would be refused as unsafe, and the hint told whether files exist outside."""
    folder, name = os.path.split(path)
    windows = path.replace('\\', '/')
    climbs = windows.split('/').count('..') > path.split('/').count('..')
    guesses = [(windows, 'it separates folders with \\ as Windows does')] if '\\' in path and not climbs else []
    if name.strip() != name:
        guesses.append((os.path.join(folder, name.strip()), 'its name has spaces around it'))
    for form in ('NFC', 'NFD'):
        if unicodedata.normalize(form, path) != path:
            guesses.append((unicodedata.normalize(form, path), f'the file\'s name is in Unicode {form} (macOS writes '
                                                                f'NFD), the annotation\'s is not'))
    for guess, why in guesses:
        if os.path.exists(guess):
            return f' ({why}; {guess!r} exists: write that in the annotation)'
    return ''


def _check_pixels(name: str, size: Tuple[int, int], max_pixels: Optional[int], setting: str) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise SampleError(
            'image_too_large',
            f'{name}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels is over the decompression-bomb limit of '
            f'{max_pixels} pixels (raise {setting} if the image is trusted)')


@contextlib.contextmanager
def _pillow_limit(max_pixels: Optional[int]):
    """Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, a global: it raises at twice it) as
    ``max_pixels`` within: a ``max_image_pixels`` raised past Pillow's default still met Pillow's error at 358M
    pixels, in Pillow's words. None while the header is read, as :func:`_check_pixels` checks its size; the
    setting while the pixels are decoded (a GIF's later frame, a TIFF's page, can be larger)."""
    before = Image.MAX_IMAGE_PIXELS
    if max_pixels == before:
        yield
        return
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


@contextlib.contextmanager
def _open_image(source, max_pixels: Optional[int], action: str, name: Optional[str] = None,
                setting: str = 'max_image_pixels'):
    """``Image.open`` of a path or of a file's bytes, every failure a :class:`SampleError` (``action`` names the
    step; ``name`` the bytes' origin in messages)."""
    if isinstance(source, (bytes, bytearray)):
        name, source = name or f'<{len(source)} bytes>', io.BytesIO(source)
    else:
        if not isinstance(source, (str, os.PathLike)):
            raise SampleError('bad_image_field', f'an image is a path or a file\'s bytes, got {type(source).__name__}')
        source = os.fspath(source)
        if not isinstance(source, str) or not source:
            raise SampleError('bad_image_field', f'image path must be a non-empty string, got {source!r}')
        check_path_string(source)
        name = name or source
        if not os.path.isfile(source):
            raise SampleError('missing_image', why_missing(source, 'image file'))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with _pillow_limit(None):   # the header only: the size is checked next, in this project's words
                img = Image.open(source)
            with img, _pillow_limit(max_pixels):
                _check_pixels(name, img.size, max_pixels, setting)
                yield img
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:   # (a frame of a GIF, a TIFF page, larger than the first)
        raise SampleError('image_too_large', f'{name}: {exc} (the limit is {setting}, {max_pixels}: raise it '
                                             f'if the image is trusted)') from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if _empty(source):
            raise SampleError('corrupt_image', f'{name} is an empty file (0 bytes): a download or copy that did not '
                                               f'finish?') from None
        # (Pillow names bytes by their buffer's repr, '<_io.BytesIO object at 0x7f...>': their size instead)
        said = (str(exc).replace(repr(source), f'of {source.getbuffer().nbytes} bytes')
                if isinstance(source, io.BytesIO) else exc)
        raise SampleError('corrupt_image', f'cannot {action} {name}: {said}') from None


def _empty(source) -> bool:
    """Whether an image that failed to open is 0 bytes (asked only after a failure: no cost on the way in)."""
    try:
        return (source.getbuffer().nbytes if isinstance(source, io.BytesIO) else os.path.getsize(source)) == 0
    except (OSError, TypeError, ValueError):
        return False


def read_image_size(path: Union[str, bytes], max_pixels=_UNSET, name: Optional[str] = None) -> Tuple[int, int]:
    """Return ``(width, height)`` from the file header (or the file's bytes, named ``name``), without decoding the
    pixels (the stored size: no EXIF orientation, as :func:`load_image`). ``max_pixels``: the limit (None: none;
    not given: the process's, :func:`max_image_pixels_within`)."""
    max_pixels, setting = _pixel_limit(max_pixels)
    with _open_image(path, max_pixels, 'read image header of', name, setting) as img:
        return img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules)."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
        arr = np.asarray(img)   # uint16, int32 or float32: converted a band of rows at a time (the whole image in
        # float64 and its temporaries took 2.2 GB for a 172 kB 9400 x 9400 PNG, 6.5 times an 8-bit one's)
        top = float(arr.max()) if arr.size else 0.0
        sixteen = img.mode.startswith('I;16') or (img.mode == 'I' and top > 255.0)
        unit = img.mode == 'F' and top <= 1.0
        out = np.empty(arr.shape, np.uint8)
        for row in range(0, arr.shape[0], 256):
            band = arr[row:row + 256].astype(np.float64)
            if sixteen:
                band = band / 257.0  # 16-bit range: 65535 -> 255
            elif unit:
                band = band * 255.0  # float images in [0, 1]
            out[row:row + 256] = np.clip(np.rint(band), 0, 255).astype(np.uint8)
        img = Image.fromarray(out)  # 2-D uint8 -> mode L
    return img.convert('RGB')


def load_image(source: ImageSource, max_pixels=_UNSET, name: Optional[str] = None) -> Image.Image:
    """The package's one image loader: a file (its path, or its bytes; ``name`` says where the bytes come from in
    messages) decoded fully and returned as RGB by the module's rule (modes converted, EXIF orientation not
    applied). An image already open is only converted by that rule.

    Raises:
        SampleError: ``bad_image_field``, ``bad_image_path``, ``missing_image``, ``corrupt_image`` (unreadable or
            truncated) or ``image_too_large``.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    max_pixels, setting = _pixel_limit(max_pixels)
    with _open_image(source, max_pixels, 'decode image', name, setting) as img:
        img.load()  # raises OSError on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off)
        return to_rgb(img)


def frame_note(source: ImageSource, name: Optional[str] = None) -> str:
    """``NAME: an animated GIF: its first frame is used, ...`` for an image file of several frames or pages, or
    '' (one frame; or the file does not open: :func:`load_image` names that). Opens the header and looks for a
    second frame only (Pillow's ``is_animated``: a GIF's first frame is skipped over, not decoded)."""
    if isinstance(source, Image.Image):
        return ''
    try:
        with _open_image(source, None, 'read image header of', name) as img:
            kind = img.format or 'image'
            if kind == 'MPO' or not getattr(img, 'is_animated', False):   # (MPO: a camera's JPEG and its preview)
                return ''
    except SampleError:
        return ''
    except (OSError, EOFError, SyntaxError, ValueError):   # a second frame that does not parse: no note
        return ''
    shown = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else f'<{len(source)} bytes>')
    if kind == 'TIFF':
        return f'{shown}: a TIFF of several pages: its first page is used, as InternVL\'s loader reads it'
    how = ('convert it to MP4 or GIF and give that as a video (FFmpeg does not decode an animated WebP)'
           if kind == 'WEBP' else 'give it as a video')
    return (f'{shown}: an animated {kind}: its first frame is used, as InternVL\'s loader reads it; for its '
            f'frames, {how}')


def load_image_tiles(path: ImageSource, image_size: int = 448, max_num: int = 12, min_num: int = 1,
                     use_thumbnail: bool = True, dtype=None):
    """InternVL's ``load_image`` for inference: the image's tiles (and thumbnail), normalised with the
    ImageNet mean and std, as a ``[N, 3, S, S]`` tensor (float32 unless ``dtype``)."""
    import torch

    from .tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles, tile_image
    tiles = tile_image(load_image(path), min_num=min_num, max_num=max_num, image_size=image_size,
                       use_thumbnail=use_thumbnail)
    return normalize_tiles(tiles, IMAGENET_MEAN, IMAGENET_STD, dtype=dtype or torch.float32)
