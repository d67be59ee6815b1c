"""Fixtures for the stage-config tests: tiny models, tiny data sets, and the cfg-options that point a
real stage config at them (the configs themselves stay as users run them)."""

import os

import pytest

from tests.helpers import tiny_workspace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp('tiny'))


def tiny_options(tiny, data, repeat, batch_size=2, lr=0.01):
    """The model paths and the data; the data set's tile size (56 px for the tiny models), tokens per tile and
    tokenizer are the model's (engine/derive.py), as for a user who points a config at other models."""
    return {
        'model.vision_encoder': tiny['internvit'], 'model.llm': tiny['llm'],
        'model.from_scratch': True,  # no warm-up before these stages: a random projector is meant
        'train_dataloader.dataset.data_files': f'[{data}]',
        'train_dataloader.dataset.image_folders': f'[{tiny["images"]}]',
        'train_dataloader.dataset.repeat_times': repeat,
        'train_dataloader.dataset.max_dynamic_patch': 4,
        'train_dataloader.dataset.max_length': 2048, 'train_dataloader.dataset.cache_dir': tiny['cache'],
        'train_dataloader.batch_size': batch_size, 'train_dataloader.sampler.per_device_batch_size': batch_size,
        'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
        'optim_wrapper.optimizer.lr': lr, 'optim_wrapper.accumulative_counts': 1,
        'default_hooks.logger.interval': 1, 'log_processor.window_size': 1,
    }


