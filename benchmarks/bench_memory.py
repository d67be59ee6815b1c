"""Trainable parameters and peak memory per training stage, for each model family.

Usage::

    .venv/bin/python benchmarks/bench_memory.py                 # tiny models on the CPU (what CI can run)
    .venv/bin/python benchmarks/bench_memory.py --real --device cuda   # GPU: the real sizes below
    .venv/bin/python benchmarks/bench_memory.py --families llava --stages pretrain_mlp finetune_lora

Families (``FAMILIES``): ``internvit`` (InternViT-300M-448px + pixel-shuffle MLP + Qwen2.5-1.5B, 12 tiles +
thumbnail per image), ``siglip`` (SigLIP-so400m-384 + bilinear MLP + Qwen2.5-0.5B, one resized image) and
``llava`` (CLIP ViT-L/14-336 + LLaVA MLP + Qwen2.5-0.5B, one padded image).

Each stage is measured in a fresh process (so one stage's peak does not hide the next): the model is built
with the stage config's model settings (freezing, LoRA, 4-bit, gradient checkpointing), then a few
training steps (AdamW over the trainable parameters) run on one batch of ``--batch`` samples, each with
one image (12 tiles plus a thumbnail for a tiling family, one tile otherwise). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and
the process's peak resident set size (which includes the Python runtime and libraries) on a CPU.
``--real`` writes randomly initialised checkpoints with the real shapes (InternViT-300M-448px-V2_5:
1024 wide, 24 layers, 448 px; SigLIP-so400m: 1152 wide, 27 layers, 384 px; CLIP ViT-L/14-336: 1024 wide,
24 layers; Qwen2.5-1.5B: 1536 wide, 28 layers; Qwen2.5-0.5B: 896 wide, 24 layers; vocab 151936) into a temp
folder.
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

# stage -> VisionLanguageModel settings, as the stage configs set them
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
    # preference stages, on --batch rows (--batch / 2 pairs): LoRA DPO, whose reference is the adapters off
    # (configs/dpo_lora.py); full MPO, whose reference is a frozen copy of the LLM and projector (configs/mpo_full.py)
    'dpo_lora': dict(freeze_vision=True, freeze_projector=True, freeze_llm=True,
                     llm_lora=dict(r=16, lora_alpha=32, lora_dropout=0.05), preference=dict(beta=0.1)),
    'mpo_full': dict(freeze_vision=True, freeze_llm=False,
                     preference=dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1)),
}


# family -> (vision writer, real vision shape, projector, image mode, real LLM shape)
FAMILIES = {
    'internvit': ('write_tiny_internvit', dict(image_size=448, hidden_size=1024, num_layers=24, num_heads=16,
                                                intermediate_size=4096), 'pixel_shuffle_mlp', 'tile',
                  dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960)),
    'siglip': ('write_tiny_siglip', dict(image_size=384, hidden_size=1152, num_layers=27, num_heads=16,
                                         intermediate_size=4304), 'bilinear_mlp', 'resize',
               dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864)),
    'llava': ('write_tiny_clip', dict(image_size=336, hidden_size=1024, num_layers=24, num_heads=16,
                                      intermediate_size=4096), 'mlp', 'pad',
              dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864)),
}


def write_family_models(out: str, family: str, real: bool) -> dict:
    """Random checkpoints of one family in their real layouts (tiny, or ``real`` shapes) in ``out/family``:
    ``{vision, llm, projector, image_mode, image_size}``."""
    from xtuner_plugins.tiny import vision as tiny_vision
    from xtuner_plugins.tiny.llm import write_tiny_qwen2
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    writer, vision_shape, projector, mode, llm_shape = FAMILIES[family]
    out = os.path.join(out, family)
    vision_shape = vision_shape if real else {}
    llm_shape = dict(llm_shape, vocab_padding=151936 - len(build_tiny_tokenizer(add_internvl_tokens=False))) \
        if real else {}
    return dict(vision=getattr(tiny_vision, writer)(os.path.join(out, 'vision'), **vision_shape),
                llm=write_tiny_qwen2(os.path.join(out, 'llm'), **llm_shape), projector=projector, image_mode=mode,
                image_size=vision_shape.get('image_size', 56), family=family)


def write_models(out: str, real: bool) -> dict:
    """The InternViT family as ``{internvit, llm, image_size}`` (what ``bench_train.py`` trains)."""
    models = write_family_models(out, 'internvit', real)
    return dict(internvit=models['vision'], llm=models['llm'], image_size=models['image_size'])


def measure(stage: str, models: dict, device: str, batch: int, steps: int, snapshot: str = None) -> dict:
    """Runs in the child process. ``snapshot``: on cuda, record the allocator's history over the steps and dump
    it there (``torch.cuda.memory._dump_snapshot``: every allocation with its stack, for finding what is live at
    the peak; ``python -m torch.cuda._memory_viz trace_plot PATH -o trace.html`` draws it)."""
    import torch

    from xtuner_plugins.models import VisionLanguageModel
    from xtuner_plugins.models.parts import count_parameters
    settings = dict(STAGES[stage])
    if models['family'] != 'internvit':
        settings.pop('vision_drop_path', None)  # stochastic depth is InternViT's (InternVL stage 1.5)
    model = VisionLanguageModel(vision_encoder=models['vision'], llm=models['llm'], projector=models['projector'],
                                image_mode=models['image_mode'], llm_grad_ckpt=True, compile_blocks=False,
                                torch_dtype='bfloat16' if device == 'cuda' else 'float32', **settings)
    model.train()   # as the runner does: from_pretrained leaves the LLM in eval mode, where transformers does not
    # checkpoint its layers and dropout is off (this benchmark measured so before 2026-11-24)
    if 'llm_quantization' not in settings:
        model.to(device)
    else:
        model.vision_model.to(device)
        model.mlp1.to(device)
    counts = count_parameters(model)
    geometry = model.geometry
    s, per_tile = geometry['image_size'], geometry['num_image_token']
    tiles = 13 if geometry['image_mode'] == 'tile' else 1
    text = 64
    ids = torch.randint(0, 400, (batch, text + tiles * per_tile))
    ids[:, 8:8 + tiles * per_tile] = model.img_context_token_id
    data = dict(input_ids=ids.to(device), labels=ids.to(device), attention_mask=torch.ones_like(ids).bool().to(device),
                pixel_values=torch.randint(0, 256, (batch * tiles, 3, s, s), dtype=torch.uint8).to(device),
                image_flags=torch.ones(batch * tiles, dtype=torch.long).to(device))
    if 'preference' in settings:  # the first half of the rows are the chosen answers, the second the rejected
        if batch % 2:
            raise SystemExit(f'{stage}: a preference stage needs an even --batch (pairs of rows), not {batch}')
        data['num_pairs'] = batch // 2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200000)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            loss = model(data, mode='loss')['loss']
        loss.backward()
        opt.step()
        opt.zero_grad()   # as MMEngine's OptimWrapper.update_params: no gradients held through the next forward
    seconds = (time.perf_counter() - start) / steps
    if device == 'cuda' and snapshot:
        torch.cuda.memory._dump_snapshot(snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(stage=stage, tokens=per_tile * tiles, **counts, peak_mb=round(peak, 1), step_s=round(seconds, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--real', action='store_true', help='real model shapes (random weights; needs a GPU)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to train (default cpu)')
    parser.add_argument('--batch', type=int, default=2, help='samples per step, one 13-tile image each (default 2)')
    parser.add_argument('--steps', type=int, default=2, help='training steps per stage (default 2)')
    parser.add_argument('--stages', nargs='*', default=list(STAGES), help='stages to measure (default: all)')
    parser.add_argument('--families', nargs='*', default=list(FAMILIES), choices=list(FAMILIES),
                        help='model families to measure (default: all)')
    parser.add_argument('--snapshot', metavar='DIR', default=None,
                        help="on cuda: dump each stage's allocator history to DIR/FAMILY_STAGE.pickle (what is live "
                             'at the peak, with stacks; a diagnosis of a stage the planner misses)')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, json.loads(os.environ['BENCH_MODELS']), args.device, args.batch,
                                 args.steps, args.snapshot)))
        return
    rows = []
    if args.snapshot:
        os.makedirs(args.snapshot, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='bench_memory_') as tmp:
        for family in args.families:
            models = write_family_models(tmp, family, args.real)
            for stage in args.stages:
                env = dict(os.environ, BENCH_MODELS=json.dumps(models), TOKENIZERS_PARALLELISM='false')
                snap = ['--snapshot', os.path.join(args.snapshot, f'{family}_{stage}.pickle')] if args.snapshot else []
                out = subprocess.run([sys.executable, __file__, '--child', stage, '--device', args.device,
                                      '--batch', str(args.batch), '--steps', str(args.steps), *snap],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f'{family} {stage} failed:\n{out.stderr[-3000:]}')
                rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), family=family))
    import torch
    size = 'real sizes, random weights' if args.real else 'tiny'
    print(f'models: {size}; device: {args.device}; batch {args.batch}, one image each; '
          f'torch {torch.__version__}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
    print(f'{"family":10s} {"stage":22s} {"img tokens":>10s} {"trainable":>12s} {"total":>12s} {"trainable %":>12s} '
          f'{"peak MiB":>10s} {"s/step":>8s}')
    for r in rows:
        print(f'{r["family"]:10s} {r["stage"]:22s} {r["tokens"]:10d} {r["trainable"]:12,d} {r["total"]:12,d} '
              f'{100 * r["trainable"] / r["total"]:11.2f}% {r["peak_mb"]:10.1f} {r["step_s"]:8.3f}')


if __name__ == '__main__':
    main()
