"""A lever of issue 31 measured alone: ``torch.compile`` (inductor) of one LLM decoder layer on the CPU.

Run from the repository root (alone on the machine; inductor builds C++ kernels the first time, minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_compile.py [--config work_dirs/realsize/models/Qwen2.5-0.5B-Instruct]
        [--tokens 3528] [--steps 3] [--mode default]

One decoder layer of the config's LLM (random weights, fp32 as the trained ones are), the training step's work for
it: forward and backward under bf16 autocast on ``--tokens`` tokens (one causal sample; 3,528 is a 13-tile sample
of setting (a)). Eager first, then the same layer (the same weights) compiled with ``torch.compile(mode=...)``:
the first compiled call (compilation) timed on its own, then ``--steps`` steps each. Before timing, the
compiled layer's output and gradients are checked against eager's (bf16 tolerances). Prints s per step of
each, the ratio eager/compiled, the compile time and the steps it takes to pay it back.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def layer_and_inputs(config_dir: str, tokens: int):
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
    cfg = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    cfg._attn_implementation = 'sdpa'
    if cfg.model_type != 'qwen2':
        raise SystemExit(f'{config_dir}: model_type {cfg.model_type!r}; this benchmark builds a Qwen2 decoder layer')
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, layer_idx=0).train()
    x = torch.randn(1, tokens, cfg.hidden_size) * 0.5
    pos = torch.arange(tokens)[None]
    cos_sin = Qwen2RotaryEmbedding(cfg)(x, pos)
    return layer, x, pos, cos_sin


def step(layer, x, pos, cos_sin):
    """Forward and backward of the layer (the input needs a gradient, as inside the LLM); returns output and
    the gradients of the input and of every weight."""
    x = x.detach().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def timed(fn, n: int) -> list:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='work_dirs/realsize/models/Qwen2.5-0.5B-Instruct')
    p.add_argument('--tokens', type=int, default=3528)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--mode', default='default', help="torch.compile's mode (default, max-autotune-no-cudagraphs)")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.config, 'config.json')):
        raise SystemExit(f'{args.config}/config.json not found (bash benchmarks/realsize.sh writes the look-alikes)')
    layer, x, pos, cos_sin = layer_and_inputs(args.config, args.tokens)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; one decoder layer of {args.config}, '
          f'{args.tokens} tokens, forward+backward under bf16 autocast', flush=True)
    ref_out, ref_grads = step(layer, x, pos, cos_sin)   # the warm-up, and the reference
    eager = timed(lambda: step(layer, x, pos, cos_sin), args.steps)
    compiled = torch.compile(layer, mode=args.mode)
    t = time.perf_counter()
    out, grads = step(compiled, x, pos, cos_sin)
    compile_s = time.perf_counter() - t
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip([out] + grads, [ref_out] + ref_grads))
    if worst > 5e-2:
        raise SystemExit(f'compiled layer differs from eager: largest relative difference {worst:.3g} (> 5e-2)')
    fast = timed(lambda: step(compiled, x, pos, cos_sin), args.steps)
    e, c = min(eager), min(fast)
    payback = compile_s / (e - c) if e > c else float('inf')
    print(f'eager    s/step {e:7.3f} (steps {", ".join(f"{v:.3f}" for v in eager)})')
    print(f'compiled s/step {c:7.3f} (steps {", ".join(f"{v:.3f}" for v in fast)}); first call (compilation) '
          f'{compile_s:.1f} s; largest relative difference to eager {worst:.2g}')
    print(f'compile lever: eager/compiled {e / c:.2f}x per layer step; pays back its compilation after '
          f'{payback:.0f} layer steps')


if __name__ == '__main__':
    main()
