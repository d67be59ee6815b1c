"""Per-module learning rates and weight decay (MMEngine's ``paramwise_cfg``) that survive ``--deepspeed``.

With ``--deepspeed``, ``xtuner/tools/train.py`` replaces the whole ``optim_wrapper`` by
``dict(type='DeepSpeedOptimWrapper', optimizer=cfg.optim_wrapper.optimizer)``: a ``paramwise_cfg`` beside
``optimizer`` is silently dropped, and every module would train at the base learning rate. Only
``optimizer`` survives, so configs put ``paramwise_cfg`` inside it::

    optim_wrapper = dict(type=AutoOptimWrapper,
                         optimizer=dict(type=AdamW, lr=4e-5,
                                        paramwise_cfg=dict(custom_keys={'vision_model.': dict(lr_mult=0.25)})))

:class:`OptimWrapperConstructor` is MMEngine's ``DefaultOptimWrapperConstructor`` that takes
``paramwise_cfg`` from there too; it is registered under MMEngine's default constructor name, so every
path (plain runs, ``FlexibleRunner`` + DeepSpeed) builds the optimizer with it. Its semantics are MMEngine's
own (``custom_keys`` with ``lr_mult``/``decay_mult``, ``bias_decay_mult``, ``norm_decay_mult``, ...). Its
warning for every frozen parameter is summed up in one line.
"""

from __future__ import annotations

import logging

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from xtuner_plugins.errors import Refused


class _FrozenSkipCounter(logging.Filter):
    """Drops MMEngine's one-line-per-parameter "is skipped since its requires_grad=False" warnings, counting them."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if 'is skipped since its requires_grad=False' in record.getMessage():
            self.count += 1
            return False
        return True


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name='DefaultOptimWrapperConstructor', force=True)
class OptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` that also reads ``optimizer.paramwise_cfg`` (see module docstring)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        optimizer = optim_wrapper_cfg.get('optimizer')
        inner = optimizer.pop('paramwise_cfg', None) if isinstance(optimizer, dict) else None
        if inner is not None:
            if paramwise_cfg:
                raise Refused('paramwise_cfg is given twice, in optim_wrapper and in optim_wrapper.optimizer; '
                              'keep the one in optimizer (it survives --deepspeed)')
            paramwise_cfg = inner
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def __call__(self, model):
        """MMEngine's construction, with its warning per frozen parameter (67 for a LoRA run) summed up in one
        line."""
        logger = MMLogger.get_current_instance()
        skipped = _FrozenSkipCounter()
        logger.addFilter(skipped)
        try:
            return super().__call__(model)
        finally:
            logger.removeFilter(skipped)
            if skipped.count:
                print_log(f'{skipped.count} frozen parameter tensors (requires_grad=False) are left out of the '
                          f'optimizer', logger='current', level=logging.INFO)
