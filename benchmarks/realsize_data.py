"""``realsize.py``'s inputs: the look-alike models (written once) and a LLaVA-665K-like mix of samples."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image


def write_mix(folder: str, n: int, tiled: bool, seed: int = 0) -> str:
    """``n`` samples drawn like LLaVA-665K's mix: 70% one short question and a short answer (VQAv2/GQA/OCR-VQA
    style: 1-12 words), 20% multi-turn conversations of 2-5 turns with 10-60 word answers (LLaVA-Instruct
    conversations), 10% one long detailed description of 80-250 words (LLaVA-Instruct detail/reasoning);
    every sample has one image (4:3, so 12 tiles + thumbnail when ``tiled``). Text-only samples (ShareGPT,
    6% of 665K) are left out: every row then runs the same tower batch."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    path = os.path.join(folder, 'data.jsonl')
    size = (4 * 448, 3 * 448) if tiled else (640, 480)

    def words(lo, hi):
        return ' '.join(['word'] * int(rng.integers(lo, hi + 1)))
    with open(path, 'w') as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                os.path.join(folder, 'images', f'{i}.jpg'))
            kind = rng.random()
            turns = (1, 1, 12) if kind < 0.7 else ((int(rng.integers(2, 6)), 10, 60) if kind < 0.9 else (1, 80, 250))
            conv = []
            for t in range(turns[0]):
                q = ('<image>\n' if t == 0 else '') + 'Question ' + words(4, 15) + '?'
                conv += [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': words(turns[1], turns[2])}]
            f.write(json.dumps({'id': i, 'image': f'{i}.jpg', 'conversations': conv}) + '\n')
    return path


def ensure_models(work: str, names) -> dict:
    from xtuner_plugins.tiny.realsize import write_real_model
    out = {}
    for name in names:
        folder = os.path.join(work, 'models', name)
        if not os.path.exists(os.path.join(folder, 'config.json')):
            print(f'writing {name} (random weights) into {folder}', flush=True)
            write_real_model(name, folder)
        out[name] = folder
    return out


def timed_steps(packed, packs: int, order: torch.Generator, row: str, batch: int):
    """The data set a row reads and its timed steps, each a list of indices into it. The same samples in every
    row of a setting, in the same order: those of ``packs`` packs drawn at random (with replacement, ``order``'s
    draws); the packed rows train each pack in a step, the others (ours unpacked, XTuner's) the packs' samples,
    ``batch`` a step (padded). So the rows' tokens/s are over the same tokens: a ratio between two rows measures
    the path, not which samples each row drew (samples differ in their share of image tokens)."""
    picks = list(torch.utils.data.RandomSampler(packed, replacement=True, num_samples=packs, generator=order))
    if row.startswith('packed'):
        return packed, [[pick] for pick in picks]
    samples = [index for pick in picks for index in packed.packs[pick]]
    return packed.dataset, [samples[k:k + batch] for k in range(0, len(samples), batch)]
