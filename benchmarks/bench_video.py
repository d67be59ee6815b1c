"""Throughput of the video data path: seeking to the sampled frames versus decoding every frame.

Run from the repository root::

    .venv/bin/python benchmarks/bench_video.py [--seconds 60] [--fps 30] [--size 640x360] [--videos 4] [--repeat 3]

It writes ``--videos`` H.264 ``.mp4`` files of ``--seconds`` s (a moving gradient with a moving square, x264's
default keyframe interval, 250 frames) into a temporary directory, and times per sample, on the same files and the same frames:

(a) ours, the training path: ``probe_video`` (headers), InternVL's ``rand`` sampling of N frames (N in [8, 32]
    drawn per sample as the data set draws it), ``read_frames`` (seeking to the keyframe before each frame, decoding
    on when the next one is near), then one 448 px tile per frame (``image_tiles``, uint8);
(b) decoding every frame of the file to RGB, then keeping the same N frames and tiling them alike (what a reader
    without seeking does: the whole video through the decoder for every sample).

The two must give the same tiles (checked on the first pass). One warm-up pass, then ``--repeat`` timed passes; the
best counts. FFmpeg decodes on one thread (as the data set's workers do). The last line printed is
``speedup vs decoding every frame: X.XX``.

``--step``: the video path's share of a training step instead. The same videos as samples of an ``InternVLDataset``
(``--frames`` frames each, ``rand``, one tile per frame at the tiny InternViT's tile size, the project's tiny
tokenizer), and the tiny InternViT + LLM of ``bench_train.py`` trained as it trains them (full fine-tuning: projector +
LLM, the tower frozen; ``train_loop.run``: one untimed warm-up step, then ``--steps`` timed steps of ``--batch``
samples drawn at random, loaded in the training process, ``num_workers=0``, so that the data time is the whole loading
cost). Printed: the data set's ``__getitem__`` per sample (decoding, sampling, tiling, tokenising), the same items
decoded, sampled and tiled alone (:func:`ours` at that tile size), the training step with and without its data, and
the data's share of the step; the last line is ``video data share of a training step: X.X%``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xtuner_plugins.data.tiling import image_tiles  # noqa: E402
from xtuner_plugins.data.frame_sampling import draw_num_frames, frame_rng  # noqa: E402
from xtuner_plugins.data.video import choose_frames, probe_video, read_frames  # noqa: E402


def make_video(path: str, seconds: float, fps: int, size, seed: int) -> str:
    import av
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2).astype(np.uint8)
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
        for i in range(int(seconds * fps)):
            data = np.roll(base, 4 * i + seed, axis=1)
            x, y = (7 * i) % (w - 40), (3 * i) % (h - 40)
            data[y:y + 40, x:x + 40] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(data, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ours(path: str, key: int) -> torch.Tensor:
    info = probe_video(path)
    n = draw_num_frames(8, 32, 0, 0, key)
    frames = read_frames(info, choose_frames(info, n, 'rand', frame_rng(0, 0, 0, key)))
    return torch.cat([image_tiles(f, 'resize', image_size=448) for f in frames])


def every_frame(path: str, key: int) -> torch.Tensor:
    import av
    info = probe_video(path)
    n = draw_num_frames(8, 32, 0, 0, key)
    wanted = choose_frames(info, n, 'rand', frame_rng(0, 0, 0, key))
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        decoded = [frame.to_image() for frame in container.decode(stream)]
    return torch.cat([image_tiles(decoded[i], 'resize', image_size=448) for i in wanted])


def timed(fn, paths, repeat: int) -> tuple:
    tiles = 0
    for key, path in enumerate(paths):  # warm-up
        fn(path, key)
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        tiles = sum(fn(path, key).shape[0] for key, path in enumerate(paths))
        best = min(best, time.perf_counter() - start)
    return best, tiles


def step_share(paths, args) -> None:
    """``--step``: see the module docstring."""
    from benchmarks.bench_memory import write_models
    from benchmarks.flops import model_shapes
    from benchmarks.synthetic import TRAINED
    from benchmarks.train_loop import run
    from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
    from xtuner_plugins.models import VisionLanguageModel
    folder = os.path.dirname(paths[0])
    models = write_models(os.path.join(folder, 'models'), False)
    data = os.path.join(folder, 'videos.jsonl')
    with open(data, 'w') as f:
        for i, path in enumerate(paths):
            f.write(json.dumps({'video': os.path.basename(path), 'conversations': [
                {'from': 'human', 'value': '<video>\nWhat moves?'},
                {'from': 'gpt', 'value': ' '.join(['a red square'] * (4 + 3 * i))}]}) + '\n')
    ds = InternVLDataset(data, tokenizer=models['llm'], image_size=models['image_size'], min_num_frame=args.frames,
                         max_num_frame=args.frames, video_sampling='rand', seed=0,
                         cache_dir=os.path.join(folder, 'lengths'))
    size = models['image_size']

    def tiles_only(path, key):  # decode + sample + tile, as ours() but at the model's tile size and frame count
        info = probe_video(path)
        frames = read_frames(info, choose_frames(info, args.frames, 'rand', frame_rng(0, 0, 0, key)))
        return torch.cat([image_tiles(f, 'resize', image_size=size) for f in frames])

    for i in range(len(ds)):  # warm-up
        ds[i]
    t_item = min(_timed_items(ds) for _ in range(args.repeat))
    t_tiles, _ = timed(tiles_only, paths, args.repeat)
    model = VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], **TRAINED,
                                compile_blocks=False).train()
    shapes = model_shapes(model.vision_model.config, model.language_model.config, model.downsample_ratio)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10 ** 6,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=0,
                                         collate_fn=internvl_collate_fn)
    got = run(model, loader, args.steps, 'cpu', shapes)
    step = args.batch / got['samples_per_s']  # seconds a step, its data included
    n = len(paths)
    print(f'{datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}, torch threads {torch.get_num_threads()}')
    print(f'tiny InternViT ({size} px tiles) + tiny LLM, full fine-tuning; {n} videos as samples of {args.frames} '
          f'frames (one tile each), mean {np.mean(ds.length):.0f} tokens; batch {args.batch}, {args.steps} timed '
          f'steps')
    print(f'data set __getitem__:                 {t_item / n * 1000:8.1f} ms a sample')
    print(f'  of which decode + sample + tile:    {t_tiles / n * 1000:8.1f} ms a sample')
    print(f'training step, data loading included: {step * 1000:8.1f} ms ({args.batch} samples)')
    print(f'training step without its data:       {step * (1 - got["data_share"]) * 1000:8.1f} ms')
    print(f'video data share of a training step: {100 * got["data_share"]:.1f}%')


def _timed_items(ds) -> float:
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seconds', type=float, default=60)
    p.add_argument('--fps', type=int, default=30)
    p.add_argument('--size', default='640x360')
    p.add_argument('--videos', type=int, default=4)
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--step', action='store_true', help="the video path's share of a tiny model's training step")
    p.add_argument('--frames', type=int, default=8, help='--step: frames a sample (default 8)')
    p.add_argument('--batch', type=int, default=2, help='--step: samples a step (default 2)')
    p.add_argument('--steps', type=int, default=10, help='--step: timed steps (default 10)')
    args = p.parse_args(argv)
    size = tuple(int(x) for x in args.size.split('x'))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = [make_video(os.path.join(tmp, f'{i}.mp4'), args.seconds, args.fps, size, i) for i in range(args.videos)]
        print(f'{args.videos} videos of {args.seconds:g} s, {args.fps} fps, {size[0]}x{size[1]} written in '
              f'{time.perf_counter() - start:.1f} s ({os.path.getsize(paths[0]) / 1e6:.1f} MB each)', flush=True)
        if args.step:
            step_share(paths, args)
            return 0
        for key, path in enumerate(paths):
            assert torch.equal(ours(path, key), every_frame(path, key)), f'{path}: the two paths disagree'
        t_ours, tiles = timed(ours, paths, args.repeat)
        t_all, _ = timed(every_frame, paths, args.repeat)
    print(f'{datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}')
    print(f'(a) ours, seeking:        {args.videos / t_ours:8.2f} samples/s, {t_ours / args.videos * 1000:8.1f} ms a '
          f'sample ({tiles / args.videos:.1f} frames a sample)')
    print(f'(b) decoding every frame: {args.videos / t_all:8.2f} samples/s, {t_all / args.videos * 1000:8.1f} ms a '
          f'sample')
    print(f'speedup vs decoding every frame: {t_all / t_ours:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
