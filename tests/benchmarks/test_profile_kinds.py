"""benchmarks/profile_kinds.py: a step's operators split by kind, each kind seen where it is."""

import time

import torch
from torch import nn

from benchmarks.profile_kinds import KINDS, kind_of, mark_modules, split, table


def test_operator_names_have_their_kind():
    assert kind_of('aten::mm') == kind_of('aten::addmm') == 'matmul'
    assert kind_of('aten::_scaled_dot_product_flash_attention_for_cpu') == 'attention'
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
