"""Fixtures for the vision tests: tiny InternViT folders in OpenGVLab's layout (``xtuner_plugins.tiny.vision``)."""

import json
import os

import pytest
from safetensors.torch import load_file

from xtuner_plugins.tiny.vision import write_tiny_internvit

VARIANTS = {
    '300m': {},  # qkv bias, LayerNorm, no qk-norm (InternViT-300M-448px-V2_5)
    '6b': {'qkv_bias': False, 'qk_normalization': True, 'norm_type': 'rms_norm'},  # InternViT-6B
}


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def tiny_dir(request, tmp_path_factory):
    return write_tiny_internvit(tmp_path_factory.mktemp(f'internvit_{request.param}'), **VARIANTS[request.param])


@pytest.fixture(scope='module')
def tiny_300m(tmp_path_factory):
    return write_tiny_internvit(tmp_path_factory.mktemp('internvit_300m'))


def read_folder(folder):
    """An InternViT folder's config.json dict and its weights."""
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        cfg = json.load(f)
    return cfg, load_file(os.path.join(folder, 'model.safetensors'))
