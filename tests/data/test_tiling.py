"""Tests for xtuner_plugins.data.tiling: grid choice, pixel identity with InternVL, normalisation.

The grid choice is checked against a reference written here from the rule itself (not the module's
helpers), and, when xtuner is installed, also against xtuner's copy of InternVL's functions, which are
read from the installed source file (without importing xtuner, which is slow) and run on a fake image that
only records the resize and crop calls.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from xtuner_plugins.data.tile_grid import candidate_grids, choose_grid, find_closest_aspect_ratio, num_tiles
from xtuner_plugins.data.tiling import (IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, image_tiles, normalize_tiles,
                                        pad_colour, tile_image)

# ---------------------------------------------------------------------------------------------------------
# Independent reference of the rule
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ref_candidates(min_num, max_num):
    """Grids with min_num <= cols*rows <= max_num, in InternVL's order.

    InternVL adds the grids to a Python set while looping n, cols, rows (duplicates included) and then
    sorts stably by cols*rows, so grids of equal product keep the set's iteration order. The loop below
    performs the same insertions in the same order, hence gives the same set order.
    """
    found = set()
    for n in range(min_num, max_num + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    found.add((cols, rows))
    return tuple(sorted(found, key=lambda g: g[0] * g[1]))


def ref_candidates(min_num, max_num):
    return list(_ref_candidates(min_num, max_num))


def ref_choose(width, height, min_num, max_num, image_size):
    """Two-pass reading of the rule: the minimal |aspect - cols/rows| first, then the tie rule.

    Among the grids at the minimal difference, visited in candidate order, the first one is taken, and each
    later one replaces it only if width*height > 0.5 * image_size**2 * cols*rows.
    """
    aspect = width / height
    cands = ref_candidates(min_num, max_num)
    best_diff = min(abs(aspect - c / r) for c, r in cands)
    chosen = None
    for c, r in cands:
        if abs(aspect - c / r) == best_diff:
            if chosen is None or width * height > 0.5 * image_size * image_size * c * r:
                chosen = (c, r)
    return chosen


def ref_tiles(image, cols, rows, image_size, use_thumbnail):
    """uint8 [N, 3, S, S] cut from the test's own resize with numpy slicing."""
    s = image_size
    big = np.asarray(image.resize((s * cols, s * rows)))
    tiles = [big[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
    if use_thumbnail and cols * rows > 1:
        tiles.append(np.asarray(image.resize((s, s))))
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())


def pil_to_chw(tile):
    return torch.from_numpy(np.asarray(tile).transpose(2, 0, 1).copy())


def noise_image(width, height, seed=0, mode='RGB'):
    rng = np.random.default_rng(seed + 7919 * width + 104729 * height)
    channels = {'RGB': 3, 'L': 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


# ---------------------------------------------------------------------------------------------------------
# xtuner's copy of InternVL's functions, executed from its installed source (optional)
# ---------------------------------------------------------------------------------------------------------


def _load_xtuner_functions():
    spec = importlib.util.find_spec('xtuner')  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / 'dataset' / 'internvl_dataset.py'
    if not path.is_file():
        return None
    wanted = {'find_closest_aspect_ratio', 'dynamic_preprocess', 'total_image_token'}
    tree = ast.parse(path.read_text())
    funcs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    if {f.name for f in funcs} != wanted:
        return None
    namespace = {}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), 'exec'), namespace)
    return namespace


XTUNER = _load_xtuner_functions()


class _RecordingImage:
    """Stands in for a PIL image: records resize targets and crop boxes, holds no pixels."""

    def __init__(self, size, log):
        self.size = size
        self.log = log

    def resize(self, size):
        self.log.append(('resize', tuple(size)))
        return _RecordingImage(tuple(size), self.log)

    def crop(self, box):
        self.log.append(('crop', tuple(box)))
        return box


def xtuner_grid_and_boxes(width, height, min_num, max_num, image_size):
    log = []
    XTUNER['dynamic_preprocess'](_RecordingImage((width, height), log), min_num, max_num, image_size, False)
    target_w, target_h = log[0][1]
    boxes = [entry[1] for entry in log[1:]]
    return (target_w // image_size, target_h // image_size), boxes


# ---------------------------------------------------------------------------------------------------------
# Grid choice
# ---------------------------------------------------------------------------------------------------------

SIDES = [1, 2, 13, 27, 28, 29, 100, 224, 447, 448, 449, 500, 640, 633, 634, 896, 1000, 1008, 1024, 1344,
         1792, 2000, 3000, 4000]
EXTREME = [(1, 500), (500, 1), (3000, 10), (10, 3000), (1, 4000), (4000, 1), (4000, 3), (2, 4000)]
_rng = random.Random(1234)
RANDOM_SIZES = [(_rng.randint(1, 5000), _rng.randint(1, 5000)) for _ in range(300)]
SWEEP_SIZES = list(itertools.product(SIDES, SIDES)) + EXTREME + RANDOM_SIZES

COUNT_LIMITS = [(1, 1), (1, 2), (1, 6), (1, 12), (1, 24), (1, 40), (2, 2), (4, 4), (6, 6), (2, 6), (3, 12),
                (6, 12), (10, 40)]


@pytest.mark.parametrize('image_size', [448, 28])
@pytest.mark.parametrize('min_num,max_num', COUNT_LIMITS)
def test_choose_grid_matches_reference_sweep(min_num, max_num, image_size):
    wrong = []
    for w, h in SWEEP_SIZES:
        expected = ref_choose(w, h, min_num, max_num, image_size)
        got = choose_grid(w, h, min_num, max_num, image_size)
        if got != expected:
            wrong.append(((w, h), got, expected))
        if XTUNER is not None and (w + h) % 3 == 0:  # a third of the sweep against xtuner as well
            xt, _ = xtuner_grid_and_boxes(w, h, min_num, max_num, image_size)
            if got != xt:
                wrong.append(((w, h), got, f'xtuner {xt}'))
    assert not wrong, f'{len(wrong)} mismatches, first: {wrong[:5]}'


@pytest.mark.parametrize('min_num,max_num', COUNT_LIMITS)
def test_candidate_grids_match_reference_order(min_num, max_num):
    grids = candidate_grids(min_num, max_num)
    assert grids == ref_candidates(min_num, max_num)
    assert len(set(grids)) == len(grids)
    assert all(min_num <= c * r <= max_num for c, r in grids)


def test_candidate_grids_same_product_order_is_set_order():
    # Not sorted by cols nor by rows within one product: the set order is kept, as in InternVL.
    grids = candidate_grids(1, 12)
    assert [g for g in grids if g[0] * g[1] == 4] == [(2, 2), (4, 1), (1, 4)]
    assert [g for g in grids if g[0] * g[1] == 6] == [(1, 6), (6, 1), (3, 2), (2, 3)]
    assert candidate_grids(4, 4) == [(4, 1), (1, 4), (2, 2)]


# (width, height, min_num, max_num, image_size, expected grid): exact ties, worked out by hand.
TIE_CASES = [
    # aspect 1 ties (1,1), (2,2), (3,3) (same ratio); thresholds 0.5*448^2*p = 401408 (p=4), 903168 (p=9)
    (448, 448, 1, 12, 448, (1, 1)),
    (633, 633, 1, 12, 448, (1, 1)),      # 400689 < 401408
    (634, 634, 1, 12, 448, (2, 2)),      # 401956 > 401408
    (950, 950, 1, 12, 448, (2, 2)),      # 902500 < 903168
    (951, 951, 1, 12, 448, (3, 3)),      # 904401 > 903168
    (1008, 896, 1, 12, 448, (2, 2)),     # 9:8 ties at ratio 1; area 903168 == threshold of (3,3): not '>'
    (1268, 1268, 1, 40, 448, (4, 4)),    # 1607824 > 1605632 (p=16)
    (1267, 1267, 1, 40, 448, (3, 3)),
    # midpoint between two ratios: 1.5 between 1 and 2 (max_num=2), threshold of (2,1) is 200704
    (300, 200, 1, 2, 448, (1, 1)),
    (600, 400, 1, 2, 448, (2, 1)),
    # 0.75 between 0.5 and 1 (max_num=2)
    (300, 400, 1, 2, 448, (1, 1)),
    (450, 600, 1, 2, 448, (1, 2)),
    # 7:8 with max_num=12: |0.875-1| == |0.875-0.75|, ties (1,1), (2,2), (3,3), (3,4) (p=12: 1204224)
    (70, 80, 1, 12, 448, (1, 1)),
    (700, 800, 1, 12, 448, (2, 2)),
    (910, 1040, 1, 12, 448, (3, 3)),
    (1050, 1200, 1, 12, 448, (3, 4)),
    # 7:2 with max_num=12: ties (3,1), (4,1), (6,2)
    (70, 20, 1, 12, 448, (3, 1)),
    (1400, 400, 1, 12, 448, (4, 1)),
    (2100, 600, 1, 12, 448, (6, 2)),
    # same-product ties, where the order inside one product decides (only possible with min_num > 1):
    # min=max=2: candidates (1,2), (2,1); 5:4 is midway between 0.5 and 2. Threshold 200704.
    (5, 4, 2, 2, 448, (1, 2)),           # a landscape image gets a 1x2 portrait grid
    (500, 400, 2, 2, 448, (1, 2)),       # 200000 < 200704
    (505, 404, 2, 2, 448, (2, 1)),       # 204020 > 200704
    (500, 400, 2, 3, 448, (1, 2)),
    # min=max=4: set order (4,1), (1,4), (2,2); 5:2 is midway between 1 and 4 -> (4,1) unless large
    # (sorting by cols would give (2,2) first and so (2,2) for the small image)
    (5, 2, 4, 4, 448, (4, 1)),
    (1000, 400, 4, 4, 448, (4, 1)),      # 400000 <= 401408
    (1100, 440, 4, 4, 448, (2, 2)),      # 484000 > 401408
    # 5:8 is midway between 1/4 and 1: (1,4) before (2,2) (sorting by rows would put (2,2) first)
    (5, 8, 4, 4, 448, (1, 4)),
    (1000, 1600, 4, 4, 448, (2, 2)),
    # min=max=6: order (2,3), (1,6), (3,2), (6,1); 15:4 midway between 1.5 and 6
    (15, 4, 6, 6, 448, (3, 2)),
    (1500, 400, 6, 6, 448, (3, 2)),      # 600000 <= 602112
    (1650, 440, 6, 6, 448, (6, 1)),      # 726000 > 602112
    # tiny tile size with an exact threshold: 36x32 is 9:8, area 1152 == 0.5*24^2*4
    (36, 32, 1, 4, 24, (1, 1)),
    (45, 40, 1, 4, 24, (2, 2)),          # 1800 > 1152
]


def _is_exact_tie(w, h, min_num, max_num):
    aspect = w / h
    diffs = [abs(aspect - c / r) for c, r in ref_candidates(min_num, max_num)]
    return diffs.count(min(diffs)) > 1


@pytest.mark.parametrize('w,h,min_num,max_num,image_size,expected', TIE_CASES)
def test_exact_ties(w, h, min_num, max_num, image_size, expected):
    assert _is_exact_tie(w, h, min_num, max_num), 'the case is meant to be an exact (float) tie'
    assert ref_choose(w, h, min_num, max_num, image_size) == expected  # the hand-worked value
    assert choose_grid(w, h, min_num, max_num, image_size) == expected
    if XTUNER is not None:
        assert xtuner_grid_and_boxes(w, h, min_num, max_num, image_size)[0] == expected


def test_same_product_ties_cannot_happen_with_min_num_1():
    """With min_num=1 the order inside one product never changes the result (max_num up to 40).

    The order of two grids A, B can only matter if both sit at the global minimal difference (a grid
    that is strictly better anywhere decides alone). A and B have the same product, so different ratios,
    so the image's aspect would be their midpoint. Shown here: some candidate ratio lies strictly between
    them, so it is strictly closer to the midpoint, by a margin far larger than float rounding.
    """
    for max_num in range(1, 41):
        grids = ref_candidates(1, max_num)
        ratios = sorted({Fraction(c, r) for c, r in grids})
        by_product = {}
        for c, r in grids:
            by_product.setdefault(c * r, []).append(Fraction(c, r))
        for same in by_product.values():
            for lo, hi in itertools.combinations(sorted(same), 2):
                between = [x for x in ratios if lo < x < hi]
                assert between, (max_num, lo, hi)
                margin = min(min(x - lo, hi - x) for x in between)
                assert margin > Fraction(1, 10**6)


def test_find_closest_aspect_ratio_rule():
    grids = [(1, 1), (2, 2)]
    # equal difference, small image: keep (1,1); large image: take (2,2)
    assert find_closest_aspect_ratio(1.0, grids, 10, 10, 448) == (1, 1)
    assert find_closest_aspect_ratio(1.0, grids, 900, 900, 448) == (2, 2)
    assert find_closest_aspect_ratio(2.5, [], 10, 4, 448) == (1, 1)
    # strictly smaller difference always wins, whatever the area
    assert find_closest_aspect_ratio(1.9, [(1, 1), (2, 1)], 19, 10, 448) == (2, 1)


# ---------------------------------------------------------------------------------------------------------
# Tile counts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('use_thumbnail', [False, True])
@pytest.mark.parametrize('min_num,max_num', [(1, 1), (1, 6), (1, 12), (3, 12), (1, 40)])
def test_num_tiles_matches_dynamic_preprocess(min_num, max_num, use_thumbnail):
    s = 8  # tiny tiles keep the resizes cheap; the grid rule is the same for every tile size
    sides = [1, 3, 8, 9, 16, 25, 40, 64, 100]
    images = {(w, h): Image.new('RGB', (w, h), (10, 20, 30)) for w in sides for h in sides}
    for (w, h), img in images.items():
        n = num_tiles(w, h, min_num, max_num, s, use_thumbnail)
        assert n == len(dynamic_preprocess(img, min_num, max_num, s, use_thumbnail)), (w, h)
        c, r = ref_choose(w, h, min_num, max_num, s)
        assert n == c * r + (1 if use_thumbnail and c * r > 1 else 0)


@pytest.mark.parametrize('use_thumbnail', [False, True])
def test_num_tiles_sweep_formula(use_thumbnail):
    for min_num, max_num in COUNT_LIMITS:
        for w, h in SWEEP_SIZES[::5]:
            c, r = ref_choose(w, h, min_num, max_num, 448)
            expected = c * r + (1 if use_thumbnail and c * r > 1 else 0)
            assert num_tiles(w, h, min_num, max_num, 448, use_thumbnail) == expected, (w, h, min_num, max_num)


# ---------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------

# (width, height, max_num, image_size)
PIXEL_CASES = [
    (1, 1, 12, 28), (13, 7, 12, 28), (28, 28, 12, 28), (29, 57, 12, 28), (100, 37, 12, 28),
    (37, 100, 12, 28), (115, 86, 12, 28), (86, 115, 12, 28), (112, 84, 12, 28), (250, 90, 12, 28),
    (500, 61, 12, 28), (61, 500, 6, 28), (1000, 3, 12, 28), (300, 170, 6, 28), (300, 170, 1, 28),
    (77, 77, 12, 56), (200, 130, 12, 56), (333, 251, 24, 28),
    (1500, 1100, 12, 448), (448, 448, 12, 448), (1000, 700, 6, 448),
]


def test_pixel_cases_cover_one_and_twelve_tiles():
    counts = {num_tiles(w, h, 1, m, s) for w, h, m, s in PIXEL_CASES}
    assert {1, 12} <= counts


@pytest.mark.parametrize('use_thumbnail', [False, True])
@pytest.mark.parametrize('w,h,max_num,image_size', PIXEL_CASES)
def test_tiles_are_pixel_identical(w, h, max_num, image_size, use_thumbnail):
    img = noise_image(w, h)
    cols, rows = ref_choose(w, h, 1, max_num, image_size)
    expected = ref_tiles(img, cols, rows, image_size, use_thumbnail)

    pil_tiles = dynamic_preprocess(img, 1, max_num, image_size, use_thumbnail)
    assert all(t.size == (image_size, image_size) and t.mode == 'RGB' for t in pil_tiles)
    stacked = torch.stack([pil_to_chw(t) for t in pil_tiles])
    assert torch.equal(stacked, expected)

    fast = tile_image(img, 1, max_num, image_size, use_thumbnail)
    assert fast.dtype == torch.uint8 and fast.is_contiguous()
    assert fast.shape == (num_tiles(w, h, 1, max_num, image_size, use_thumbnail), 3, image_size, image_size)
    assert torch.equal(fast, stacked)

    if XTUNER is not None:
        theirs = XTUNER['dynamic_preprocess'](img, 1, max_num, image_size, use_thumbnail)
        assert torch.equal(torch.stack([pil_to_chw(t) for t in theirs]), stacked)


def test_tiles_row_major_order():
    # Each tile of a 3x2 grid is painted one flat colour; the order must be left to right, top to bottom.
    s, cols, rows = 28, 3, 2
    arr = np.zeros((rows * s, cols * s, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            arr[r * s:(r + 1) * s, c * s:(c + 1) * s] = (40 * r + 10 * c, 0, 0)
    img = Image.fromarray(arr)
    assert choose_grid(cols * s, rows * s, 1, 12, s) == (cols, rows)
    tiles = tile_image(img, 1, 12, s)
    assert [int(t[0, 0, 0]) for t in tiles] == [0, 10, 20, 40, 50, 60]
    assert [np.asarray(t)[0, 0, 0] for t in dynamic_preprocess(img, 1, 12, s)] == [0, 10, 20, 40, 50, 60]


def test_dynamic_preprocess_keeps_mode():
    img = noise_image(100, 40, mode='L')  # 2.5: grid (5, 2)
    assert ref_choose(100, 40, 1, 12, 28) == (5, 2)
    tiles = dynamic_preprocess(img, 1, 12, 28, True)
    assert len(tiles) == 11 and all(t.mode == 'L' for t in tiles)
    big = np.asarray(img.resize((28 * 5, 28 * 2)))
    assert np.array_equal(np.asarray(tiles[6]), big[28:, 28:56])
    assert np.array_equal(np.asarray(tiles[10]), np.asarray(img.resize((28, 28))))


def test_tile_image_returns_fresh_memory():
    img = noise_image(60, 60)
    a = tile_image(img, 1, 12, 28, True)
    b = tile_image(img, 1, 12, 28, True)
    a.zero_()  # writable, and not shared with the image or another call
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------

TORCHVISION = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize('w,h,max_num,image_size', [(1, 1, 12, 28), (115, 86, 12, 28), (61, 500, 6, 28),
                                                     (200, 130, 12, 56), (1500, 1100, 12, 448)])
def test_normalize_bit_identical_to_torchvision(w, h, max_num, image_size):
    img = noise_image(w, h, seed=3)
    ours = normalize_tiles(tile_image(img, 1, max_num, image_size, True))
    theirs = torch.stack([TORCHVISION(t) for t in dynamic_preprocess(img, 1, max_num, image_size, True)])
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_normalize_every_byte_value():
    # All 256 values in every channel, in a 16x16 image (one tile, no resampling).
    k = np.arange(256, dtype=np.uint8).reshape(16, 16)
    arr = np.stack([k, 255 - k, (k.astype(np.int64) * 7 % 256).astype(np.uint8)], axis=-1)
    img = Image.fromarray(arr)
    ours = normalize_tiles(tile_image(img, 1, 12, 16))
    theirs = TORCHVISION(img).unsqueeze(0)
    assert torch.equal(ours, theirs)
    custom = normalize_tiles(tile_image(img, 1, 12, 16), mean=(0.5, 0.25, 0.1), std=(0.3, 0.7, 0.9))
    assert torch.equal(custom, T.Normalize((0.5, 0.25, 0.1), (0.3, 0.7, 0.9))(T.ToTensor()(img)).unsqueeze(0))


def test_normalize_dtype_and_device():
    tiles = tile_image(noise_image(115, 86, seed=5), 1, 12, 28, True)
    f32 = normalize_tiles(tiles)
    bf16 = normalize_tiles(tiles, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == tiles.shape
    assert torch.equal(bf16, f32.to(torch.bfloat16))
    assert bf16.device == tiles.device
    # works on any leading shape, including a single tile [3, S, S]
    assert torch.equal(normalize_tiles(tiles[0]), f32[0])
    # the input is left untouched
    assert torch.equal(tiles, tile_image(noise_image(115, 86, seed=5), 1, 12, 28, True))


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_tile_image_rejects_non_rgb(mode):
    img = Image.new(mode, (30, 30))
    with pytest.raises(ValueError, match=f"RGB image, got mode '{mode}'"):
        tile_image(img)


def test_zero_and_negative_sizes():
    with pytest.raises(ValueError, match=r'width=0, height=10'):
        choose_grid(0, 10)
    with pytest.raises(ValueError, match=r'width=10, height=-1'):
        num_tiles(10, -1)
    with pytest.raises(ValueError, match=r'width=0, height=5'):
        tile_image(Image.new('RGB', (0, 5)))
    with pytest.raises(ValueError, match=r'width=5, height=0'):
        dynamic_preprocess(Image.new('RGB', (5, 0)))
    with pytest.raises(ValueError, match=r'image_size=0'):
        choose_grid(10, 10, image_size=0)


def test_bad_tile_counts():
    with pytest.raises(ValueError, match=r'min_num=5 > max_num=3'):
        choose_grid(100, 100, min_num=5, max_num=3)
    with pytest.raises(ValueError, match=r'min_num=13 > max_num=12'):
        tile_image(noise_image(20, 20), min_num=13)
    with pytest.raises(ValueError, match=r'min_num must be >= 1, got min_num=0'):
        candidate_grids(0, 12)
    with pytest.raises(ValueError, match=r'max_num=2.5'):
        num_tiles(10, 10, 1, 2.5)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match='uint8 tiles, got dtype torch.float32'):
        normalize_tiles(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r'tiles shape \(1, 4, 4, 4\) does not match 3 means and 3 stds'):
        normalize_tiles(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match='std must be non-zero'):
        normalize_tiles(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), std=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# Image modes: one resized tile, or padded to a square first (LLaVA)
# ---------------------------------------------------------------------------------------------------------

def expand2square_reference(img, background):
    """LLaVA's expand2square, written from its definition: paste onto a square of the longer side,
    centred along the shorter one with offset (long - short) // 2."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


@pytest.mark.parametrize('size', [(50, 21), (21, 50), (33, 33), (7, 40)])
def test_pad_mode_is_llava_expand2square_then_resize(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mean = (0.48145466, 0.4578275, 0.40821073)
    assert pad_colour(mean) == (122, 116, 104)  # LLaVA's tuple(int(x * 255) for x in image_mean)
    tiles = image_tiles(img, 'pad', image_size=28, max_num=12, use_thumbnail=True, mean=mean)
    ref = np.asarray(expand2square_reference(img, (122, 116, 104)).resize((28, 28))).transpose(2, 0, 1)
    assert tiles.shape == (1, 3, 28, 28) and torch.equal(tiles[0], torch.from_numpy(ref.copy()))
    if size[0] != size[1]:  # the corner lies in the padding
        assert tiles[0, :, 0, 0].tolist() == [122, 116, 104]


def test_resize_mode_is_one_squashed_tile_and_tile_mode_is_tile_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 90, 3), dtype=np.uint8))
    resized = image_tiles(img, 'resize', image_size=28, max_num=12, use_thumbnail=True)
    assert torch.equal(resized[0], torch.from_numpy(np.asarray(img.resize((28, 28))).transpose(2, 0, 1).copy()))
    assert torch.equal(image_tiles(img, 'tile', image_size=28, max_num=6, use_thumbnail=True),
                       tile_image(img, max_num=6, image_size=28, use_thumbnail=True))
    with pytest.raises(ValueError, match="unknown image mode 'crop'"):
        image_tiles(img, 'crop')


def test_pad_mode_matches_transformers_llava_image_processor():
    """The exported LLaVA folder's processor (LlavaImageProcessor, do_pad) sees the same pixels."""
    from transformers import LlavaImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    proc = LlavaImageProcessor(do_pad=True, size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28},
                               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3)
    theirs = proc(images=img, return_tensors='pt')['pixel_values']
    ours = normalize_tiles(image_tiles(img, 'pad', image_size=28, mean=OPENAI_CLIP_MEAN), OPENAI_CLIP_MEAN,
                           OPENAI_CLIP_STD)
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5)


def test_candidate_grids_are_internvls_for_every_small_limit_and_fast_for_a_large_one():
    """InternVL's generator is cubic in max_num (600: 3 s; a max_dynamic_patch typo of 6000 hung the data set for an
    hour): the grids are added once each, where it first yields them, and the set's order is the same."""
    import time
    wrong = [(lo, hi) for lo in range(1, 25) for hi in range(lo, 70)
             if candidate_grids(lo, hi) != ref_candidates(lo, hi)]
    assert not wrong
    start = time.perf_counter()
    grids = candidate_grids(1, 3000)  # the literal construction: ~400 s (3 s at 600, cubic); killed at 90 s here
    assert time.perf_counter() - start < 10 and len(grids) == sum(3000 // c for c in range(1, 3001))
