"""Learning-rate schedules that survive short runs.

MMEngine converts a warm-up given in epochs (``end=warmup_ratio * max_epochs``) to iterations by
truncation: on a small data set (a few dozen iterations at 3 % warm-up) that gives ``end == begin == 0``
and MMEngine refuses to start ("end should be larger than begin"). One iteration is no better: MMEngine's
``LinearLR`` applies ``start_factor`` at its first step and reaches ``end_factor`` only at its second, so a
one-iteration warm-up leaves the learning rate at ``start_factor`` times its value for the whole run.
:class:`WarmupLR` is ``LinearLR`` with the converted warm-up lasting at least two iterations.
"""

from __future__ import annotations

from mmengine.optim import LinearLR
from mmengine.registry import PARAM_SCHEDULERS

from xtuner_plugins.errors import Refused

INF = int(1e9)


@PARAM_SCHEDULERS.register_module()
class WarmupLR(LinearLR):
    """``LinearLR`` whose epoch-based span converts to at least two iterations (see the module docstring)."""

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None, **kwargs):
        if not by_epoch or not epoch_length:
            raise Refused(f'{cls.__name__}.build_iter_from_epoch needs by_epoch=True and an epoch_length, '
                          f'got by_epoch={by_epoch}, epoch_length={epoch_length}')
        begin = int(begin * epoch_length)
        end = max(int(end * epoch_length), begin + 2) if end != INF else INF
        return cls(*args, begin=begin, end=end, by_epoch=False, **kwargs)
