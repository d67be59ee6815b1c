"""benchmarks/profile_kinds.py: a step's operators split by kind, each kind seen where it is."""

import time

import pytest
import torch
from torch import nn

from benchmarks.profile_kinds import KINDS, kind_of, mark_modules, split, table


def test_operator_names_have_their_kind():
    assert kind_of('aten::mm') == kind_of('aten::addmm') == 'matmul'
    assert kind_of('aten::_scaled_dot_product_flash_attention_for_cpu') == 'attention'
    assert kind_of('xtuner_plugins::cpu_bf16_attention_train') == 'attention'
    assert kind_of('xtuner_plugins::cpu_bf16_attention_backward') == 'attention'
    assert kind_of('aten::_log_softmax') == kind_of('aten::nll_loss_forward') == 'loss'
    assert kind_of('aten::_fused_adamw_') == 'optimizer'
    assert kind_of('aten::_to_copy') == kind_of('aten::copy_') == kind_of('aten::cat') == 'cast/copy'
    assert kind_of('aten::mul') == kind_of('aten::silu') == 'elementwise'
    assert kind_of('aten::native_layer_norm') == 'norm'
    assert kind_of('PythonDispatchMode') == 'Python dispatch modes'


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(64, 64), nn.GELU())
        self.vision.requires_grad_(False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x, y):
        h = self.vision(x)
        q = h.view(1, 8, 4, 16).transpose(1, 2)   # 4 heads of 16 over 8 positions
        h = h + nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(8, 64)
        return nn.functional.cross_entropy(self.head(self.norm(h)), y)


def test_a_step_is_split_into_its_kinds():
    model = Tiny()
    mark_modules(model, model.vision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with torch.profiler.record_function('data'):
            x2 = x.clone()
        model(x2, y).backward()
        with torch.profiler.record_function('optimizer'):
            opt.step()
            opt.zero_grad()
        wall = (time.perf_counter() - start) * 1e6
        with torch.profiler.record_function('untimed'):   # far longer than the step: counted, it would show
            for _ in range(20):
                torch.randn(512, 512) @ torch.randn(512, 512)
    kinds = split(prof.events(), wall)
    assert list(kinds) == list(KINDS)
    for kind in ('matmul', 'attention', 'norm', 'loss', 'optimizer', 'vision forward', 'data'):
        assert kinds[kind] > 0, kind
    assert abs(sum(kinds.values()) - wall / 1e6) < 1e-6   # everything counted once; the untimed part left out
    assert '| vision forward |' in table({'row': kinds})


class FakeEvent:
    """What ``split`` reads of a profiler event."""

    def __init__(self, name, cpu_us, device_us, device_type=torch.autograd.DeviceType.CPU, parent=None):
        self.name, self.self_cpu_time_total, self.self_device_time_total = name, cpu_us, device_us
        self.device_type, self.cpu_parent = device_type, parent


def test_device_split_counts_each_kernel_once_by_its_operator():
    """On a GPU the split is by device time: an operator's own kernels, not the kernels' events again, and the
    time no kernel ran (the GPU waiting for the host) in ``not in an operator``."""
    opt = FakeEvent('Optimizer.step#AdamW.step', 50, 0)
    events = [FakeEvent('aten::mm', 900, 3000), FakeEvent('aten::mul', 700, 1000),
              FakeEvent('aten::_flash_attention_forward', 100, 2000), FakeEvent('PythonDispatchMode', 4000, 0),
              FakeEvent('aten::_fused_adamw_', 10, 500, parent=opt), opt,
              FakeEvent('void flash_fwd_kernel<...>', 0, 2000, torch.autograd.DeviceType.CUDA),
              FakeEvent('gpu_user_annotation', 0, 500, torch.autograd.DeviceType.CUDA)]
    got = split(events, wall_us=10000, device=True)
    assert got['matmul'] == 0.003 and got['elementwise'] == 0.001 and got['attention'] == 0.002
    assert got['optimizer'] == 0.0005 and got['Python dispatch modes'] == 0.0
    assert got['not in an operator'] == pytest.approx(0.0035)
    host = split(events[:6], wall_us=10000)
    assert host['Python dispatch modes'] == 0.004 and host['matmul'] == 0.0009
