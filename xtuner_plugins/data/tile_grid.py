"""Which grid of tiles an image is cut into, as InternVL 1.5 / 2 / 2.5 choose it, from its size alone: the
candidate grids in InternVL's order (:func:`candidate_grids`), the closest aspect ratio with its tie rule
(:func:`find_closest_aspect_ratio`), the grid of an image (:func:`choose_grid`) and its tile count
(:func:`num_tiles`, which sample lengths take from image headers without decoding pixels); and the limits on a
tile count (:data:`MOST_TILES`, :func:`tiles_problem`). No pixels and no torch here: ``tiling.py`` cuts the tiles.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Sequence, Tuple

__all__ = [
    'Grid',
    'MOST_TILES',
    'tiles_problem',
    'candidate_grids',
    'find_closest_aspect_ratio',
    'choose_grid',
    'num_tiles',
]

Grid = Tuple[int, int]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_counts(min_num: int, max_num: int) -> None:
    """Raise ValueError unless ``1 <= min_num <= max_num`` (both integers)."""
    if not _is_int(min_num) or not _is_int(max_num):
        raise ValueError(
            f'min_num and max_num must be integers, got min_num={min_num!r}, max_num={max_num!r}')
    if min_num < 1:
        raise ValueError(f'min_num must be >= 1, got min_num={min_num}')
    if min_num > max_num:
        raise ValueError(f'min_num must be <= max_num, got min_num={min_num} > max_num={max_num}')


def _check_image_size(image_size: int) -> None:
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(f'image_size must be a positive integer, got image_size={image_size!r}')


#: the most tiles an image may be cut into: 4096 tiles of 64 tokens are 262k tokens, past any LLM's context. The
#: grids of 10**6 took 18.6 s and 2.9 GB to list, each process (a meta file's max_dynamic_patch 10**9: killed for
#: memory without a word)
MOST_TILES = 4096


def tiles_problem(value, what: str) -> Optional[str]:
    """Why ``value`` is no tile count (a whole number from 1 to :data:`MOST_TILES`), naming ``what``; or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MOST_TILES:
        return f'{what}: expected a whole number from 1 to {MOST_TILES} (tiles per image), got {value!r:.40}'
    return None


@functools.lru_cache(maxsize=256)
def _grids(min_num: int, max_num: int) -> Tuple[Grid, ...]:
    if max_num > MOST_TILES:   # (every caller checks its settings first: this is the last guard)
        raise ValueError(tiles_problem(max_num, 'max_num'))
    # The order of grids with the same product decides some exact ties (see find_closest_aspect_ratio),
    # so this reproduces InternVL's construction: a Python set with the same keys added in the same order,
    # then a stable sort on cols * rows. Within one product the order is the
    # set's iteration order, which depends only on the (deterministic, unsalted) hashes of int tuples and
    # on the insertion history, so it is the same as InternVL's on the same Python version. It is NOT
    # sorted by cols: e.g. for (1, 12) the product-4 grids come as (2, 2), (4, 1), (1, 4).
    # InternVL's generator visits every (i, j) up to n for each n (cubic: max_num 600 took 3 s, 6000 would take an
    # hour); a set's order depends only on the order its keys were first added (adding a key it holds changes
    # nothing), so each grid is added here once, where that generator first yields it: the same set, in O(grids).
    grids: set = set()
    for i in range(1, min_num + 1):  # the first n: every pair up to it is new, in the loop's order
        grids.update((i, j) for j in range(1, min(min_num, max_num // i) + 1) if i * j >= min_num)
    for n in range(min_num + 1, max_num + 1):  # then only the pairs holding n: (i, n) for i < n, then (n, j)
        grids.update((i, n) for i in range(1, min(n - 1, max_num // n) + 1) if i * n >= min_num)
        grids.update((n, j) for j in range(1, min(n, max_num // n) + 1) if n * j >= min_num)
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_num: int = 1, max_num: int = 12) -> List[Grid]:
    """All tile grids allowed by the tile-count limits, in InternVL's order.

    Args:
        min_num: smallest allowed number of tiles ``cols * rows`` (>= 1).
        max_num: largest allowed number of tiles (>= min_num).

    Returns:
        Every ``(cols, rows)`` with ``min_num <= cols * rows <= max_num``, without duplicates, sorted by
        ``cols * rows``; grids with the same product keep the iteration order of the Python set InternVL
        builds (this order matters for exact ties).

    Raises:
        ValueError: if not ``1 <= min_num <= max_num``.
    """
    _check_counts(min_num, max_num)
    return list(_grids(int(min_num), int(max_num)))


def find_closest_aspect_ratio(
    aspect_ratio: float,
    grids: Sequence[Grid],
    width: int,
    height: int,
    image_size: int,
) -> Grid:
    """InternVL's grid choice: the grid whose ``cols / rows`` is closest to ``aspect_ratio``.

    Grids are visited in the given order. A strictly smaller difference ``|aspect_ratio - cols / rows|``
    replaces the best grid; an exactly equal difference replaces it only when the image is large enough
    for the new grid, i.e. ``width * height > 0.5 * image_size**2 * cols * rows``. This favours more tiles
    for large images when several grids fit equally well (e.g. (1, 1), (2, 2), (3, 3) for a square image).

    Args:
        aspect_ratio: ``width / height`` of the image (a Python float, as InternVL computes it).
        grids: candidate ``(cols, rows)`` in visiting order, usually :func:`candidate_grids`.
        width: image width in pixels.
        height: image height in pixels.
        image_size: tile side in pixels.

    Returns:
        The chosen ``(cols, rows)``; ``(1, 1)`` if ``grids`` is empty.
    """
    best = (1, 1)
    best_diff = math.inf
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def choose_grid(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
) -> Grid:
    """The tile grid InternVL uses for an image of the given size.

    Args:
        width: image width in pixels (> 0).
        height: image height in pixels (> 0).
        min_num: smallest allowed number of tiles.
        max_num: largest allowed number of tiles.
        image_size: tile side in pixels.

    Returns:
        ``(cols, rows)``: the image is resized to ``(image_size * cols, image_size * rows)`` (width, height).

    Raises:
        ValueError: for a non-positive size, a bad ``image_size`` or not ``1 <= min_num <= max_num``.
    """
    if not _is_int(width) or not _is_int(height) or width < 1 or height < 1:
        raise ValueError(f'image size must be positive integers, got width={width!r}, height={height!r}')
    _check_counts(min_num, max_num)
    _check_image_size(image_size)
    width, height, image_size = int(width), int(height), int(image_size)
    return find_closest_aspect_ratio(
        width / height, _grids(int(min_num), int(max_num)), width, height, image_size)


def num_tiles(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> int:
    """Number of tiles :func:`dynamic_preprocess` returns for an image of this size, without its pixels.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        min_num: smallest allowed number of grid tiles.
        max_num: largest allowed number of grid tiles.
        image_size: tile side in pixels.
        use_thumbnail: whether a thumbnail is appended; it is only when the grid has more than one tile.

    Returns:
        ``cols * rows``, plus 1 for the thumbnail when ``use_thumbnail`` and ``cols * rows > 1``.

    Raises:
        ValueError: as :func:`choose_grid`.
    """
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n
