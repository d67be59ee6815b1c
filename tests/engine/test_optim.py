import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import xtuner_plugins.engine  # noqa: F401 (registers the constructor)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Linear(2, 2)
        self.mlp1 = nn.Sequential(nn.LayerNorm(2), nn.Linear(2, 2))
        self.language_model = nn.Linear(2, 2)


def lr_of(wrapper, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}


def test_paramwise_cfg_inside_optimizer_is_used():
    model = Net()
    cfg = dict(type='OptimWrapper', optimizer=dict(
        type=torch.optim.AdamW, lr=4e-5, weight_decay=0.05,
        paramwise_cfg=dict(custom_keys={'vision_model.': dict(lr_mult=0.25), 'mlp1.': dict(lr_mult=5.0)})))
    lrs = lr_of(build_optim_wrapper(model, cfg), model)
    assert lrs['vision_model.weight'] == pytest.approx(1e-5)
    assert lrs['mlp1.1.weight'] == pytest.approx(2e-4)
    assert lrs['language_model.weight'] == pytest.approx(4e-5)


def test_deepspeed_rewrite_keeps_it():
    """What xtuner's train.py builds for --deepspeed: only `optimizer` of the original optim_wrapper."""
    model = Net()
    original = dict(type='OptimWrapper', optimizer=dict(
        type=torch.optim.AdamW, lr=1.0, paramwise_cfg=dict(custom_keys={'mlp1.': dict(lr_mult=0.0)})))
    rewritten = dict(type='OptimWrapper', optimizer=original['optimizer'])
    lrs = lr_of(build_optim_wrapper(model, rewritten), model)
    assert lrs['mlp1.0.weight'] == 0.0 and lrs['language_model.weight'] == 1.0


def test_given_twice_is_an_error():
    cfg = dict(type='OptimWrapper', paramwise_cfg=dict(custom_keys={}),
               optimizer=dict(type=torch.optim.AdamW, lr=1.0, paramwise_cfg=dict(custom_keys={})))
    with pytest.raises(ValueError, match='paramwise_cfg is given twice'):
        build_optim_wrapper(Net(), cfg)


def test_frozen_parameters_are_summed_up_in_one_line():
    import logging

    from mmengine.logging import MMLogger
    model = Net()
    model.vision_model.requires_grad_(False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        build_optim_wrapper(model, dict(type='OptimWrapper', optimizer=dict(
            type=torch.optim.AdamW, lr=1e-3, paramwise_cfg=dict(custom_keys={'mlp1.': dict(lr_mult=2.0)}))))
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not any('is skipped since' in m for m in messages), messages
    assert '2 frozen parameter tensors (requires_grad=False) are left out of the optimizer' in messages
