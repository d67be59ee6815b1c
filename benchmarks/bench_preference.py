"""Preference training at real size on this machine: one step of LoRA DPO (configs/dpo_lora.py's model) and of
full MPO (configs/mpo_full.py's: a frozen copy of the LLM and projector as the reference), as training runs it
(``now``: the LM head at the answers' positions only, ``logits_to_keep``; the frozen tower once per pair,
``preference.pair_features``) against ``before`` (until 2026-11-26, and what TRL's DPO does without padding-free
batches: every position's logits; the tower on each row's copy of the tiles, and again for the full reference).

Run from the repository root, alone on the machine (up to ~20 GB of memory for the whole-logits MPO row)::

    .venv/bin/python benchmarks/bench_preference.py [--work work_dirs/realsize] [--stages dpo_lora mpo_full]
        [--pairs 1] [--tiles 6] [--llm Qwen2.5-0.5B-Instruct]

The models are realsize.sh's (InternViT-300M-448px-V2_5 + the LLM, random weights in the real shapes; written into
``--work``/models when missing). Each row runs in its own process (its peak RSS is its own): ``--pairs`` pairs of
one 1200 x 900 image (``--tiles`` tiles and a thumbnail) and answers of about 150 and 110 words, bf16 autocast
with trained weights in fp32 (the CPU recipe), fused AdamW; one warm-up step, then ``--steps`` timed steps on the
same batch. Printed per row: s/step, peak RSS, the first step's loss; the two paths' first losses are checked
equal (they are the same sums).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = {   # the stage configs' model settings (configs/dpo_lora.py, configs/mpo_full.py)
    'dpo_lora': dict(freeze_vision=True, freeze_projector=True, freeze_llm=True,
                     llm_lora=dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear'),
                     preference=dict(types=('sigmoid', 'sft'), weights=(1.0, 0.0), beta=0.1)),
    'mpo_full': dict(freeze_vision=True, freeze_projector=False, freeze_llm=False,
                     preference=dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1)),
}
VISION = 'InternViT-300M-448px-V2_5'
WORDS = 'the small grey cat sits on a wooden table near the open window while rain falls outside'.split()


def write_pairs(folder: str, pairs: int) -> str:
    import numpy as np
    from PIL import Image
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(pairs):
        name = f'{i}.png'
        Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(
            os.path.join(folder, 'images', name))
        text = [WORDS[j % len(WORDS)] for j in rng.integers(0, len(WORDS), 300)]
        lines.append(dict(image=name, question='Describe the picture in detail, please.',
                          chosen=' '.join(text[:150]), rejected=' '.join(text[150:260])))
    path = os.path.join(folder, 'pairs.jsonl')
    with open(path, 'w') as f:
        f.writelines(json.dumps(x) + '\n' for x in lines)
    return path


def child(args) -> dict:
    import torch
    from xtuner_plugins.data import InternVLPreferenceDataset, preference_collate_fn
    from xtuner_plugins.models import VisionLanguageModel
    torch.manual_seed(0)
    models = {k: os.path.join(args.work, 'models', name) for k, name in (('vision', VISION), ('llm', args.llm))}
    if args.path == 'before':   # the LLM's forward as if it took no logits_to_keep (every position's logits), and
        from xtuner_plugins.models import preference   # the tower on every row's tiles
        VisionLanguageModel.llm_keeps_logits = property(lambda self: False)
        preference.pair_features = lambda model, pixel_values: None
    model = VisionLanguageModel(vision_encoder=models['vision'], llm=models['llm'], projector='pixel_shuffle_mlp',
                                torch_dtype='bfloat16', from_scratch=True, llm_grad_ckpt=True,
                                **STAGES[args.stage]).train()
    folder = os.path.join(args.work, 'preference')
    ds = InternVLPreferenceDataset(write_pairs(folder, args.pairs), image_folders=os.path.join(folder, 'images'),
                                   tokenizer=models['llm'], max_dynamic_patch=args.tiles, max_length=8192,
                                   cache_dir=os.path.join(folder, 'cache'), **model.geometry)
    batch = preference_collate_fn([ds[i] for i in range(args.pairs)])['data']
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    times, losses = [], []
    for _ in range(1 + args.steps):
        t = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(dict(batch), mode='loss')['loss']
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    labels = batch['labels']
    return dict(s_per_step=sum(times[1:]) / args.steps, loss=losses[0], rows=int(labels.shape[0]),
                length=int(labels.shape[1]), answers=int((labels[:, 1:] != -100).sum()),
                tiles=int(batch['pixel_values'].shape[0]),
                peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work', default='work_dirs/realsize')
    p.add_argument('--stages', nargs='+', default=list(STAGES), choices=list(STAGES))
    p.add_argument('--llm', default='Qwen2.5-0.5B-Instruct')
    p.add_argument('--pairs', type=int, default=1)
    p.add_argument('--tiles', type=int, default=6)
    p.add_argument('--steps', type=int, default=1)
    p.add_argument('--child', nargs=2, metavar=('STAGE', 'PATH'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.stage, args.path = args.child
        print('RESULT ' + json.dumps(child(args)), flush=True)
        return
    from benchmarks.realsize_data import ensure_models
    ensure_models(args.work, [VISION, args.llm])
    for stage in args.stages:
        first = {}
        for path in ('now', 'before'):
            cmd = [sys.executable, os.path.abspath(__file__), '--work', args.work, '--llm', args.llm,
                   '--pairs', str(args.pairs), '--tiles', str(args.tiles), '--steps', str(args.steps),
                   '--child', stage, path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
            if proc.returncode or not lines:
                print(f'{stage} {path}: FAILED (exit {proc.returncode}): '
                      f'{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}', flush=True)
                continue
            r = json.loads(lines[-1][7:])
            first[path] = r['loss']
            print(f'{stage:8s} {path:6s}  s/step {r["s_per_step"]:6.1f}  peak RSS {r["peak_gib"]:5.2f} GiB  '
                  f'loss {r["loss"]:.6f}  ({r["rows"]} rows of {r["length"]} tokens, {r["answers"]} answer tokens, '
                  f'{r["tiles"]} tiles)', flush=True)
        if len(first) == 2:
            rel = abs(first['now'] - first['before']) / max(abs(first['before']), 1e-12)
            print(f'{stage} loss check: rel {rel:.1e} -> {"OK" if rel < 1e-3 else "FAILED"} (tolerance 1e-3)',
                  flush=True)


if __name__ == '__main__':
    main()
