"""Synthetic data for the embedded demo: coloured shapes and digits, with questions only the pixels answer.

Usage::

    from xtuner_plugins.demo.data import make_demo_data, chance_accuracy, read_questions
    paths = make_demo_data('work_dirs/demo/data', seed=0)
    # paths['pretrain'], paths['sft'], paths['test']: .jsonl files; paths['images']: their image folder
    print(paths['counts'])                  # {'pretrain': 600, 'sft': 1800, 'test': 120, 'images': 2520}
    print(chance_accuracy(paths['test']))   # the blind baseline: the most common answer of each kind

or from the shell (prints the same dict as JSON)::

    python -m xtuner_plugins.demo.data work_dirs/demo/data [--seed 0] [--n-sft 1800] ...

What is written (the same bytes for the same arguments)::

    out_dir/images/{pretrain,sft,test}_NNNNN.png   one image per sample, never shared between samples
    out_dir/pretrain.jsonl                          captions ("Describe the image." -> "A red circle on the left.")
    out_dir/sft.jsonl                               questions with a one-word (or one-digit) answer (more turns:
                                                    ``sft_extra_questions``)
    out_dir/test.jsonl                              held-out questions of the same kinds, on new images

Every line is a LLaVA/InternVL sample (``id``, ``image`` relative to ``images/``, ``conversations`` with one
``human`` turn starting ``<image>\\n`` and one ``gpt`` turn) plus two fields the dataset ignores: ``kind`` (the
question kind, ``'caption'`` in pretrain.jsonl) and ``meta`` (the scene: image ``size`` ``[W, H]``, tile
``grid`` ``[cols, rows]`` and its ``objects``, each with a pixel ``box`` ``[x0, y0, x1, y1]``, x1/y1
exclusive, and either ``shape`` + ``colour`` or ``digit`` + ``font_size`` (+ ``small``)).

Question kinds (:data:`ANSWERS`; a few fixed phrasings each, :data:`QUESTIONS`; answers balanced within
each kind, and independent of the image size and of the phrasing, so a model that cannot see gets
:func:`chance_accuracy` at best):

* ``colour``: one shape; its colour (red, green, blue, yellow);
* ``shape``: one shape; circle, square or triangle;
* ``count``: one to three shapes; ``1``, ``2`` or ``3``;
* ``position``: one shape wholly in the left or the right half; ``left`` or ``right``;
* ``digit``: one large black digit; ``0`` .. ``9``;
* ``small_digit``: a large shape and a small black digit in a strip of the most tiles ``max_dynamic_patch``
  allows (at least 4; 1x6 and 6x1 by default); the digit's cell is 9..20 px tall and at least 9 px wide in the
  high-resolution tiles (large digits: 32..46 px tall), but under 2.8 px along the strip in the ``tile_size``
  thumbnail (squashed 6 times by default), so only the tiles show which digit it is. The digit lies inside one
  *token cell* of one tile: the ``token_px`` square (28 px: InternViT's 14 px patches, 2 x 2 of them merged
  into one LLM token by InternVL's pixel shuffle) that becomes a single image token, so the whole digit reaches
  the LLM in one token. Digits are drawn bold. (No grid of at most 6 tiles can shrink an object under 3 px in
  *both* directions while keeping it 8 px in the tiles: that would need 3 x 3 tiles.)

Image sizes follow the project's tiling (:mod:`xtuner_plugins.data.tiling`): every image is made for a
chosen grid of ``cols x rows`` tiles (``cols * rows`` from 1 to ``max_dynamic_patch``, balanced across the
other kinds), about ``tile_size`` px per tile (each side jittered by -15 % .. +20 % while InternVL still picks
that grid), so all tile counts occur and objects are drawn at a known size in tile pixels. Small-digit
strips are exact multiples of ``tile_size`` (the tiles are then the native pixels).

Images of one call are all different (a drawn image equal to an earlier one is drawn again), so the test
images are never training images; all three files come from the same generator with different draws.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xtuner_plugins.data.tiling import candidate_grids, choose_grid

__all__ = [
    'ANSWERS',
    'BACKGROUND',
    'CAPTION_QUESTIONS',
    'COLOURS',
    'KINDS',
    'QUESTIONS',
    'SHAPES',
    'chance_accuracy',
    'make_demo_data',
    'read_questions',
]

COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'green': (20, 160, 40),
    'blue': (30, 60, 220),
    'yellow': (235, 200, 0),
}
SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle')
DIGITS: Tuple[str, ...] = tuple('0123456789')
# Mid grey, near the vision tower's normalisation mean (ImageNet's, x 255: 124, 116, 104), so the background
# normalises to about zero and the objects carry the signal. On white, every patch of a random tiny InternViT
# gives nearly the same feature (the background's), and digits were not learned at all (see the README's demo
# section for the measurement).
BACKGROUND: Tuple[int, int, int] = (128, 128, 128)
INK: Tuple[int, int, int] = (0, 0, 0)

#: The answer vocabulary of each question kind (the order is also the order of :data:`KINDS`).
ANSWERS: Dict[str, Tuple[str, ...]] = {
    'colour': tuple(COLOURS),
    'shape': SHAPES,
    'count': ('1', '2', '3'),
    'position': ('left', 'right'),
    'digit': DIGITS,
    'small_digit': DIGITS,
}
KINDS: Tuple[str, ...] = tuple(ANSWERS)

#: The phrasings of each kind; ``{shape}`` and ``{colour}`` name the scene's (first) shape, never the answer.
QUESTIONS: Dict[str, Tuple[str, ...]] = {
    'colour': ('What colour is the {shape}?', 'What is the colour of the {shape}?',
               'Which colour does the {shape} have?'),
    'shape': ('What shape is in the image?', 'Which shape is shown?', 'What is the {colour} shape?'),
    'count': ('How many shapes are there?', 'How many shapes are in the image?', 'Count the shapes.'),
    'position': ('Is the {shape} on the left or the right?', 'On which side is the {colour} {shape}?',
                 'Where is the {shape}, left or right?'),
    'digit': ('Which digit is shown?', 'What digit is in the image?', 'What number do you see?'),
    'small_digit': ('What is the small digit?', 'Which small digit is in the image?', 'Read the tiny digit.'),
}
CAPTION_QUESTIONS: Tuple[str, ...] = ('Describe the image.', 'What is in the image?', 'Describe the picture briefly.')

SPLITS: Tuple[str, ...] = ('pretrain', 'sft', 'test')

# Object sizes in *tile* pixels for tile_size 56 (scaled by tile_size / 56), i.e. as the vision tower sees them.
_SHAPE_SIDE = (24.0, 40.0)        # the one shape of colour / shape / position scenes, and the small-digit scene's
_COUNT_SIDE = (14.0, 26.0)        # each shape of a count scene
_DIGIT_HEIGHT = (32.0, 46.0)      # a large digit's cell height
_MIN_SIDE = 10.0                  # never shrink a shape below this when it does not fit
_SMALL_MIN_TILE_PX = 9.0          # a small digit's cell is at least this big in the tiles (both directions),
_SMALL_MAX_TILE_HEIGHT = 20.0     # at most this tall (large digits are taller) ...
_SMALL_MAX_THUMB_PX = 2.8         # ... and under this along the strip in the thumbnail
_SMALL_MIN_RATIO = 4              # small digits live in strips of at least this many tiles
_JITTER = (0.85, 1.2)             # image side / (tiles * tile_size)
_MARGIN = 2.0                     # free border and gap between objects, native pixels at tile_size 56
_IMAGE_NAME = re.compile(r'^(pretrain|sft|test)_\d{5}\.png$')


# ---------------------------------------------------------------------------------------------- scenes
@dataclass
class _Object:
    box: Tuple[int, int, int, int]  # native pixels, x1 / y1 exclusive
    shape: Optional[str] = None
    colour: Optional[str] = None
    digit: Optional[str] = None
    font_size: int = 0
    small: bool = False

    def to_json(self) -> dict:
        out: dict = {'box': list(self.box)}
        if self.shape is not None:
            out.update(shape=self.shape, colour=self.colour)
        else:
            out.update(digit=self.digit, font_size=self.font_size)
            if self.small:
                out['small'] = True
        return out


@dataclass
class _Canvas:
    width: int
    height: int
    grid: Tuple[int, int]
    tile_size: int
    token_px: int
    objects: List[_Object] = field(default_factory=list)

    @property
    def k(self) -> float:
        """Size unit: 1 at tile_size 56."""
        return self.tile_size / 56.0

    @property
    def tile_scale(self) -> float:
        """Tile pixels per native pixel along the more shrunk axis (objects are sized by it)."""
        cols, rows = self.grid
        return min(cols * self.tile_size / self.width, rows * self.tile_size / self.height)

    def meta(self, scene: str) -> dict:
        return {'scene': scene, 'size': [self.width, self.height], 'grid': list(self.grid),
                'objects': [o.to_json() for o in self.objects]}


def _balanced(rng: random.Random, values: Sequence, n: int) -> list:
    """``n`` values in random order, each value's count within one of the others'."""
    out: list = []
    while len(out) < n:
        block = list(values)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError('the demo needs Pillow >= 10.1 built with FreeType for ImageFont.load_default(size=...), '
                           f'got {type(font).__name__} from Pillow')
    return font


def _stroke(size: int) -> int:
    """Extra stroke width of a digit drawn at font ``size``: bold digits (Pillow's default font is light; its
    1 px strokes at small sizes are hard to make out for the tiny random vision tower)."""
    return max(1, size // 24)


@functools.lru_cache(maxsize=None)
def _digit_cell(size: int) -> Tuple[int, int, int, int]:
    """Union of the ink boxes of the ten digits drawn at ``(0, 0)``: ``(x0, y0, x1, y1)``, exclusive ends."""
    font = _font(size)
    pad = size
    canvas = Image.new('L', (3 * size, 3 * size), 0)
    draw = ImageDraw.Draw(canvas)
    for d in DIGITS:
        draw.text((pad, pad), d, fill=255, font=font, stroke_width=_stroke(size), stroke_fill=255)
    ys, xs = np.nonzero(np.asarray(canvas))
    return int(xs.min()) - pad, int(ys.min()) - pad, int(xs.max()) + 1 - pad, int(ys.max()) + 1 - pad


def _cell_size(size: int) -> Tuple[int, int]:
    x0, y0, x1, y1 = _digit_cell(size)
    return x1 - x0, y1 - y0


def _font_for_height(height: float) -> int:
    """Smallest font size whose digit cell is at least ``height`` native pixels tall."""
    size = 6
    while _cell_size(size)[1] < height:
        size += 1
    return size


@functools.lru_cache(maxsize=None)
def _small_digit_sizes(grid: Tuple[int, int], tile_size: int, token_px: int) -> Tuple[int, ...]:
    """Font sizes for a small digit in an exact ``grid`` image: 9..20 px in the tiles, < 2.8 px along the strip
    in the thumbnail (for tile_size 56; scaled with it), and small enough for a ``token_px`` token cell less
    its margins."""
    k = tile_size / 56.0
    ratio = max(grid)
    axis = 0 if grid[0] >= grid[1] else 1
    room = token_px - 2 * _MARGIN * k
    sizes = []
    for size in range(6, 4 * tile_size):
        cell = _cell_size(size)
        if (cell[1] > _SMALL_MAX_TILE_HEIGHT * k or cell[axis] / ratio >= _SMALL_MAX_THUMB_PX * k
                or max(cell) > room):
            break
        if min(cell) >= _SMALL_MIN_TILE_PX * k:
            sizes.append(size)
    return tuple(sizes)


def _make_canvas(rng: random.Random, grid: Tuple[int, int], tile_size: int, max_patch: int,
                 jitter: bool, token_px: int) -> _Canvas:
    """An image size for which InternVL's tiling picks ``grid`` (jittered around ``grid * tile_size``)."""
    cols, rows = grid
    if jitter:
        for _ in range(20):
            w = max(1, round(cols * tile_size * rng.uniform(*_JITTER)))
            h = max(1, round(rows * tile_size * rng.uniform(*_JITTER)))
            if choose_grid(w, h, 1, max_patch, tile_size) == grid:
                return _Canvas(w, h, grid, tile_size, token_px)
    w, h = cols * tile_size, rows * tile_size
    if choose_grid(w, h, 1, max_patch, tile_size) != grid:  # cannot happen for candidate grids; be loud anyway
        raise RuntimeError(f'InternVL tiling does not pick grid {grid} for a {w}x{h} image')
    return _Canvas(w, h, grid, tile_size, token_px)


def _free_spot(rng: random.Random, canvas: _Canvas, w: int, h: int,
               region: Optional[Tuple[float, float, float, float]] = None,
               tries: int = 100) -> Optional[Tuple[int, int, int, int]]:
    """A random box of ``w x h`` inside ``region`` (default: the image less a margin), clear of the others."""
    m = _MARGIN * canvas.k
    x_lo, y_lo, x_hi, y_hi = region if region is not None else (m, m, canvas.width - m, canvas.height - m)
    x_max, y_max = math.floor(x_hi - w), math.floor(y_hi - h)
    x_min, y_min = math.ceil(x_lo), math.ceil(y_lo)
    if x_max < x_min or y_max < y_min:
        return None
    for _ in range(tries):
        x, y = rng.randint(x_min, x_max), rng.randint(y_min, y_max)
        box = (x, y, x + w, y + h)
        if all(box[2] + m <= o.box[0] or o.box[2] + m <= box[0] or box[3] + m <= o.box[1] or o.box[3] + m <= box[1]
               for o in canvas.objects):
            return box
    return None


def _add_shape(rng: random.Random, canvas: _Canvas, side_range: Tuple[float, float], shape: str, colour: str,
               region: Optional[Tuple[float, float, float, float]] = None) -> None:
    """Place one shape of a random side (tile pixels), shrinking it if it does not fit."""
    side = rng.uniform(*side_range) * canvas.k / canvas.tile_scale
    floor = _MIN_SIDE * canvas.k / canvas.tile_scale
    while True:
        n = max(1, round(side))
        box = _free_spot(rng, canvas, n, n, region)
        if box is not None:
            canvas.objects.append(_Object(box, shape=shape, colour=colour))
            return
        if side <= floor:
            raise _NoRoom()
        side = max(floor, side * 0.85)


def _add_digit(rng: random.Random, canvas: _Canvas, digit: str, size: int, small: bool = False,
               region: Optional[Tuple[float, float, float, float]] = None) -> None:
    """Place one digit at font ``size`` (shrinking it if it does not fit); its box is the ten digits' cell."""
    while True:
        cw, ch = _cell_size(size)
        box = _free_spot(rng, canvas, cw, ch, region)
        if box is not None:
            canvas.objects.append(_Object(box, digit=digit, font_size=size, small=small))
            return
        if small or size <= 8:
            raise _NoRoom()
        size -= 1


class _NoRoom(Exception):
    """The objects did not fit; the scene is drawn again."""


def _build_scene(rng: random.Random, kind: str, answer: str, canvas: _Canvas) -> None:
    """Fill ``canvas.objects`` so that ``answer`` is the answer to a ``kind`` question about the image."""
    if kind == 'colour':
        _add_shape(rng, canvas, _SHAPE_SIDE, rng.choice(SHAPES), answer)
    elif kind == 'shape':
        _add_shape(rng, canvas, _SHAPE_SIDE, answer, rng.choice(tuple(COLOURS)))
    elif kind == 'count':
        for _ in range(int(answer)):
            _add_shape(rng, canvas, _COUNT_SIDE, rng.choice(SHAPES), rng.choice(tuple(COLOURS)))
    elif kind == 'position':
        m, gap = _MARGIN * canvas.k, 2 * _MARGIN * canvas.k
        half = canvas.width / 2
        region = (m, m, half - gap, canvas.height - m) if answer == 'left' else (
            half + gap, m, canvas.width - m, canvas.height - m)
        _add_shape(rng, canvas, _SHAPE_SIDE, rng.choice(SHAPES), rng.choice(tuple(COLOURS)), region)
    elif kind == 'digit':
        height = rng.uniform(*_DIGIT_HEIGHT) * canvas.k / canvas.tile_scale
        _add_digit(rng, canvas, answer, _font_for_height(height))
    elif kind == 'small_digit':
        # The digit first (it never shrinks), inside one token cell of one tile (small-digit strips are exact
        # multiples of tile_size, so tile pixels are native pixels): a digit cut by a tile seam is not readable
        # in the tiles either, and the demo's 2-layer LLM learns a digit split over several image tokens far more
        # slowly than one inside a single token.
        # One of the three largest sizes the strip allows: still unreadable in the thumbnail, easiest in the tiles.
        # Then a large shape wherever there is room.
        m, cell = _MARGIN * canvas.k, canvas.token_px
        cx, cy = (rng.randrange(canvas.grid[i] * canvas.tile_size // cell) for i in (0, 1))
        region = (cx * cell + m, cy * cell + m, (cx + 1) * cell - m, (cy + 1) * cell - m)
        sizes = _small_digit_sizes(canvas.grid, canvas.tile_size, canvas.token_px)
        _add_digit(rng, canvas, answer, rng.choice(sizes[-3:]), small=True, region=region)
        _add_shape(rng, canvas, _SHAPE_SIDE, rng.choice(SHAPES), rng.choice(tuple(COLOURS)))
    else:
        raise ValueError(f'unknown question kind {kind!r}; known: {", ".join(KINDS)}')


def _draw(canvas: _Canvas) -> Image.Image:
    image = Image.new('RGB', (canvas.width, canvas.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in canvas.objects:
        x0, y0, x1, y1 = o.box
        if o.shape == 'circle':
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[o.colour])
        elif o.shape == 'square':
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[o.colour])
        elif o.shape == 'triangle':
            draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=COLOURS[o.colour])
        else:
            cx0, cy0, _, _ = _digit_cell(o.font_size)
            draw.text((x0 - cx0, y0 - cy0), o.digit, fill=INK, font=_font(o.font_size),
                      stroke_width=_stroke(o.font_size), stroke_fill=INK)
    return image


# ---------------------------------------------------------------------------------------------- text
def _side(o: _Object, width: int) -> str:
    if o.box[2] <= width / 2:
        return 'on the left'
    if o.box[0] >= width / 2:
        return 'on the right'
    return 'in the middle'


def _caption(canvas: _Canvas) -> str:
    shapes = [o for o in canvas.objects if o.shape is not None]
    parts = [f'a {o.colour} {o.shape} {_side(o, canvas.width)}' for o in shapes]
    parts += [f'a small digit {o.digit}' if o.small else f'the digit {o.digit}'
              for o in canvas.objects if o.digit is not None]
    text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
    if len(shapes) > 1:
        text = f'{len(shapes)} shapes: {text}'
    return text[0].upper() + text[1:] + '.'


def _question(rng: random.Random, kind: str, canvas: _Canvas) -> str:
    shape = next((o for o in canvas.objects if o.shape is not None), None)
    template = rng.choice(QUESTIONS[kind])
    return template.format(shape=shape.shape if shape else '', colour=shape.colour if shape else '')


def _extra_answers(kind: str, canvas: _Canvas) -> List[Tuple[str, str]]:
    """``(kind, answer)`` of the other questions the scene's one shape answers: shape, colour, side."""
    if kind not in ('colour', 'shape', 'position', 'small_digit'):
        return []
    shape = next(o for o in canvas.objects if o.shape is not None)
    out = [('shape', shape.shape), ('colour', shape.colour)]
    side = _side(shape, canvas.width)
    if side != 'in the middle':
        out.append(('position', side.split()[-1]))
    return [(k, a) for k, a in out if k != kind]


# ---------------------------------------------------------------------------------------------- files
def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
    return value


def make_demo_data(out_dir: str, n_pretrain: int = 600, n_sft: int = 1800, n_test: int = 120, seed: int = 0,
                   tile_size: int = 56, max_dynamic_patch: int = 6,
                   kinds: Sequence[str] = KINDS, sft_weights: Optional[Dict[str, int]] = None,
                   sft_extra_questions: bool = False, token_px: int = 28) -> Dict[str, object]:
    """Write the demo's images and its pretrain / sft / test files (deterministic for the arguments).

    Args:
        out_dir: output folder (created); ``images/`` and the three ``.jsonl`` files go inside. Images of an
            earlier call (``{pretrain,sft,test}_NNNNN.png``) that this call does not write are removed; other
            files are left alone.
        n_pretrain: caption samples (scenes of all ``kinds``).
        n_sft: question samples for fine-tuning, kinds and answers balanced.
        n_test: held-out question samples, kinds and answers balanced.
        seed: the random seed; each split has its own stream, and no image is drawn twice.
        tile_size: InternVL's tile side in pixels (the dataset's ``image_size``); sizes scale with it.
        max_dynamic_patch: the dataset's tile limit; grids of 1..max_dynamic_patch tiles all occur.
        kinds: question kinds to use (default :data:`KINDS`); ``'small_digit'`` needs max_dynamic_patch >= 4.
        sft_weights: relative number of sft.jsonl scenes per kind (positive integers, 1 for a kind not
            named), e.g. ``{'digit': 2}`` for twice as many digit scenes; the test split stays balanced.
        sft_extra_questions: in sft.jsonl, after the scene's own question, also ask what else its one shape
            shows: its shape, its colour and, when it lies wholly in one half, its side (colour / shape /
            position / small-digit scenes; count and digit scenes have none), each only when the
            conversation has not said its answer yet. The first gpt turn stays the answer of the ``kind``.
        token_px: side, in tile pixels, of the square one image token covers (``patch_size /
            downsample_ratio``: 28 for InternViT's 14 px patches and InternVL's pixel shuffle of 0.5); a small
            digit lies inside one such cell. ``tile_size`` must be a multiple of it.

    Returns:
        ``{'pretrain': path, 'sft': path, 'test': path, 'images': folder, 'counts': {'pretrain': n,
        'sft': n, 'test': n, 'images': n}}``, the paths absolute.

    Raises:
        ValueError: for negative counts, an unknown kind, ``tile_size`` < 28 or ``max_dynamic_patch`` < 1,
            a ``tile_size`` that is not a multiple of ``token_px``, or ``small_digit`` with no strip of >= 4
            tiles allowed (or no small digit size that fits a token cell).
    """
    counts = {name: _check_count(f'n_{name}', n) for name, n in zip(SPLITS, (n_pretrain, n_sft, n_test))}
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 28:
        raise ValueError(f'tile_size must be an integer >= 28, got {tile_size!r}')
    if isinstance(token_px, bool) or not isinstance(token_px, int) or token_px < 1 or tile_size % token_px:
        raise ValueError(f'token_px must be a positive integer dividing tile_size={tile_size}, got {token_px!r}')
    if isinstance(max_dynamic_patch, bool) or not isinstance(max_dynamic_patch, int) or max_dynamic_patch < 1:
        raise ValueError(f'max_dynamic_patch must be a positive integer, got {max_dynamic_patch!r}')
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in ANSWERS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f'kinds must be distinct names among {", ".join(KINDS)}, got {list(kinds)!r}')
    weights = dict(sft_weights or {})
    bad = {k: w for k, w in weights.items()
           if k not in kinds or isinstance(w, bool) or not isinstance(w, int) or w < 1}
    if bad:
        raise ValueError(f'sft_weights must map kinds among {", ".join(kinds)} to positive integers, got {bad!r}')
    grids = candidate_grids(1, max_dynamic_patch)
    strips = [g for g in grids if max(g) >= _SMALL_MIN_RATIO and _small_digit_sizes(g, tile_size, token_px)]
    # only the longest strips: the more the thumbnail squashes a strip, the larger a digit it cannot show
    longest = max((max(g) for g in strips), default=0)
    strips = [g for g in strips if max(g) == longest]
    if 'small_digit' in kinds and not strips:
        if any(max(g) >= _SMALL_MIN_RATIO for g in grids):
            raise ValueError(f'small_digit questions need a digit that fits a token cell of token_px={token_px} px '
                             f'at tile_size={tile_size}, and none does; drop the kind or use a larger token_px')
        raise ValueError(f'small_digit questions need strips of >= {_SMALL_MIN_RATIO} tiles, but '
                         f'max_dynamic_patch={max_dynamic_patch}; drop the kind or allow more tiles')
    by_tiles: Dict[int, List[Tuple[int, int]]] = defaultdict(list)
    for g in grids:
        by_tiles[g[0] * g[1]].append(g)

    out_dir = os.path.abspath(out_dir)
    image_dir = os.path.join(out_dir, 'images')
    os.makedirs(image_dir, exist_ok=True)
    written = set()
    seen_pixels = set()
    result: Dict[str, object] = {'images': image_dir}
    for split in SPLITS:
        rng = random.Random(f'xtuner_plugins.demo:{seed}:{split}')
        n = counts[split]
        weighted = [k for k in kinds for _ in range(weights.get(k, 1) if split == 'sft' else 1)]
        job_kinds = _balanced(rng, weighted, n)
        answers: List[str] = [''] * n
        for kind in kinds:
            idx = [i for i, k in enumerate(job_kinds) if k == kind]
            for i, a in zip(idx, _balanced(rng, ANSWERS[kind], len(idx))):
                answers[i] = a
        tiled = [i for i, k in enumerate(job_kinds) if k != 'small_digit']
        tiles = {i: t for i, t in zip(tiled, _balanced(rng, sorted(by_tiles), len(tiled)))}

        lines = []
        for i, (kind, answer) in enumerate(zip(job_kinds, answers)):
            for _ in range(100):
                if kind == 'small_digit':
                    canvas = _make_canvas(rng, rng.choice(strips), tile_size, max_dynamic_patch, jitter=False,
                                          token_px=token_px)
                else:
                    canvas = _make_canvas(rng, rng.choice(by_tiles[tiles[i]]), tile_size, max_dynamic_patch,
                                          jitter=True, token_px=token_px)
                try:
                    _build_scene(rng, kind, answer, canvas)
                except _NoRoom:
                    continue
                image = _draw(canvas)
                key = hashlib.blake2b(f'{image.size}'.encode() + image.tobytes(), digest_size=16).digest()
                if key not in seen_pixels:
                    seen_pixels.add(key)
                    break
            else:
                raise RuntimeError(f'could not draw a new {kind} image for {split} sample {i} in 100 tries')
            name = f'{split}_{i:05d}.png'
            image.save(os.path.join(image_dir, name), format='PNG', compress_level=6)
            written.add(name)
            if split == 'pretrain':
                question, reply, record_kind = rng.choice(CAPTION_QUESTIONS), _caption(canvas), 'caption'
            else:
                question, reply, record_kind = _question(rng, kind, canvas), answer, kind
            turns = [{'from': 'human', 'value': '<image>\n' + question}, {'from': 'gpt', 'value': reply}]
            if split == 'sft' and sft_extra_questions:
                for extra_kind, extra_answer in _extra_answers(kind, canvas):
                    # never ask what the conversation already said (a colour question names the shape, ...)
                    said = set(re.findall(r'[a-z0-9]+', ' '.join(t['value'] for t in turns).lower()))
                    if extra_answer not in said:
                        turns += [{'from': 'human', 'value': _question(rng, extra_kind, canvas)},
                                  {'from': 'gpt', 'value': extra_answer}]
            lines.append(json.dumps({'id': f'{split}_{i:05d}', 'image': name, 'conversations': turns,
                                     'kind': record_kind, 'meta': canvas.meta(kind)}) + '\n')
        path = os.path.join(out_dir, f'{split}.jsonl')
        with open(path, 'w', encoding='utf-8', newline='\n') as f:
            f.writelines(lines)
        result[split] = path

    for name in os.listdir(image_dir):
        if _IMAGE_NAME.match(name) and name not in written:
            os.remove(os.path.join(image_dir, name))
    result['counts'] = dict(counts, images=len(written))
    return result


# ---------------------------------------------------------------------------------------------- reading back
def read_questions(path: str) -> List[Dict[str, str]]:
    """The questions of a demo file: ``[{'id', 'image', 'kind', 'question', 'answer'}, ...]``.

    ``question`` is the human turn without its ``<image>\\n`` tag; ``answer`` is the gpt turn.

    Raises:
        ValueError: naming ``FILE:LINE`` for a line that is not a single-turn demo sample with a ``kind``.
    """
    out = []
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f'{path}:{line_no}'
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f'{where}: not JSON: {err}') from None
            conv = sample.get('conversations') if isinstance(sample, dict) else None
            if (not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(t, dict) for t in conv)
                    or [t.get('from') for t in conv] != ['human', 'gpt']):
                raise ValueError(f'{where}: expected one human turn and one gpt turn')
            if not isinstance(sample.get('kind'), str):
                raise ValueError(f'{where}: no question "kind"')
            question = str(conv[0].get('value', ''))
            if question.startswith('<image>\n'):
                question = question[len('<image>\n'):]
            out.append({'id': str(sample.get('id', '')), 'image': sample.get('image'), 'kind': sample['kind'],
                        'question': question, 'answer': str(conv[1].get('value', ''))})
    return out


def chance_accuracy(test_path: str) -> float:
    """Expected accuracy of a blind model: every question answered with the most common answer of its kind.

    ``sum over kinds of (count of that kind's most common answer) / number of questions``; 0.0 for a file
    without questions.

    Raises:
        ValueError: as :func:`read_questions`.
    """
    questions = read_questions(test_path)
    if not questions:
        return 0.0
    per_kind: Dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        per_kind[q['kind']][q['answer']] += 1
    return sum(c.most_common(1)[0][1] for c in per_kind.values()) / len(questions)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Write the demo data (shapes and digits) to OUT_DIR.')
    parser.add_argument('out_dir')
    parser.add_argument('--n-pretrain', type=int, default=600)
    parser.add_argument('--n-sft', type=int, default=1800)
    parser.add_argument('--n-test', type=int, default=120)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--tile-size', type=int, default=56)
    parser.add_argument('--max-dynamic-patch', type=int, default=6)
    args = parser.parse_args(argv)
    result = make_demo_data(args.out_dir, args.n_pretrain, args.n_sft, args.n_test, args.seed, args.tile_size,
                            args.max_dynamic_patch)
    result['chance_accuracy'] = chance_accuracy(result['test']) if args.n_test else None
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
