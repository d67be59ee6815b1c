"""Shared fixtures: an offline tiny tokenizer (built in code, saved once per session)."""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


@pytest.fixture(scope='session')
def tiny_tokenizer():
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    return build_tiny_tokenizer()


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp('tokenizer')
    tiny_tokenizer.save_pretrained(path)
    return str(path)
