"""A lever of issue 31 measured alone: torch's AdamW step, its default path against ``fused=True`` (our configs'),
on the trained parameters of a full fine-tuning of an LLM.

Run from the repository root (alone on the machine; about 8 GB of memory for Qwen2.5-0.5B)::

    .venv/bin/python benchmarks/bench_adamw.py [--llm work_dirs/realsize/models/Qwen2.5-0.5B-Instruct] [--steps 3]

The LLM is built from its ``config.json`` on the meta device and every parameter is then made as an fp32 tensor
of its shape with a random gradient (no weights read). For each path: one step to make the states, then
``--steps`` timed steps; per step the time and the rise of malloc's bytes in use during it (the optimizer's
temporaries; ``rss.RssSampler``). The two paths' results after the same steps from the same start are checked
equal (fp32 tolerance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.rss import RssSampler  # noqa: E402


def shapes(llm: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm, trust_remote_code=False))
    return [p.shape for p in model.parameters()]


def measure(sizes, fused: bool, steps: int, sampler: RssSampler):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, fused=fused)
    opt.step()
    times, rises = [], []
    for _ in range(steps):
        sampler.mark()
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
        time.sleep(3 * sampler.period)
        rises.append(sampler.rise())
    return min(times), max(rises), [p.detach()[:4].clone() for p in params]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--llm', default='work_dirs/realsize/models/Qwen2.5-0.5B-Instruct')
    p.add_argument('--steps', type=int, default=3)
    args = p.parse_args()
    sizes = shapes(args.llm)
    n = sum(torch.Size(s).numel() for s in sizes)
    sampler = RssSampler(period=0.005)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; AdamW over the {len(sizes)} parameters of '
          f'{args.llm} ({n / 1e6:.0f}M, fp32)', flush=True)
    results = {}
    for fused in (False, True):
        results[fused] = measure(sizes, fused, args.steps, sampler)
        s, rise, _ = results[fused]
        print(f'{"fused" if fused else "default (single-tensor on the CPU)":36s} {s:6.3f} s a step; '
              f'{rise / 2 ** 30:5.2f} GiB more in use during it', flush=True)
    worst = max((a - b).abs().max().item() for a, b in zip(results[False][2], results[True][2]))
    if worst > 1e-5:
        raise SystemExit(f'fused and default AdamW disagree: largest difference {worst:.3g}')
    print(f'adamw lever: fused {results[False][0] / results[True][0]:.1f}x faster a step; the same parameters '
          f'(largest difference {worst:.1g})')


if __name__ == '__main__':
    main()
