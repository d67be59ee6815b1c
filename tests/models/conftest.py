"""Fixtures for the model tests: the tiny look-alikes and one mixed batch built by the real data pipeline."""

import json
import os

import pytest
from safetensors.torch import save_file

from tests.helpers import conv, write_image, write_jsonl
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.models import InternVLModel
from xtuner_plugins.models.vision import hf_to_official_vision_config, hf_to_official_vision_state_dict
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
    return InternVLModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], **kw)


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
    """A folder in the official InternVL layout (what the converter issue will produce properly)."""
    os.makedirs(folder, exist_ok=True)
    full = {k: v for k, v in super(InternVLModel, model).state_dict().items()}
    state = {f'vision_model.{k}': v for k, v in hf_to_official_vision_state_dict(
        {k[len('vision_model.'):]: v for k, v in full.items() if k.startswith('vision_model.')}).items()}
    state.update({k: v for k, v in full.items() if k.startswith(('mlp1.', 'language_model.'))})
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, 'model.safetensors'))
    llm_config = model.language_model.config.to_dict()
    config = dict(architectures=['InternVLChatModel'], model_type='internvl_chat', downsample_ratio=0.5,
                  ps_version='v2', select_layer=-1, template='internvl2_5',
                  vision_config=hf_to_official_vision_config(model.vision_model.config), llm_config=llm_config)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    model.tokenizer.save_pretrained(folder)
