import pytest
import torch
from mmengine.optim import CosineAnnealingLR

from xtuner_plugins.engine import WarmupLR


def lrs(epoch_length, warmup_ratio=0.03, steps=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warm = WarmupLR.build_iter_from_epoch(opt, start_factor=1e-5, begin=0, end=warmup_ratio,
                                          epoch_length=epoch_length)
    cos = CosineAnnealingLR.build_iter_from_epoch(opt, eta_min=0.0, begin=warmup_ratio, end=1,
                                                  epoch_length=epoch_length)
    out = []
    for _ in range(steps or epoch_length):
        out.append(opt.param_groups[0]['lr'])
        opt.step()
        for sched in (warm, cos):
            sched.step()
    return out


@pytest.mark.parametrize('epoch_length', [1, 6, 20])
def test_short_runs_reach_the_learning_rate(epoch_length):
    values = lrs(epoch_length)
    assert values[0] == pytest.approx(1e-5)
    if epoch_length > 1:
        assert values[1] > 0.5  # warm-up over after two iterations, then cosine decay
        assert values[1:] == sorted(values[1:], reverse=True)


def test_long_runs_warm_up_over_their_share():
    values = lrs(1000)
    assert values[0] == pytest.approx(1e-5)
    assert values[15] < 0.6 and values[30] > 0.95  # 3 % of 1000 iterations
