"""Throughput of image tiling: our training path versus xtuner 0.2.0's InternVL preprocessing.

Run from the repository root::

    .venv/bin/python benchmarks/bench_data.py [--images N] [--repeat R]

It writes N random JPEG images (a colour gradient plus noise) into a temporary directory, all of sizes that
give 12 tiles + 1 thumbnail with ``max_num=12``, and times, on the same files in the same run:

(a) ours, training path: ``load_image(path)`` (the dataset's loader) then ``tile_image(...)`` -> uint8
    ``[13, 3, 448, 448]`` (normalisation happens later, on the accelerator);
(b) ours with normalisation on the CPU: (a) followed by ``normalize_tiles`` -> float32, the same output as (c);
(c) xtuner 0.2.0, ``InternVL_V1_5_Dataset``'s per-image path: ``Image.open(path).convert('RGB')``, its
    ``dynamic_preprocess(image, 1, 12, 448, True)``, its torchvision transform on every tile, ``torch.stack``.

Each path does one warm-up pass over all files (which also checks that (b) and (c) give the same tensor),
then R timed passes; the best pass counts. Torch uses its default number of threads. The last line printed
is ``speedup vs xtuner: X.XX``, images/s of (a) divided by images/s of (c).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtuner_plugins.data.image_io import load_image  # noqa: E402
from xtuner_plugins.data.tiling import (IMAGENET_MEAN, IMAGENET_STD, normalize_tiles,  # noqa: E402
                                        num_tiles, tile_image)

IMAGE_SIZE = 448
MAX_NUM = 12
MIN_NUM = 1
USE_THUMBNAIL = True

# (width, height): all choose a 12-tile grid with max_num=12 (checked in make_images); most are not exact
# multiples of 448, so the resize really resamples, as for real photos.
SIZES: List[Tuple[int, int]] = [
    (1344, 1792), (1792, 1344), (2688, 896), (896, 2688),
    (1200, 1600), (1600, 1200), (1300, 1700), (1700, 1300),
    (2400, 800), (800, 2400), (2900, 1000), (2000, 1480),
]


def make_images(folder: Path, count: int, seed: int = 0) -> List[Path]:
    """Write ``count`` JPEG files (gradient + noise) into ``folder``; return their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        w, h = SIZES[k % len(SIZES)]
        n = num_tiles(w, h, MIN_NUM, MAX_NUM, IMAGE_SIZE, USE_THUMBNAIL)
        if n != MAX_NUM + 1:
            raise RuntimeError(f'size {w}x{h} gives {n} tiles, expected {MAX_NUM + 1}')
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        base = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)),
                         np.broadcast_to((x + y) / 2, (h, w))], axis=-1)
        noise = rng.normal(0.0, 25.0, size=(h, w, 3)).astype(np.float32)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f'img_{k:03d}_{w}x{h}.jpg'
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def build_xtuner_path() -> Callable[[Path], torch.Tensor]:
    """xtuner 0.2.0's per-image preprocessing, as ``InternVL_V1_5_Dataset.prepare_data`` does it."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from xtuner.dataset.internvl_dataset import InternVL_V1_5_Dataset, dynamic_preprocess
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    # xtuner 0.2.0 has no build_transform: InternVL_V1_5_Dataset.__init__ builds `self.transformer` inline
    # (it needs a model checkpoint to construct), with exactly these steps:
    transform = T.Compose([
        T.Lambda(lambda img: img.convert('RGB') if img.mode != 'RGB' else img),
        T.Resize((IMAGE_SIZE, IMAGE_SIZE), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=InternVL_V1_5_Dataset.IMAGENET_MEAN, std=InternVL_V1_5_Dataset.IMAGENET_STD),
    ])

    def run(path: Path) -> torch.Tensor:
        image = Image.open(path).convert('RGB')  # InternVL_V1_5_Dataset.get_image
        images = dynamic_preprocess(image, MIN_NUM, MAX_NUM, IMAGE_SIZE, USE_THUMBNAIL)
        return torch.stack([transform(tile) for tile in images])

    return run


def ours_uint8(path: Path) -> torch.Tensor:
    image = load_image(str(path))  # what InternVLDataset calls: checks, decodes, RGB without a copy
    return tile_image(image, MIN_NUM, MAX_NUM, IMAGE_SIZE, USE_THUMBNAIL)


def ours_normalized(path: Path) -> torch.Tensor:
    return normalize_tiles(ours_uint8(path), IMAGENET_MEAN, IMAGENET_STD)


def time_pass(fn: Callable[[Path], torch.Tensor], paths: List[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=24,
                        help='number of JPEG files to generate and process per pass (default: 24)')
    parser.add_argument('--repeat', type=int, default=3,
                        help='timed passes per path after one warm-up pass; the best counts (default: 3)')
    parser.add_argument('--seed', type=int, default=0, help='random seed for the generated images (default: 0)')
    args = parser.parse_args()
    if args.images < 1 or args.repeat < 1:
        parser.error(f'--images and --repeat must be >= 1, got {args.images} and {args.repeat}')

    xtuner_path = build_xtuner_path()
    paths_by_name = {
        '(a) ours: tile_image -> uint8': ours_uint8,
        '(b) ours: + normalize_tiles (CPU)': ours_normalized,
        '(c) xtuner 0.2.0 InternVL': xtuner_path,
    }

    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        paths = make_images(Path(tmp), args.images, args.seed)
        mb = sum(p.stat().st_size for p in paths) / 2**20

        # Warm-up pass of every path; it also checks that ours (normalised) equals xtuner's output.
        max_diff = 0.0
        for path in paths:
            a = ours_uint8(path)
            b = normalize_tiles(a)
            c = xtuner_path(path)
            assert a.shape == (MAX_NUM + 1, 3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.uint8
            assert b.shape == c.shape, (b.shape, c.shape)
            max_diff = max(max_diff, (b - c).abs().max().item())

        best = {name: float('inf') for name in paths_by_name}
        for _ in range(args.repeat):
            for name, fn in paths_by_name.items():  # interleaved, so drift hits all paths alike
                best[name] = min(best[name], time_pass(fn, paths))

    print(f'images: {args.images} JPEGs ({mb:.1f} MiB), {MAX_NUM} tiles + thumbnail of {IMAGE_SIZE}px each; '
          f'best of {args.repeat} passes after 1 warm-up')
    print(f'torch {torch.__version__}, threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, '
          f'Pillow {Image.__version__}')
    print(f'max |ours normalised - xtuner| over all images: {max_diff:.3g}')
    print(f'{"path":40s} {"images/s":>10s} {"ms/image":>10s}')
    rate = {}
    for name, seconds in best.items():
        rate[name] = args.images / seconds
        print(f'{name:40s} {rate[name]:10.2f} {1000 * seconds / args.images:10.1f}')
    names = list(paths_by_name)
    print(f'speedup vs xtuner: {rate[names[0]] / rate[names[2]]:.2f}')


if __name__ == '__main__':
    main()
