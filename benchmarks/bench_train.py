"""Training throughput: packed against unpacked batches, on the same samples in the same run.

Usage::

    .venv/bin/python benchmarks/bench_train.py                       # tiny models on the CPU: ratios only
    .venv/bin/python benchmarks/bench_train.py --real --device cuda  # GPU: InternViT-300M + Qwen2.5-1.5B

It writes a synthetic data set (images of varied aspect ratios, so tile counts vary; answers of varied
length) and trains the full fine-tuning setting (projector + LLM) for ``--steps`` steps each way:
unpacked (``--batch`` samples per step, padded) and packed (one pack of up to ``--max-tokens`` tokens per
step). Both see the same samples. Reported: tokens/s counting real (non-padding) tokens, samples/s, and
the share of step time spent waiting for data. On a CPU with tiny models only the ratios mean anything.
XTuner 0.2.0's own InternVL path needs an official InternVL folder with its remote code, which the
converter (not yet written) produces; it is reported as skipped until then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_memory import write_models  # noqa: E402
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn  # noqa: E402
from xtuner_plugins.data.packing import PackedInternVLDataset  # noqa: E402
from xtuner_plugins.models import InternVLModel  # noqa: E402

SIZES = [(800, 600), (600, 800), (1200, 400), (448, 448), (1600, 900), (300, 1000)]


def write_data(folder: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    path = os.path.join(folder, 'data.jsonl')
    with open(path, 'w') as f:
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(folder, 'images', f'{i}.jpg'))
            answer = ' '.join(['word'] * int(rng.integers(5, 120)))
            f.write(json.dumps({'image': f'{i}.jpg', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': answer}]}) + '\n')
    return path


def run(model, loader, steps, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = samples = 0
    data_time = 0.0
    it = iter(loader)
    for step in range(steps + 1):  # step 0 warms up and is not counted
        t0 = time.perf_counter()
        batch = next(it)['data']
        t1 = time.perf_counter()
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
            loss = model(batch, mode='loss')['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == 'cuda':
            torch.cuda.synchronize()
        if step == 0:
            start = time.perf_counter()
            continue
        data_time += t1 - t0
        tokens += int(batch['attention_mask'].sum())
        samples += (sum(len(s) for s in batch['seq_lens']) if 'seq_lens' in batch
                    else batch['input_ids'].shape[0])
    total = time.perf_counter() - start
    return dict(tokens_per_s=tokens / total, samples_per_s=samples / total, data_share=data_time / total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--real', action='store_true', help='real model shapes (random weights; needs a GPU)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to train (default cpu)')
    p.add_argument('--samples', type=int, default=48, help='synthetic samples (default 48)')
    p.add_argument('--batch', type=int, default=4, help='unpacked samples per step (default 4)')
    p.add_argument('--max-tokens', type=int, default=None,
                   help='tokens per pack (default: 16384 with --real, else 4 x the mean sample length)')
    p.add_argument('--steps', type=int, default=6, help='timed steps each way (default 6)')
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers (default 2)')
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        models = write_models(os.path.join(tmp, 'models'), args.real)
        data = write_data(os.path.join(tmp, 'data'), args.samples)
        ds = InternVLDataset(data, image_folders=os.path.join(tmp, 'data', 'images'), tokenizer=models['llm'],
                             image_size=models['image_size'], max_dynamic_patch=12, cache_dir=os.path.join(tmp, 'c'))
        max_tokens = args.max_tokens or (16384 if args.real else int(4 * np.mean(ds.length)))
        packed = PackedInternVLDataset(ds, max_tokens=max_tokens, max_tiles=None, seed=0)
        model = InternVLModel(vision_encoder=models['internvit'], llm=models['llm'], freeze_llm=False,
                              llm_grad_ckpt=args.real, torch_dtype='bfloat16' if args.device == 'cuda' else 'float32')
        model.to(args.device).train()
        def loader(dataset, batch_size):
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10 ** 6,
                                                     generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                               num_workers=args.workers, collate_fn=internvl_collate_fn,
                                               pin_memory=args.device == 'cuda')
        unpacked_loader, packed_loader = loader(ds, args.batch), loader(packed, 1)
        results = {'unpacked': run(model, unpacked_loader, args.steps, args.device),
                   'packed': run(model, packed_loader, args.steps, args.device)}
    size = 'real (InternViT-300M + Qwen2.5-1.5B, random weights)' if args.real else 'tiny'
    print(f'models: {size}; device: {args.device}; {args.samples} samples, mean {np.mean(ds.length):.0f} tokens; '
          f'unpacked batch {args.batch}, packs of <= {max_tokens} tokens ({len(packed)} packs); '
          f'{args.steps} timed steps each; torch {torch.__version__}, {os.cpu_count()} CPUs')
    print(f'{"path":12s} {"tokens/s":>10s} {"samples/s":>10s} {"data share":>10s}')
    for name, r in results.items():
        print(f'{name:12s} {r["tokens_per_s"]:10.1f} {r["samples_per_s"]:10.2f} {r["data_share"]:10.1%}')
    print('xtuner 0.2.0 InternVL path: skipped (needs an official InternVL folder with remote code; converter issue)')
    print(f'packed/unpacked tokens/s: {results["packed"]["tokens_per_s"] / results["unpacked"]["tokens_per_s"]:.2f}')


if __name__ == '__main__':
    main()
