"""A sliding layer's attention under ``sdpa_segments`` (``attention.windowed_sdpa``: queries in blocks of the
window, each with the keys it reaches) against SDPA over the whole ``N x N`` banded mask and against plain causal
SDPA (no window: what the layer computed before, and the least it can cost), forward and backward of one sample.

Run from the repository root, alone on the machine::

    .venv/bin/python benchmarks/bench_window.py [--length 8192] [--window 512] [--heads 8] [--dim 64]

Each path runs in a process of its own (``--path``), so each peak is its own: the rise of the resident set's peak
(``ru_maxrss``) over the inputs' through two forwards and backwards, and the time of the second. The outputs of
the windowed paths are checked equal first, in this process, at a tenth of the length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xtuner_plugins.models.attention import windowed_sdpa  # noqa: E402

PATHS = ('blocks', 'banded', 'causal')


def attend(path: str, q, k, v, window: int):
    if path == 'blocks':
        return windowed_sdpa(q, k, v, 0.0, None, False, window)
    if path == 'banded':
        behind = torch.arange(q.shape[2])[:, None] - torch.arange(q.shape[2])[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(behind >= 0) & (behind < window))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def one(path: str, args) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.length, args.dim, requires_grad=True) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attend(path, q, k, v, args.window).sum().backward()   # untimed: the first call's allocations
    start = time.perf_counter()
    attend(path, q, k, v, args.window).sum().backward()
    seconds = time.perf_counter() - start
    return dict(path=path, seconds=round(seconds, 3),
                peak_rise_mb=round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--length', type=int, default=8192)
    p.add_argument('--window', type=int, default=512)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--path', choices=PATHS, help='one path, in this process (the runs of the others call it)')
    args = p.parse_args()
    if args.path:
        print(json.dumps(one(args.path, args)))
        return 0
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, max(args.length // 10, 1), args.dim) for _ in range(3))
    torch.testing.assert_close(attend('blocks', q, k, v, args.window), attend('banded', q, k, v, args.window))
    print(f'{args.length} tokens, window {args.window}, {args.heads} heads of {args.dim}, fp32, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}')
    for path in PATHS:
        out = subprocess.run([sys.executable, __file__, '--path', path, '--length', str(args.length), '--window',
                              str(args.window), '--heads', str(args.heads), '--dim', str(args.dim)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())
    return 0


if __name__ == '__main__':
    sys.exit(main())
