"""A lever of issue 31 measured alone: ``torch.compile`` (inductor) of one LLM decoder layer on the CPU.

Run from the repository root (alone on the machine; inductor builds C++ kernels the first time, minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_compile.py [--config work_dirs/realsize/models/Qwen2.5-0.5B-Instruct]
        [--tokens 3528] [--steps 3] [--mode default] [--dynamic]
    .venv/bin/python benchmarks/bench_compile.py --lookalike qwen3-30b-a3b [--experts 128] --tokens 2048 --dynamic

One decoder layer of the config's LLM, any family transformers builds (random weights, fp32 as the trained ones
are; ``--lookalike qwen3-30b-a3b``: a mixture of experts at Qwen3-30B-A3B's shapes, hidden 2048, 128 experts of 768,
8 a token, built here without a download; ``--experts`` fewer of them, the work a token the same), the training
step's work for it: forward and backward under bf16 autocast on ``--tokens`` tokens (one causal sample; 3,528 is a
13-tile sample of setting (a)). Eager first, then the same layer (the same weights) compiled with
``torch.compile(mode=...)`` (``--dynamic``: dynamic shapes, as ``compile_blocks`` compiles each block): the first
compiled call (compilation) timed on its own, then ``--steps`` steps each. Before timing, the compiled layer's
output and gradients are checked against eager's (bf16 tolerances). Prints s per step of each, the ratio
eager/compiled, the compile time and the steps it takes to pay it back.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


#: look-alikes built from their published shapes (config.json's values), for families no realsize folder has
LOOKALIKES = {'qwen3-30b-a3b': dict(model_type='qwen3_moe', hidden_size=2048, intermediate_size=6144,
                                    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
                                    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960)}


def layer_and_inputs(config_dir: str, tokens: int, lookalike: str = '', experts: int = 0):
    """The first decoder layer of a one-layer model of ``config_dir``'s (or the look-alike's) family, its input
    and its rotary embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if lookalike:
        shape = dict(LOOKALIKES[lookalike])
        cfg = AutoConfig.for_model(shape.pop('model_type'), **shape)
    else:
        cfg = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    if experts:
        if experts < getattr(cfg, 'num_experts_per_tok', 0):
            raise SystemExit(f'--experts {experts}: fewer than the {cfg.num_experts_per_tok} experts a token takes')
        cfg.num_experts = experts
    cfg.num_hidden_layers, cfg.vocab_size, cfg.use_cache = 1, 128, False   # the layer only
    for key in ('layer_types', 'mlp_only_layers'):   # per-layer lists sized for the whole model
        if isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, getattr(cfg, key)[:1])
    cfg._attn_implementation = 'sdpa'
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    layer = model.model.layers[0].train()
    x = torch.randn(1, tokens, cfg.hidden_size) * 0.5
    pos = torch.arange(tokens)[None]
    cos_sin = model.model.rotary_emb(x, pos)
    return layer, x, pos, cos_sin


def step(layer, x, pos, cos_sin):
    """Forward and backward of the layer (the input needs a gradient, as inside the LLM); returns output and
    the gradients of the input and of every weight."""
    x = x.detach().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    grads = {'input': x.grad, **{n.replace('_orig_mod.', ''): p.grad.clone() for n, p in layer.named_parameters()
                                 if p.grad is not None}}   # (the compiled wrapper's names: the layer's)
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
    p.add_argument('--dynamic', action='store_true', help='dynamic shapes, as compile_blocks compiles a block')
    p.add_argument('--lookalike', choices=sorted(LOOKALIKES), help='a family no realsize folder has, by its shapes')
    p.add_argument('--experts', type=int, default=0, help='a mixture of experts with fewer experts (memory)')
    args = p.parse_args()
    if not args.lookalike and not os.path.exists(os.path.join(args.config, 'config.json')):
        raise SystemExit(f'{args.config}/config.json not found (bash benchmarks/realsize.sh writes the look-alikes)')
    layer, x, pos, cos_sin = layer_and_inputs(args.config, args.tokens, args.lookalike, args.experts)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; one decoder layer '
          f'({type(layer).__name__}) of {args.lookalike or args.config}, {args.tokens} tokens, forward+backward '
          f'under bf16 autocast; compiled with mode={args.mode}, dynamic={args.dynamic}', flush=True)
    ref_out, ref_grads = step(layer, x, pos, cos_sin)   # the warm-up, and the reference
    eager = timed(lambda: step(layer, x, pos, cos_sin), args.steps)
    compiled = torch.compile(layer, mode=args.mode, dynamic=args.dynamic or None)
    t = time.perf_counter()
    out, grads = step(compiled, x, pos, cos_sin)
    compile_s = time.perf_counter() - t
    def relative(a, b) -> float:
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    # a routed expert's gradient is left out of the check: bf16 rounding that differs by a hair between the two
    # flips a token's top-k choice near a tie, and the experts it moves between then see other tokens (measured)
    # (an expert no token took in one of the two has no gradient there: none to compare)
    routed = {n for n in (*ref_grads, *grads) if '.experts.' in n}
    routed |= {n for n in ref_grads if routed and n.endswith('mlp.gate.weight')}   # the router: its choices moved
    diffs = {'output': relative(out, ref_out),
             **{n: relative(grads[n], g) for n, g in ref_grads.items() if n in grads}}
    worst = max(v for n, v in diffs.items() if n not in routed)
    if worst > 5e-2:
        name = max((n for n in diffs if n not in routed), key=diffs.get)
        raise SystemExit(f'compiled layer differs from eager: largest relative difference {worst:.3g} (> 5e-2), '
                         f'{name}')
    if routed:
        both = [diffs[n] for n in routed if n in diffs]
        print(f'routed experts\' and router\'s gradients (not checked): largest relative difference '
              f'{max(both, default=0):.2g} over the {len(both)} both runs gave', flush=True)
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
