"""Synthetic data for the embedded demo: coloured shapes and digits, with questions only the pixels answer.

Usage::

    from xtuner_plugins.demo.data import make_demo_data, chance_accuracy, read_questions
    paths = make_demo_data('work_dirs/demo/data', seed=0)
    # paths['pretrain'], paths['sft'], paths['test'], paths['preference']: .jsonl files; paths['images']: their
    # image folder
    print(paths['counts'])  # {'pretrain': 600, 'sft': 1800, 'test': 120, 'preference': 0, 'images': 2520}
    print(chance_accuracy(paths['test']))   # the blind baseline: the most common answer of each kind

or from the shell (prints the same dict as JSON)::

    python -m xtuner_plugins.demo.data work_dirs/demo/data [--seed 0] [--n-sft 1800] ...

What is written (the same bytes for the same arguments)::

    out_dir/images/{pretrain,sft,test,preference}_NNNNN.png   one image per sample, never shared
    out_dir/pretrain.jsonl                          captions ("Describe the image." -> "A red circle on the left.")
    out_dir/sft.jsonl                               questions with a one-word (or one-digit) answer (more turns:
                                                    ``sft_extra_questions``)
    out_dir/test.jsonl                              held-out questions of the same kinds, on new images
    out_dir/preference.jsonl                        prompts for preference pairs (``n_preference``): questions
                                                    as in test.jsonl, on images no other split has

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
images are never training images; all the files come from the same generator with different draws (each split
its own stream: adding preference prompts changes no other split).

This module writes the files; the scenes and their drawing are in :mod:`xtuner_plugins.demo.scenes`, the
questions and captions (and reading a file back) in :mod:`xtuner_plugins.demo.questions`.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from xtuner_plugins.data.tile_grid import candidate_grids

from .questions import (CAPTION_QUESTIONS, QUESTIONS, caption, chance_accuracy, extra_answers, question_text,
                        read_questions)
from .scenes import (ANSWERS, BACKGROUND, COLOURS, KINDS, SHAPES, SMALL_MIN_RATIO, NoRoom, build_scene, draw_scene,
                     make_canvas, small_digit_sizes)

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

SPLITS: Tuple[str, ...] = ('pretrain', 'sft', 'test', 'preference')
_IMAGE_NAME = re.compile(r'^(pretrain|sft|test|preference)_\d{5}\.png$')


def _balanced(rng: random.Random, values: Sequence, n: int) -> list:
    """``n`` values in random order, each value's count within one of the others'."""
    out: list = []
    while len(out) < n:
        block = list(values)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
    return value


def make_demo_data(out_dir: str, n_pretrain: int = 600, n_sft: int = 1800, n_test: int = 120, seed: int = 0,
                   tile_size: int = 56, max_dynamic_patch: int = 6,
                   kinds: Sequence[str] = KINDS, sft_weights: Optional[Dict[str, int]] = None,
                   sft_extra_questions: bool = False, token_px: int = 28,
                   n_preference: int = 0) -> Dict[str, object]:
    """Write the demo's images and its pretrain / sft / test / preference files (deterministic for the
    arguments).

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
        n_preference: question samples, balanced as the test split's, on new images: the prompts the demo's
            preference stage asks the fine-tuned model to build pairs from its own mistakes.

    Returns:
        ``{'pretrain': path, 'sft': path, 'test': path, 'preference': path, 'images': folder, 'counts':
        {'pretrain': n, 'sft': n, 'test': n, 'preference': n, 'images': n}}``, the paths absolute.

    Raises:
        ValueError: for negative counts, an unknown kind, ``tile_size`` < 28 or ``max_dynamic_patch`` < 1,
            a ``tile_size`` that is not a multiple of ``token_px``, or ``small_digit`` with no strip of >= 4
            tiles allowed (or no small digit size that fits a token cell).
    """
    counts = {name: _check_count(f'n_{name}', n)
              for name, n in zip(SPLITS, (n_pretrain, n_sft, n_test, n_preference))}
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
    strips = [g for g in grids if max(g) >= SMALL_MIN_RATIO and small_digit_sizes(g, tile_size, token_px)]
    # only the longest strips: the more the thumbnail squashes a strip, the larger a digit it cannot show
    longest = max((max(g) for g in strips), default=0)
    strips = [g for g in strips if max(g) == longest]
    if 'small_digit' in kinds and not strips:
        if any(max(g) >= SMALL_MIN_RATIO for g in grids):
            raise ValueError(f'small_digit questions need a digit that fits a token cell of token_px={token_px} px '
                             f'at tile_size={tile_size}, and none does; drop the kind or use a larger token_px')
        raise ValueError(f'small_digit questions need strips of >= {SMALL_MIN_RATIO} tiles, but '
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
                    canvas = make_canvas(rng, rng.choice(strips), tile_size, max_dynamic_patch, jitter=False,
                                          token_px=token_px)
                else:
                    canvas = make_canvas(rng, rng.choice(by_tiles[tiles[i]]), tile_size, max_dynamic_patch,
                                          jitter=True, token_px=token_px)
                try:
                    build_scene(rng, kind, answer, canvas)
                except NoRoom:
                    continue
                image = draw_scene(canvas)
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
                question, reply, record_kind = rng.choice(CAPTION_QUESTIONS), caption(canvas), 'caption'
            else:
                question, reply, record_kind = question_text(rng, kind, canvas), answer, kind
            turns = [{'from': 'human', 'value': '<image>\n' + question}, {'from': 'gpt', 'value': reply}]
            if split == 'sft' and sft_extra_questions:
                for extra_kind, extra_answer in extra_answers(kind, canvas):
                    # never ask what the conversation already said (a colour question names the shape, ...)
                    said = set(re.findall(r'[a-z0-9]+', ' '.join(t['value'] for t in turns).lower()))
                    if extra_answer not in said:
                        turns += [{'from': 'human', 'value': question_text(rng, extra_kind, canvas)},
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='Write the demo data (shapes and digits) to OUT_DIR.')
    parser.add_argument('out_dir')
    # make_demo_data's integer settings, as --n-sft ...; the defaults are the function's own
    settings = ('n_pretrain', 'n_sft', 'n_test', 'seed', 'tile_size', 'max_dynamic_patch')
    defaults = inspect.signature(make_demo_data).parameters
    for name in settings:
        parser.add_argument('--' + name.replace('_', '-'), type=int, default=defaults[name].default)
    args = parser.parse_args(argv)
    result = make_demo_data(args.out_dir, **{name: getattr(args, name) for name in settings})
    result['chance_accuracy'] = chance_accuracy(result['test']) if args.n_test else None
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
