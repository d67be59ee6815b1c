"""Helpers that write small data sets to disk for the tests."""

import json
import os

import numpy as np
from PIL import Image


def write_image(path, size=(64, 48), mode='RGB', seed=0, fmt=None):
    """Write a random image of ``size`` (width, height) in ``mode``; returns the path."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ('L', 'P'):
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))  # mode L
        if mode == 'P':
            img = img.convert('P')
    elif mode.startswith('I;16'):
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)  # RGB first
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(path, format=fmt)
    return str(path)


def write_jsonl(path, samples):
    with open(path, 'w', encoding='utf-8') as f:
        for s in samples:
            f.write((s if isinstance(s, str) else json.dumps(s, ensure_ascii=False)) + '\n')
    return str(path)


def conv(question='What is shown?', answer='A red square.', image=True):
    q = ('<image>\n' if image else '') + question
    return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': answer}]
