"""Trainable parameters and peak memory per training stage.

Usage::

    .venv/bin/python benchmarks/bench_memory.py                 # tiny models on the CPU (what CI can run)
    .venv/bin/python benchmarks/bench_memory.py --real --device cuda   # GPU: InternViT-300M + Qwen2.5-1.5B

Each stage is measured in a fresh process (so one stage's peak does not hide the next): the model is built
with the stage config's model settings (freezing, LoRA, 4-bit, gradient checkpointing), then a few
training steps (AdamW over the trainable parameters) run on one batch of ``--batch`` samples, each with
one image of 12 tiles plus a thumbnail. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and
the process's peak resident set size (which includes the Python runtime and libraries) on a CPU.
``--real`` writes randomly initialised checkpoints with the real shapes (InternViT-300M-448px-V2_5:
1024 wide, 24 layers, 448 px; Qwen2.5-1.5B: 1536 wide, 28 layers, vocab 151936) into a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# stage -> InternVLModel settings, as the stage configs set them
STAGES = {
    'pretrain_mlp': dict(freeze_vision=True, freeze_llm=True),
    'finetune_lora': dict(freeze_vision=True, freeze_llm=True,
                          llm_lora=dict(r=16, lora_alpha=32, lora_dropout=0.05)),
    'finetune_qlora': dict(freeze_vision=True, freeze_llm=True,
                           llm_lora=dict(r=16, lora_alpha=32, lora_dropout=0.05),
                           llm_quantization=dict(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                                 bnb_4bit_use_double_quant=True)),
    'finetune_full': dict(freeze_vision=True, freeze_llm=False),
    'finetune_full+vision': dict(freeze_vision=False, freeze_llm=False, vision_drop_path=0.1,
                                 vision_grad_ckpt=True),
}


def write_models(out: str, real: bool) -> dict:
    from xtuner_plugins.tiny.llm import write_tiny_qwen2
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    from xtuner_plugins.tiny.vision import write_tiny_internvit
    if not real:
        return dict(internvit=write_tiny_internvit(os.path.join(out, 'internvit')),
                    llm=write_tiny_qwen2(os.path.join(out, 'llm')), image_size=56)
    vocab_padding = 151936 - len(build_tiny_tokenizer(add_internvl_tokens=False))
    return dict(
        internvit=write_tiny_internvit(os.path.join(out, 'internvit'), image_size=448, hidden_size=1024,
                                       num_layers=24, num_heads=16, intermediate_size=4096),
        llm=write_tiny_qwen2(os.path.join(out, 'llm'), hidden_size=1536, num_layers=28, num_heads=12,
                             num_kv_heads=2, intermediate_size=8960, vocab_padding=vocab_padding),
        image_size=448)


def measure(stage: str, models: dict, device: str, batch: int, steps: int) -> dict:
    """Runs in the child process."""
    import torch

    from xtuner_plugins.models import InternVLModel
    from xtuner_plugins.models.internvl import count_parameters
    settings = dict(STAGES[stage])
    model = InternVLModel(vision_encoder=models['internvit'], llm=models['llm'], llm_grad_ckpt=True,
                          torch_dtype='bfloat16' if device == 'cuda' else 'float32', **settings)
    if 'llm_quantization' not in settings:
        model.to(device)
    else:
        model.vision_model.to(device)
        model.mlp1.to(device)
    counts = count_parameters(model)
    s, tiles, per_tile = models['image_size'], 13, (models['image_size'] // 14) ** 2 // 4
    text = 64
    ids = torch.randint(0, 400, (batch, text + tiles * per_tile))
    ids[:, 8:8 + tiles * per_tile] = model.img_context_token_id
    data = dict(input_ids=ids.to(device), labels=ids.to(device), attention_mask=torch.ones_like(ids).bool().to(device),
                pixel_values=torch.randint(0, 256, (batch * tiles, 3, s, s), dtype=torch.uint8).to(device),
                image_flags=torch.ones(batch * tiles, dtype=torch.long).to(device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            loss = model(data, mode='loss')['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(stage=stage, **counts, peak_mb=round(peak, 1), step_s=round(seconds, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--real', action='store_true', help='real model shapes (random weights; needs a GPU)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to train (default cpu)')
    parser.add_argument('--batch', type=int, default=2, help='samples per step, one 13-tile image each (default 2)')
    parser.add_argument('--steps', type=int, default=2, help='training steps per stage (default 2)')
    parser.add_argument('--stages', nargs='*', default=list(STAGES), help='stages to measure (default: all)')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, json.loads(os.environ['BENCH_MODELS']), args.device, args.batch,
                                 args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix='bench_memory_') as tmp:
        models = write_models(tmp, args.real)
        rows = []
        for stage in args.stages:
            env = dict(os.environ, BENCH_MODELS=json.dumps(models), TOKENIZERS_PARALLELISM='false')
            out = subprocess.run([sys.executable, __file__, '--child', stage, '--device', args.device,
                                  '--batch', str(args.batch), '--steps', str(args.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f'stage {stage} failed:\n{out.stderr[-3000:]}')
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch
    size = 'real (InternViT-300M + Qwen2.5-1.5B, random weights)' if args.real else 'tiny'
    print(f'models: {size}; device: {args.device}; batch {args.batch} x (12 tiles + thumbnail); '
          f'torch {torch.__version__}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
    print(f'{"stage":24s} {"trainable":>12s} {"total":>12s} {"trainable %":>12s} {"peak MiB":>10s} {"s/step":>8s}')
    for r in rows:
        print(f'{r["stage"]:24s} {r["trainable"]:12,d} {r["total"]:12,d} {100 * r["trainable"] / r["total"]:11.2f}% '
              f'{r["peak_mb"]:10.1f} {r["step_s"]:8.3f}')


if __name__ == '__main__':
    main()
