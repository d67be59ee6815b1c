"""Synthetic videos for the demo's video recipe (``--set video=all``): questions that only the order of the frames
answers, so a model that sees one frame is at chance.

Usage::

    from xtuner_plugins.demo.videos import make_video_data
    paths = make_video_data('work_dirs/demo/data', n_sft=3000, n_test=120, seed=0)
    # paths['sft'], paths['test']: .jsonl files ("video": "videos/sft_00000.mp4", relative to paths['images'])

Kinds (:data:`VIDEO_ANSWERS`; answers balanced within each kind):

* ``motion_x``: one shape moves across the frame; ``left`` or ``right``;
* ``motion_y``: one shape moves up or down; ``up`` or ``down``;
* ``first_colour``: two shapes of two colours appear one after the other, both before the middle frame, and stay;
  which colour appeared first (red, green, blue, yellow).

The middle frame does not tell the answer: a moving shape passes a position drawn independently of its direction
at the middle of the video, and by then both shapes of a ``first_colour`` video are there (a single-frame model
answers ``first_colour`` at 1/2 at best, and the motions at 1/2). Each video is ``frames`` frames of ``tile_size``
px on the demo's grey, written as H.264 (``.mp4``, near-lossless) and read back by the data set like any video.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .data import _balanced
from .scenes import BACKGROUND, COLOURS, SHAPES

__all__ = ['VIDEO_ANSWERS', 'VIDEO_KINDS', 'VIDEO_QUESTIONS', 'make_video_data', 'video_chance']

VIDEO_ANSWERS: Dict[str, Tuple[str, ...]] = {
    'motion_x': ('left', 'right'),
    'motion_y': ('up', 'down'),
    'first_colour': tuple(COLOURS),
}
VIDEO_KINDS: Tuple[str, ...] = tuple(VIDEO_ANSWERS)
VIDEO_QUESTIONS: Dict[str, Tuple[str, ...]] = {
    'motion_x': ('Which way does the {shape} move, left or right?', 'Does the {shape} move left or right?'),
    'motion_y': ('Which way does the {shape} move, up or down?', 'Does the {shape} move up or down?'),
    'first_colour': ('Which colour appears first?', 'What colour is the shape that appears first?'),
}


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, box) -> None:
    x0, y0, x1, y1 = box
    if shape == 'circle':
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[colour])
    elif shape == 'square':
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[colour])
    else:
        draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=COLOURS[colour])


def _scene(rng: random.Random, kind: str, answer: str, size: int, frames: int) -> Tuple[List[Image.Image], dict]:
    """The frames of one video and what it shows."""
    side = max(8, size * 2 // 7)
    images = [Image.new('RGB', (size, size), BACKGROUND) for _ in range(frames)]
    draws = [ImageDraw.Draw(im) for im in images]
    if kind in ('motion_x', 'motion_y'):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        travel = size - side  # from one edge to the other over the video
        sign = 1 if answer in ('right', 'down') else -1
        middle = rng.uniform(0.35, 0.65) * travel  # where it is at the middle: independent of the direction
        across = rng.uniform(size * 0.15, size - side - size * 0.15)
        speed = min(middle, travel - middle) * 2 * rng.uniform(0.8, 1.0)  # over the whole video, kept inside
        for t, draw in enumerate(draws):
            along = middle + sign * speed * (t / max(1, frames - 1) - 0.5)
            x, y = (along, across) if kind == 'motion_x' else (across, along)
            _draw(draw, shape, colour, (round(x), round(y), round(x) + side, round(y) + side))
        return images, dict(shape=shape, colour=colour)
    first = answer
    second = rng.choice([c for c in COLOURS if c != first])
    shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
    left = rng.random() < 0.5  # which half the first one takes
    starts = [rng.randrange(0, max(1, frames // 4)), 0]
    starts[1] = rng.randrange(starts[0] + 1, max(starts[0] + 2, frames // 2))  # both there by the middle frame
    y = [rng.randrange(0, size - side), rng.randrange(0, size - side)]
    x = [rng.randrange(0, size // 2 - side + 1), rng.randrange(size // 2, size - side + 1)]
    if not left:
        x = x[::-1]
    for t, draw in enumerate(draws):
        for k, colour in enumerate((first, second)):
            if t >= starts[k]:
                _draw(draw, shapes[k], colour, (x[k], y[k], x[k] + side, y[k] + side))
    return images, dict(shape=shapes[0], colour=first, second=second, starts=starts)


def _write_mp4(path: str, images: Sequence[Image.Image], fps: int = 8) -> None:
    import av
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps)
        stream.width, stream.height = images[0].size
        stream.pix_fmt, stream.options = 'yuv444p', {'qp': '0', 'bf': '0'}
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video_data(out_dir: str, n_sft: int = 3000, n_test: int = 120, seed: int = 0, tile_size: int = 56,
                    frames: int = 8, kinds: Sequence[str] = VIDEO_KINDS) -> Dict[str, object]:
    """Write ``images/videos/{sft,test}_NNNNN.mp4`` and ``sft.jsonl`` / ``test.jsonl`` (video questions) under
    ``out_dir`` (the same bytes for the same arguments); returns the paths and the counts."""
    kinds = tuple(kinds)
    if not kinds or any(k not in VIDEO_ANSWERS for k in kinds):
        raise ValueError(f'video kinds must be among {", ".join(VIDEO_KINDS)}, got {list(kinds)!r}')
    if frames < 4:
        raise ValueError(f'the video questions need at least 4 frames, got {frames}')
    out_dir = os.path.abspath(out_dir)
    video_dir = os.path.join(out_dir, 'images', 'videos')
    os.makedirs(video_dir, exist_ok=True)
    result: Dict[str, object] = {'images': os.path.join(out_dir, 'images')}
    for split, n in (('sft', n_sft), ('test', n_test)):
        rng = random.Random(f'xtuner_plugins.demo.videos:{seed}:{split}')
        job_kinds = _balanced(rng, kinds, n)
        answers = [''] * n
        for kind in kinds:
            idx = [i for i, k in enumerate(job_kinds) if k == kind]
            for i, a in zip(idx, _balanced(rng, VIDEO_ANSWERS[kind], len(idx))):
                answers[i] = a
        lines = []
        for i, (kind, answer) in enumerate(zip(job_kinds, answers)):
            images, meta = _scene(rng, kind, answer, tile_size, frames)
            name = f'videos/{split}_{i:05d}.mp4'
            _write_mp4(os.path.join(out_dir, 'images', name), images)
            question = rng.choice(VIDEO_QUESTIONS[kind]).format(shape=meta['shape'])
            lines.append(json.dumps({'id': f'{split}_{i:05d}', 'video': name, 'kind': kind, 'meta': meta,
                                     'conversations': [{'from': 'human', 'value': '<video>\n' + question},
                                                       {'from': 'gpt', 'value': answer}]}) + '\n')
        path = os.path.join(out_dir, f'{split}.jsonl')
        with open(path, 'w', encoding='utf-8', newline='\n') as f:
            f.writelines(lines)
        result[split] = path
    result['counts'] = dict(sft=n_sft, test=n_test)
    return result


def video_chance(kinds: Sequence[str] = VIDEO_KINDS) -> float:
    """What a model that sees the middle frame alone can reach at best, over balanced kinds: 1/2 for the motions
    (the middle frame does not tell the direction) and 1/2 for the first colour (two colours are there)."""
    return 0.5 if kinds else 0.0
