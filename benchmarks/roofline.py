"""The machine's matmul ceiling for the real-size benchmarks (``realsize.py``, ``realsize_scaling.py``): a large
``torch.mm`` timed in bf16 and fp32, and the refusal to run on a CPU whose bf16 products crawl."""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch


def roofline(largest: int = 4096, reps: int = 3, probe: int = 512, budget_s: float = 2.0) -> dict:
    """Achieved FLOP/s of a large square ``torch.mm`` in bf16 and fp32 (best of ``reps`` after a warm-up), and
    the size timed for each (``size``). The size is ``largest`` unless a ``probe``-sized product says one would
    take over ``budget_s``: on a CPU without bf16 instructions (no AVX-512 BF16 or AMX) torch multiplies bf16
    in its reference kernel, about 1 GFLOP/s on 2 AVX2 cores, and a 4096^3 product takes over 2 minutes."""
    out = {'size': {}}
    for name, dtype in (('bf16', torch.bfloat16), ('fp32', torch.float32)):
        a, b = torch.randn(probe, probe).to(dtype), torch.randn(probe, probe).to(dtype)
        torch.mm(a, b)
        n = roofline_size(2 * probe ** 3 / _timed(lambda: torch.mm(a, b)), largest, probe, budget_s)
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
        out[name] = 2 * n ** 3 / best / 1e12
        out['size'][name] = n
    return out


def probe(size: int = 2048, reps: int = 5) -> float:
    """This moment's bf16 ``torch.mm`` rate (TFLOP/s, best of ``reps`` after a warm-up; about a second on a
    slow core): read before and after each benchmark row, since a shared host's rate can move by 2x within
    minutes (benchmarks/RESULTS.md, the Emerald Rapids sections) and rows timed minutes apart then compare the
    machine, not the code."""
    a, b = torch.randn(size, size).to(torch.bfloat16), torch.randn(size, size).to(torch.bfloat16)
    torch.mm(a, b)
    return 2 * size ** 3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(reps)) / 1e12


def roofline_size(flops_per_s: float, largest: int = 4096, smallest: int = 512, budget_s: float = 2.0) -> int:
    """The largest square size, a multiple of 256 from ``smallest`` to ``largest``, whose product takes at most
    ``budget_s`` at ``flops_per_s``."""
    n = int((budget_s * flops_per_s / 2) ** (1 / 3)) // 256 * 256
    return max(smallest, min(largest, n))


# A CPU whose bf16 products run under half its fp32 rate has no bf16 instructions: the rows (bf16, as on a GPU)
# would take hours a step at real size. Such a run stops before its rows when the LLM has over this many weights.
SLOW_BF16_LLM_WEIGHTS = 50_000_000


def slow_bf16_refusal(roof: dict, llm_weights: int, tokens: int = 3700) -> Optional[str]:
    """Why the rows cannot run on this CPU (None when they can): bf16 products under half the fp32 rate, and an
    LLM of real size (over :data:`SLOW_BF16_LLM_WEIGHTS` weights). The time given is a lower bound: a sample of
    ``tokens`` through the LLM's forward and backward (6 FLOPs a weight and token) at the bf16 rate."""
    if roof['bf16'] >= roof['fp32'] / 2 or llm_weights <= SLOW_BF16_LLM_WEIGHTS:
        return None
    hours = 6 * llm_weights * tokens / (roof['bf16'] * 1e12) / 3600
    return (f'this CPU has no bf16 matmul instructions (torch\'s CPU capability: '
            f'{torch.backends.cpu.get_cpu_capability()}): bf16 torch.mm runs at {roof["bf16"] * 1e3:.1f} GFLOP/s, '
            f'fp32 at {roof["fp32"] * 1e3:.1f}. The rows train in bf16 (the GPU recipe, and XTuner\'s); one step of '
            f'the {llm_weights / 1e9:.2f}B-weight LLM on {tokens} tokens would take over {hours:.1f} hours here. '
            f'Run the real-size benchmark on a CPU with AVX-512 BF16 or AMX (benchmarks/RESULTS.md), or '
            f'benchmarks/gpu.sh on a GPU.')


def model_weights(work: str, name: str) -> int:
    """Weights of a real-size model: read from the safetensors headers of its folder under ``work`` (no tensor
    loaded; tiny stand-ins linked there in tests count as what they are), or, before it is written, from the
    published config on the meta device."""
    import glob

    from safetensors import safe_open

    from xtuner_plugins.tiny.realsize import meta_state_shapes
    folder = os.path.join(work, 'models', name)
    if not os.path.exists(os.path.join(folder, 'config.json')):
        return sum(int(np.prod(shape)) for shape in meta_state_shapes(name).values())
    total = 0
    for path in glob.glob(os.path.join(folder, '*.safetensors')):
        with safe_open(path, 'pt') as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def slow_bf16_note(roof: dict) -> Optional[str]:
    """What to expect where bf16 products run natively but slower than fp32 (a Xeon whose hypervisor hides AMX:
    0.57x, benchmarks/RESULTS.md): the rows run, in bf16 as on a GPU, several times as long as where bf16 pays,
    which is what their speed targets are for; the stage configs train such a CPU in fp32 (models/cpu_bf16.py).
    None elsewhere."""
    if roof['bf16'] >= roof['fp32']:
        return None
    return (f'bf16 products here run at {roof["bf16"] / roof["fp32"]:.2f}x the fp32 rate: the rows (bf16, as on a '
            f'GPU) take several times as long as on a CPU where bf16 pays, which their speed targets are for; the '
            f'stage configs train this CPU in fp32 (xtuner_plugins/models/cpu_bf16.py)')
