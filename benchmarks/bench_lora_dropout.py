"""LoRA's input dropout on a CPU: a real-size LoRA step with ``CpuDropout`` (``models/dropout.py``, the default),
with torch's ``nn.Dropout`` (PEFT's own) and with no dropout, each in its own process, one after the other.

Run from the repository root, alone on the machine (heavy: ~1.5 min a variant at 0.5B)::

    .venv/bin/python benchmarks/bench_lora_dropout.py
    .venv/bin/python benchmarks/bench_lora_dropout.py --dtype float32 --compile-blocks False

The model is InternViT-300M-448px-V2_5 + the ``--llm`` look-alike (random weights, ``realsize_data.ensure_models``)
as ``configs/finetune_lora.py`` trains it: LoRA r16 on every linear layer of the LLM, the projector trained, LLM
checkpointing, ``torch_dtype`` ``--dtype`` (``auto``: bf16 weights and autocast on a CPU with native bf16) and
``compile_blocks`` ``--compile-blocks``. One batch of ``--batch`` samples of the LLaVA-665K-like mix (one 640x480
image, up to ``--tiles`` tiles + thumbnail), the same in every variant; ``--steps`` optimizer steps through the
CPU's optimizer wrapper, of which the first ``--skip`` are left out (compilation). One ``RESULT`` line a variant:
the median seconds a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {'cpu_dropout': 0.05, 'torch_dropout': 0.05, 'no_dropout': 0.0}


def child(args) -> None:
    import torch

    from benchmarks.realsize_data import ensure_models, write_mix
    from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
    from xtuner_plugins.engine.nonfinite import GuardedOptimWrapper
    from xtuner_plugins.models import VisionLanguageModel
    if args.child == 'torch_dropout':   # PEFT's nn.Dropout left in place
        from xtuner_plugins.models import dropout
        dropout.use_cpu_dropout = lambda model: 0
    models = ensure_models(args.workdir, ['InternViT-300M-448px-V2_5', args.llm])
    folder = os.path.join(args.workdir, 'data', 'precision_32')
    if not os.path.exists(os.path.join(folder, 'data.jsonl')):
        write_mix(folder, 32, tiled=False)
    compile_blocks = {'False': False, 'True': True}.get(args.compile_blocks, args.compile_blocks)
    model = VisionLanguageModel(
        vision_encoder=models['InternViT-300M-448px-V2_5'], llm=models[args.llm], torch_dtype=args.dtype,
        from_scratch=True, freeze_llm=True, llm_grad_ckpt=True, compile_blocks=compile_blocks,
        llm_lora=dict(r=16, lora_alpha=32, lora_dropout=VARIANTS[args.child], target_modules='all-linear')).train()
    ds = InternVLDataset(os.path.join(folder, 'data.jsonl'), image_folders=os.path.join(folder, 'images'),
                         tokenizer=models[args.llm], image_size=448, max_dynamic_patch=args.tiles,
                         cache_dir=os.path.join(args.workdir, 'cache'))
    batch = internvl_collate_fn([ds[i] for i in range(args.batch)])['data']
    params = [p for p in model.parameters() if p.requires_grad]
    wrapper = GuardedOptimWrapper(optimizer=torch.optim.AdamW(params, lr=1e-5, fused=True))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with wrapper.optim_context(model):
            loss = model(batch, mode='loss')['loss']
        wrapper.update_params(loss)
        times.append(time.perf_counter() - start)
    print('CHILD ' + json.dumps(dict(times=times, tokens=int(batch['attention_mask'].sum()))), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workdir', default=os.path.join(ROOT, 'work_dirs', 'realsize'))
    p.add_argument('--llm', default='Qwen2.5-0.5B-Instruct', choices=('Qwen2.5-0.5B-Instruct', 'Qwen2.5-1.5B-Instruct'))
    p.add_argument('--dtype', default='auto')
    p.add_argument('--compile-blocks', default='auto')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--tiles', type=int, default=4)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--skip', type=int, default=2)
    p.add_argument('--variants', nargs='+', choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument('--child', choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    for variant in args.variants:
        cmd = [sys.executable, __file__, '--child', variant] + [
            f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items() if k not in ('child', 'variants')]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith('CHILD ')), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f'{variant}: exit {out.returncode}\n' + '\n'.join(out.stderr.splitlines()[-15:]))
        r = json.loads(line[6:])
        step = statistics.median(r['times'][args.skip:])
        print(f'RESULT {variant} (torch_dtype={args.dtype}, compile_blocks={args.compile_blocks}): {step:.2f} s a '
              f'step, {r["tokens"] / step:.0f} tokens/s ({r["tokens"]} tokens, median of steps {args.skip + 1}-'
              f'{args.steps})', flush=True)


if __name__ == '__main__':
    main()
