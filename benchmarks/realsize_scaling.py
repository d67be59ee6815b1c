"""Scaling at real size on the CPU: time and memory of one training step against tiles per sample and tokens per pack.

Usage (after ``benchmarks/realsize.sh`` wrote the models into ``--work``)::

    python benchmarks/realsize_scaling.py --out DIR [--work work_dirs/realsize] [--tiles 1 4 7 13]
        [--pack-tokens 2048 4096 8192 16384]
    python benchmarks/realsize_scaling.py --out DIR --replan    # the planner's columns again, no training

Setting (a) of ``realsize.py`` (InternViT-300M + Qwen2.5-0.5B, full fine-tuning, ViT frozen, LLM checkpointing,
bf16 autocast) with ``attn_implementation='sdpa_segments'``, loaded once in one process. Each point is one
step (forward, backward, AdamW: our configs' options, ``--optimizer torch`` torch's defaults) after a warm-up
step of the same shape, on a synthetic batch built directly: one sample of ``T`` tiles (``256 T`` image tokens +
200 text tokens, 50 supervised) for the tiles series; for the pack series, packs of 1-tile samples (456 tokens
each) up to the token budget. Memory is the rise of the bytes glibc's malloc has in use (``rss.RssSampler``: read
by its thread and after every operator with a large output, ``RssSampler.ops``, as realsize.py's rows; the
resident set's rise where malloc is not glibc's) in two windows, the gradients already allocated (zeroed, not
freed): forward + backward (the activations and autocast's weight copies: what grows with the batch) and the
optimizer step (AdamW's temporaries), each beside the planner's figure for the same batch
(``planner.plan_memory(..., device='cpu')``: the larger of its forward and backward peaks; optimizer
temporaries). ``realsize.sh --scaling`` runs it with ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0``:
glibc hands freed blocks back, as the batches grow in one process. Writes ``scaling.json``, ``scaling.md`` and
``scaling.png`` (time and memory against each variable) into ``--out`` after every point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import train_loop  # noqa: E402
from benchmarks.realsize import SETTINGS  # noqa: E402
from benchmarks.roofline import model_weights, roofline, slow_bf16_refusal  # noqa: E402
from benchmarks.rss import RssSampler  # noqa: E402

TEXT, SUPERVISED = 200, 50


def sample(model, tiles: int, gen: torch.Generator) -> dict:
    """One item as the data set makes it: ``<IMG_CONTEXT>`` x 256 per tile, then text, the last 50 supervised."""
    size = model.geometry['image_size']
    image = torch.full((tiles * model.num_image_token,), model.img_context_token_id)
    ids = torch.cat([image, torch.randint(0, 500, (TEXT,), generator=gen)])
    labels = torch.full_like(ids, -100)
    labels[-SUPERVISED:] = ids[-SUPERVISED:]
    return dict(input_ids=ids, labels=labels, num_tiles=tiles, image_flags=torch.ones(tiles, dtype=torch.long),
                pixel_values=torch.randint(0, 256, (tiles, 3, size, size), dtype=torch.uint8, generator=gen))


def batch_for(model, kind: str, value: int, gen: torch.Generator):
    from xtuner_plugins.data import internvl_collate_fn
    from xtuner_plugins.data.packing import pack_items
    if kind == 'tiles':
        return internvl_collate_fn([sample(model, value, gen)])['data']
    per = model.num_image_token + TEXT
    return internvl_collate_fn([pack_items([sample(model, 1, gen) for _ in range(max(1, value // per))])])['data']


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='work_dirs/realsize/out')
    p.add_argument('--work', default='work_dirs/realsize')
    p.add_argument('--tiles', type=int, nargs='*', default=[1, 4, 7, 13])
    p.add_argument('--pack-tokens', type=int, nargs='*', default=[2048, 4096, 8192, 16384])
    p.add_argument('--loss-chunk', type=int, default=0,
                   help='the model\'s loss_chunk (default 0: the LM head on every supervised position at once)')
    p.add_argument('--optimizer', choices=('ours', 'torch'), default='ours',
                   help="AdamW with our configs' options (default: fused) or torch's defaults")
    p.add_argument('--replan', action='store_true',
                   help='only recompute the planner\'s columns of --out\'s scaling.json (no training)')
    args = p.parse_args()
    if args.replan:
        return replan(args.out, args.work)
    refusal = slow_bf16_refusal(roofline(), model_weights(args.work, SETTINGS['a']['llm']))
    if refusal:
        sys.exit(f'realsize_scaling: not run: {refusal}')
    from xtuner_plugins.models import VisionLanguageModel
    sampler = RssSampler()
    model = VisionLanguageModel(torch_dtype='bfloat16', from_scratch=True, compile_blocks=False,
                                **model_settings(args.work, args.loss_chunk)).train()
    adamw = train_loop.ours_adamw() if args.optimizer == 'ours' else {}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, **adamw)
    gen = torch.Generator().manual_seed(0)
    rows = []
    points = [('tiles', t) for t in args.tiles] + [('pack tokens', n) for n in args.pack_tokens]
    for kind, value in points:
        data = batch_for(model, kind, value, gen)
        for warm in (True, False):
            opt.zero_grad(set_to_none=False)   # gradients stay allocated: the windows see what the step adds
            sampler.mark()
            t = time.perf_counter()
            with sampler.ops():
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    loss = model(data, mode='loss')['loss']
                loss.backward()
                graph = sampler.rise()
                sampler.mark()
                opt.step()
                update = sampler.rise()
            seconds = time.perf_counter() - t
        rows_, length = data['input_ids'].shape
        row = dict(kind=kind, value=value, loss_chunk=args.loss_chunk, fused=adamw.get('fused', False),
                   tokens=length, tiles=int(data['num_tiles'].sum()), s=seconds,
                   supervised=int((data['labels'][:, 1:] != -100).sum()), rows=rows_,
                   measured_gib=graph / 2 ** 30, step_measured_gib=update / 2 ** 30)
        rows.append(planned(model, row))
        r = rows[-1]
        print(f'{kind:12s} {value:6d}: {r["tokens"]:6d} tokens, {r["tiles"]:3d} tiles, {r["s"]:7.1f} s/step; '
              f'forward+backward {r["measured_gib"]:6.2f} GiB measured, {r["planned_gib"]:6.2f} planned; '
              f'optimizer step {r["step_measured_gib"]:5.2f} measured, {r["step_planned_gib"]:5.2f} planned',
              flush=True)
        write(rows, args.out)   # after every point: a point killed for memory keeps the ones before it


def model_settings(work: str, loss_chunk: int) -> dict:
    """``VisionLanguageModel``'s settings for the series: setting (a), the LLM checkpointed, ``sdpa_segments``."""
    s = SETTINGS['a']
    return dict(vision_encoder=os.path.join(work, 'models', s['vision']), llm=os.path.join(work, 'models', s['llm']),
                projector=s['projector'], image_mode=s['image_mode'], freeze_vision=True, llm_grad_ckpt=True,
                attn_implementation='sdpa_segments', loss_chunk=loss_chunk, **s['model'])


def planned(model, row: dict) -> dict:
    """``row`` with the planner's figures for its batch (on the CPU): forward+backward (the larger of its forward
    and backward peaks, gradients apart) and the optimizer step's temporaries."""
    from xtuner_plugins.plan_activations import Batch
    from xtuner_plugins.planner import plan_memory
    plan = plan_memory(model, Batch(rows=row.get('rows', 1), length=row['tokens'], tiles=row['tiles'],
                                    supervised=row['supervised'], packed=row['kind'] != 'tiles'), 'bf16',
                       device='cpu', fused=row.get('fused', False))
    gib = 2 ** 30
    return dict(row, planned_gib=max(plan['forward_peak'], plan['backward_peak']) / gib,
                step_planned_gib=plan['optimizer_temporaries'] / gib,
                parts={k: v / gib for k, v in plan['parts'].items()})


def replan(out: str, work: str) -> None:
    """``--replan``: the planner's columns of ``out/scaling.json`` again (the model on the meta device), for a
    planner changed after the measurement; rewrites the table and the plot."""
    from xtuner_plugins.plan_configs.meta import build_meta_model
    with open(os.path.join(out, 'scaling.json')) as f:
        rows = json.load(f)
    if len({r.get('loss_chunk', 0) for r in rows}) > 1:
        raise SystemExit(f'{out}/scaling.json: rows of several loss_chunk settings')
    model = build_meta_model(model_settings(work, rows[0].get('loss_chunk', 0) if rows else 0))
    for r in rows:   # rows measured before 'supervised' was recorded: 50 a sample, packs of 1-tile samples
        r.setdefault('supervised', SUPERVISED * (1 if r['kind'] == 'tiles' else r['tiles']))
    write([planned(model, r) for r in rows], out)


def write(rows, out: str) -> None:
    """``scaling.json``, ``scaling.md`` (with each point's memory per 1k tokens over the point before: the linearity
    check) and ``scaling.png``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'scaling.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, 'scaling.md'), 'w') as f:
        f.write('| series | value | tokens | tiles | s/step | s per 1k tokens | forward+backward GiB measured | '
                'planned | GiB per 1k tokens more than the point before (linear: constant) | optimizer step GiB '
                'measured | planned |\n|---|---|---|---|---|---|---|---|---|---|---|\n')
        for i, r in enumerate(rows):
            before = rows[i - 1] if i and rows[i - 1]['kind'] == r['kind'] else None
            slope = (f'{1000 * (r["measured_gib"] - before["measured_gib"]) / (r["tokens"] - before["tokens"]):.3f}'
                     if before else '')
            f.write(f'| {r["kind"]} | {r["value"]} | {r["tokens"]} | {r["tiles"]} | {r["s"]:.1f} | '
                    f'{1000 * r["s"] / r["tokens"]:.1f} | {r["measured_gib"]:.2f} | {r["planned_gib"]:.2f} | {slope} | '
                    f'{r["step_measured_gib"]:.2f} | {r["step_planned_gib"]:.2f} |\n')
    plot(rows, os.path.join(out, 'scaling.png'))


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, label in ((axes[0], 'tiles', 'tiles per sample'), (axes[1], 'pack tokens', 'tokens per pack')):
        pts = [r for r in rows if r['kind'] == kind]
        if not pts:
            continue
        x = [r['value'] for r in pts]
        ax.plot(x, [r['s'] for r in pts], 'o-', color='tab:blue', label='s/step')
        ax.set_xlabel(label)
        ax.set_ylabel('s/step', color='tab:blue')
        twin = ax.twinx()
        twin.plot(x, [r['measured_gib'] for r in pts], 's-', color='tab:red', label='forward+backward (measured)')
        twin.plot(x, [r['planned_gib'] for r in pts], 's--', color='tab:orange', label='planner')
        twin.set_ylabel('GiB', color='tab:red')
        twin.legend(loc='upper left', fontsize=8)
    fig.suptitle('InternViT-300M + Qwen2.5-0.5B full fine-tuning, one step on the CPU (sdpa_segments)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    main()
