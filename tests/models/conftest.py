"""Fixtures for the model tests: the tiny look-alikes and one mixed batch built by the real data pipeline."""

import os

import pytest

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.tiny import make_tiny_models

TILE = 56  # the tiny InternViT's tile: 4x4 patches -> 2x2 = 4 tokens per tile after pixel shuffle


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    return make_tiny_models(str(tmp_path_factory.mktemp('tiny')))


def train_steps(model, batch, steps, lr=1e-2):
    """Plain AdamW steps on one batch; returns the losses."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch, mode='loss')['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(tiny, **kw):
    kw.setdefault('torch_dtype', 'float32')
    return VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], **kw)


@pytest.fixture(scope='session')
def batch(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('data')
    write_image(tmp / 'i' / 'wide.png', size=(120, 50), seed=1)
    write_image(tmp / 'i' / 'sq.png', size=(40, 40), seed=2)
    path = write_jsonl(tmp / 'd.jsonl', [
        {'image': 'wide.png', 'conversations': conv('What is it?', 'a wide thing')},
        {'conversations': conv('Hello', 'hi there', image=False)},
        {'image': ['sq.png', 'wide.png'], 'conversations': [
            {'from': 'human', 'value': '<image> then <image>'}, {'from': 'gpt', 'value': 'two'}]},
    ])
    ds = InternVLDataset(path, image_folders=str(tmp / 'i'), tokenizer=tiny['llm'], image_size=TILE,
                         max_dynamic_patch=6, cache_dir=str(tmp / 'cache'))
    return internvl_collate_fn([ds[i] for i in range(3)])['data']


def write_official(model, folder):
    """``model`` as an official InternVL folder, written by the converter's own writer (fp32, tiles of the
    model's encoder)."""
    import torch

    from xtuner_plugins.models.export import write_official as write
    from xtuner_plugins.models.export.build import DEFAULT_TILING
    os.makedirs(folder, exist_ok=True)
    write(model, dict(DEFAULT_TILING, image_size=model.vision.image_size), str(folder), torch.float32,
          log=lambda message: None)
