"""The stage configs on a CPU, at real size: ``torch_dtype='auto'`` (on a CPU where bf16 pays: bf16 weights, fp32
trained parameters, bf16 autocast and, through ``compile_blocks='auto'``, the LLM's blocks compiled) against
``torch_dtype='float32'`` (plain fp32: the CPU's default before), through ``tools/train.py`` as a user runs it.

Run from the repository root, alone on the machine (heavy: ~2 min a run at 0.5B)::

    .venv/bin/python benchmarks/bench_precision.py                         # finetune_lora + pretrain_mlp, 0.5B
    .venv/bin/python benchmarks/bench_precision.py --llm Qwen2.5-1.5B-Instruct --configs finetune_lora

Each run trains ``--iters`` iterations of batch ``--batch`` on a LLaVA-665K-like mix (``realsize_data.write_mix``:
one 640x480 image a sample, ``--tiles`` tiles at most + thumbnail) with the real-size look-alike models
(InternViT-300M-448px-V2_5 and the ``--llm``, random weights, written once under ``--workdir``), logging every
iteration. Reported per run: the median tokens/s (ThroughputHook's, non-padding tokens) over the iterations after
``--skip`` (the first ones pay the compilation), the log's peak memory (the process's peak RSS on a CPU) and the
weights' dtype the run logged; then the ratio auto/fp32 of each config. Each result is one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.realsize_data import ensure_models, write_mix  # noqa: E402

LINE = re.compile(r'iter (\d+)/\d+ .*?([\d.]+)(k?) tokens/s .*?mem ([\d.]+) GiB')


def run(config: str, dtype: str, models: dict, data: str, images: str, args, out: str) -> dict:
    """One ``tools/train.py`` run; its log's per-iteration tokens/s and peak memory."""
    vit, llm = models['InternViT-300M-448px-V2_5'], models[args.llm]
    options = [f'model.vision_encoder={vit}', f'model.llm={llm}', f'model.torch_dtype={dtype}',
               'model.from_scratch=True', f'train_dataloader.dataset.data_files=[{data}]',
               f'train_dataloader.dataset.image_folders=[{images}]',
               f'train_dataloader.dataset.max_dynamic_patch={args.tiles}', f'train_dataloader.batch_size={args.batch}',
               f'train_dataloader.sampler.per_device_batch_size={args.batch}', 'train_dataloader.num_workers=1',
               f'max_iters={args.iters}', 'default_hooks.logger.interval=1', f'save_every={10 * args.iters}']
    cmd = [sys.executable, 'tools/train.py', f'configs/{config}.py', '--work-dir', out, '--cfg-options', *options]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    rates, mem = {}, 0.0
    for m in LINE.finditer(text):
        rates[int(m.group(1))] = float(m.group(2)) * (1000 if m.group(3) else 1)
        mem = max(mem, float(m.group(4)))
    if proc.returncode != 0 or len(rates) < args.iters:
        tail = '\n'.join(text.strip().splitlines()[-15:])
        raise SystemExit(f'{config} torch_dtype={dtype}: exit {proc.returncode}, {len(rates)}/{args.iters} '
                         f'iterations logged\n{tail}')
    timed = [r for i, r in sorted(rates.items()) if i > args.skip]
    weights = 'bf16' if "torch_dtype='auto' on a CPU where bf16 pays" in text else 'fp32'
    return dict(tokens_per_s=statistics.median(timed), mem_gib=mem, wall_s=wall, weights=weights,
                compiled='compile_blocks:' in text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workdir', default=os.path.join(ROOT, 'work_dirs', 'realsize'))
    p.add_argument('--llm', default='Qwen2.5-0.5B-Instruct', choices=('Qwen2.5-0.5B-Instruct', 'Qwen2.5-1.5B-Instruct'))
    p.add_argument('--configs', nargs='+', default=['finetune_lora', 'pretrain_mlp'])
    p.add_argument('--dtypes', nargs='+', default=['float32', 'auto'])
    p.add_argument('--iters', type=int, default=8)
    p.add_argument('--skip', type=int, default=3, help='iterations left out of the median (compilation, warm-up)')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--tiles', type=int, default=4)
    p.add_argument('--samples', type=int, default=32)
    args = p.parse_args()
    models = ensure_models(args.workdir, ['InternViT-300M-448px-V2_5', args.llm])
    folder = os.path.join(args.workdir, 'data', f'precision_{args.samples}')
    data = os.path.join(folder, 'data.jsonl')
    if not os.path.exists(data):
        write_mix(folder, args.samples, tiled=False)
    results = {}
    for config in args.configs:
        for dtype in args.dtypes:
            r = run(config, dtype, models, data, os.path.join(folder, 'images'), args,
                    os.path.join(args.workdir, 'precision', f'{config}_{dtype}'))
            results[config, dtype] = r
            print(f'RESULT {config} torch_dtype={dtype} ({r["weights"]} weights'
                  f'{", compiled LLM blocks" if r["compiled"] else ""}): {r["tokens_per_s"]:.1f} tokens/s '
                  f'(median of iterations {args.skip + 1}-{args.iters}), peak {r["mem_gib"]:.2f} GiB, '
                  f'run {r["wall_s"]:.0f} s', flush=True)
        if {(config, 'float32'), (config, 'auto')} <= results.keys():
            a, f = results[config, 'auto'], results[config, 'float32']
            print(f'RESULT {config} auto/fp32: {a["tokens_per_s"] / f["tokens_per_s"]:.2f}x tokens/s, '
                  f'{a["mem_gib"] / f["mem_gib"]:.2f}x peak memory', flush=True)


if __name__ == '__main__':
    main()
