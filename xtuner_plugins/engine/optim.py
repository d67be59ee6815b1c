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
own (``custom_keys`` with ``lr_mult``/``decay_mult``, ``bias_decay_mult``, ``norm_decay_mult``, ...).
"""

from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name='DefaultOptimWrapperConstructor', force=True)
class OptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` that also reads ``optimizer.paramwise_cfg`` (see module docstring)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        optimizer = optim_wrapper_cfg.get('optimizer')
        inner = optimizer.pop('paramwise_cfg', None) if isinstance(optimizer, dict) else None
        if inner is not None:
            if paramwise_cfg:
                raise ValueError('paramwise_cfg is given twice, in optim_wrapper and in optim_wrapper.optimizer; '
                                 'keep the one in optimizer (it survives --deepspeed)')
            paramwise_cfg = inner
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
