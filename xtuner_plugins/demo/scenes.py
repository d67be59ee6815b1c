"""The demo's scenes: what an image shows (coloured shapes, digits), where each object goes, and drawing it.

:func:`make_canvas` picks an image size for which InternVL's tiling chooses a given grid; :func:`build_scene`
places the objects that make an answer true for a question kind (:data:`ANSWERS`); :func:`draw_scene` draws
them. Sizes are in tile pixels (as the vision tower sees them) for ``tile_size`` 56 and scale with it. The
questions and captions about a scene are in :mod:`xtuner_plugins.demo.questions`; the files in
:mod:`xtuner_plugins.demo.data`.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xtuner_plugins.data.tile_grid import choose_grid

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
# gives nearly the same feature (the background's), and digits were not learned at all (see docs/demo.md
# for the measurement).
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

# Object sizes in *tile* pixels for tile_size 56 (scaled by tile_size / 56), i.e. as the vision tower sees them.
_SHAPE_SIDE = (24.0, 40.0)        # the one shape of colour / shape / position scenes, and the small-digit scene's
_COUNT_SIDE = (14.0, 26.0)        # each shape of a count scene
_DIGIT_HEIGHT = (32.0, 46.0)      # a large digit's cell height
_MIN_SIDE = 10.0                  # never shrink a shape below this when it does not fit
_SMALL_MIN_TILE_PX = 9.0          # a small digit's cell is at least this big in the tiles (both directions),
_SMALL_MAX_TILE_HEIGHT = 20.0     # at most this tall (large digits are taller) ...
_SMALL_MAX_THUMB_PX = 2.8         # ... and under this along the strip in the thumbnail
SMALL_MIN_RATIO = 4               # small digits live in strips of at least this many tiles
_JITTER = (0.85, 1.2)             # image side / (tiles * tile_size)
_MARGIN = 2.0                     # free border and gap between objects, native pixels at tile_size 56


@dataclass
class SceneObject:
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
class Canvas:
    width: int
    height: int
    grid: Tuple[int, int]
    tile_size: int
    token_px: int
    objects: List[SceneObject] = field(default_factory=list)

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
def small_digit_sizes(grid: Tuple[int, int], tile_size: int, token_px: int) -> Tuple[int, ...]:
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


def make_canvas(rng: random.Random, grid: Tuple[int, int], tile_size: int, max_patch: int,
                 jitter: bool, token_px: int) -> Canvas:
    """An image size for which InternVL's tiling picks ``grid`` (jittered around ``grid * tile_size``)."""
    cols, rows = grid
    if jitter:
        for _ in range(20):
            w = max(1, round(cols * tile_size * rng.uniform(*_JITTER)))
            h = max(1, round(rows * tile_size * rng.uniform(*_JITTER)))
            if choose_grid(w, h, 1, max_patch, tile_size) == grid:
                return Canvas(w, h, grid, tile_size, token_px)
    w, h = cols * tile_size, rows * tile_size
    if choose_grid(w, h, 1, max_patch, tile_size) != grid:  # cannot happen for candidate grids; be loud anyway
        raise RuntimeError(f'InternVL tiling does not pick grid {grid} for a {w}x{h} image')
    return Canvas(w, h, grid, tile_size, token_px)


def _free_spot(rng: random.Random, canvas: Canvas, w: int, h: int,
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


def _add_shape(rng: random.Random, canvas: Canvas, side_range: Tuple[float, float], shape: str, colour: str,
               region: Optional[Tuple[float, float, float, float]] = None) -> None:
    """Place one shape of a random side (tile pixels), shrinking it if it does not fit."""
    side = rng.uniform(*side_range) * canvas.k / canvas.tile_scale
    floor = _MIN_SIDE * canvas.k / canvas.tile_scale
    while True:
        n = max(1, round(side))
        box = _free_spot(rng, canvas, n, n, region)
        if box is not None:
            canvas.objects.append(SceneObject(box, shape=shape, colour=colour))
            return
        if side <= floor:
            raise NoRoom()
        side = max(floor, side * 0.85)


def _add_digit(rng: random.Random, canvas: Canvas, digit: str, size: int, small: bool = False,
               region: Optional[Tuple[float, float, float, float]] = None) -> None:
    """Place one digit at font ``size`` (shrinking it if it does not fit); its box is the ten digits' cell."""
    while True:
        cw, ch = _cell_size(size)
        box = _free_spot(rng, canvas, cw, ch, region)
        if box is not None:
            canvas.objects.append(SceneObject(box, digit=digit, font_size=size, small=small))
            return
        if small or size <= 8:
            raise NoRoom()
        size -= 1


class NoRoom(Exception):
    """The objects did not fit; the scene is drawn again."""


def build_scene(rng: random.Random, kind: str, answer: str, canvas: Canvas) -> None:
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
        sizes = small_digit_sizes(canvas.grid, canvas.tile_size, canvas.token_px)
        _add_digit(rng, canvas, answer, rng.choice(sizes[-3:]), small=True, region=region)
        _add_shape(rng, canvas, _SHAPE_SIDE, rng.choice(SHAPES), rng.choice(tuple(COLOURS)))
    else:
        raise ValueError(f'unknown question kind {kind!r}; known: {", ".join(KINDS)}')


def draw_scene(canvas: Canvas) -> Image.Image:
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
