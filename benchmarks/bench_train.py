"""Training throughput and MFU: packed against unpacked batches, on the same samples in the same run.

Usage::

    .venv/bin/python benchmarks/bench_train.py                                    # tiny models on the CPU: ratios only
    .venv/bin/python benchmarks/bench_train.py --real --device cuda               # GPU: InternViT-300M + Qwen2.5-0.5B
    .venv/bin/python benchmarks/bench_train.py --real --llm 1.5b --device cuda    # GPU: InternViT-300M + Qwen2.5-1.5B
    .venv/bin/python benchmarks/bench_train.py --real --llm 1.5b --dry-run        # shapes and FLOPs per step only
    .venv/bin/python benchmarks/bench_train.py --paths packed --workdir W --json W/packed.json   # one row
    .venv/bin/python benchmarks/bench_train.py --precision-check 4                # bf16 against fp32, no timing

``--paths`` picks the rows, ``--workdir`` keeps the written models and data for the next run (``benchmarks/gpu.py``
runs each row in its own process on one folder), ``--json`` writes the raw figures.

It writes a synthetic data set (every image has an aspect ratio that InternVL's dynamic tiling maps to a
12-tile grid, so each image is 12 tiles plus a thumbnail; answers of varied length) and trains the full
fine-tuning setting (projector + LLM; the vision tower frozen) for ``--steps`` steps each way: unpacked
(``--batch`` samples per step, padded) and packed (one pack of up to ``--max-tokens`` tokens per step).
Both see the same samples. Reported per path: tokens/s counting real (non-padding) tokens, samples/s, model
FLOPs per step and achieved TFLOPS (see ``flops.train_step_flops`` for how they are counted from the model
shapes), MFU (achieved / peak; the peak comes from ``--peak-tflops`` or, on a GPU, from
``flops.PEAK_TFLOPS`` by device name), the share of step time spent waiting for data, the share of padding in
the rows and the peak memory (``torch.cuda.max_memory_allocated`` on a GPU; the process's peak resident set
size on a CPU, which never decreases, so the second path's figure includes the first's).

``--real`` writes randomly initialised checkpoints with the real shapes (InternViT-300M-448px-V2_5 and
Qwen2.5-0.5B or -1.5B) and trains them in bf16 autocast with LLM gradient checkpointing, with InternVL's real vocabulary of
151674 rows in the embeddings and ``lm_head`` (the texts come from the project's tiny tokenizer, so only the
first few hundred rows are ever looked up; the LM head computes all 151674 logits, at the supervised
positions only, and at every token in XTuner's path).
``--dry-run`` builds the configs, the data set and the model modules on PyTorch's ``meta`` device (shapes,
no memory), checks the FLOPs formula's matmul sizes against those modules and prints the FLOPs per step of
both paths without training; it works on a CPU at the real sizes.

XTuner 0.2.0's own InternVL training path (``xtuner.model.InternVL_V1_5``) is the third row, ``xtuner``,
trained on exactly the unpacked path's batches (same samples, same order, same padding). Our model, as
built and before any step, is written as an official InternVL folder with remote code by the converter's
writer (``xtuner_plugins.models.export.write_official`` on the in-memory model: the same tensors, so the
``--real`` vocabulary resize is included); ``InternVL_V1_5(model_path=folder, freeze_visual_encoder=True,
freeze_llm=False)`` loads it (it always trains ``mlp1``, so it trains what ours trains: projector + LLM).
XTuner loads every weight in bf16 (hard-coded); the bench then gives each tensor the dtype and the exact
value it has in our model (fp32 on a CPU; on a GPU the frozen ViT in bf16 and the trained parts in fp32,
as ours keeps them) and sets the LLM's gradient checkpointing (on with ``--real``, off otherwise) and
attention implementation as ours. Same optimizer (AdamW over the trained parameters), same steps, same
bf16 autocast on a GPU. Its inputs are our data pipeline's tokenised samples and tiles ("the same
inputs"; XTuner's ``InternVL_V1_5_Dataset`` tokenises with its own template code, so it would not give
the same tokens): each batch is converted in the timed step, on the device, to what ``InternVL_V1_5.forward``
reads (tiles normalised to float per sample, as XTuner's data set makes them; ``position_ids`` 0..L-1 as
XTuner's ``default_collate_fn`` makes them). XTuner has no packed multimodal batches (its collate refuses
images with varlen attention). Differences that remain are XTuner's own: its remote-code ViT runs SDPA
(ours runs ``--attn``), its forward computes the image flags from pixel sums and clones the embeddings.

Before timing, a check on one batch (the first ``--batch`` samples, before training): XTuner's loss must
equal ours (both are the token mean of the shifted cross-entropy) and the gradient norm of every trained
tensor must match, within 1e-4 relative in fp32 on a CPU and 2e-2 under bf16 autocast on a GPU; the
result is printed, and a failed check marks the ratios as not comparable. XTuner's forward calls
``torch.distributed.get_rank()``, so a single-process gloo group is created when none exists. If XTuner's
path cannot run, the reason is printed instead of its numbers (``--no-xtuner`` leaves it out).

On a CPU with tiny models only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flops import (PEAK_TFLOPS, ModelShapes, default_peak_tflops, matmul_parameters,  # noqa: E402
                              meta_matmul_parameters, model_shapes, train_step_flops)
from benchmarks.synthetic import REAL_LLMS, REAL_VOCAB, TRAINED, folder_configs, prepare, real_configs  # noqa: E402
from benchmarks.train_loop import (check_step, compare_checks, format_check, format_precision,  # noqa: E402
                                   ours_adamw, ours_loss, precision_check, run, trained_parameters)
from benchmarks.xtuner_row import (CHECK_TOLERANCE, build_xtuner_model, ensure_process_group,  # noqa: E402
                                   write_official_folder, xtuner_loss)
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn  # noqa: E402
from xtuner_plugins.data.packing import PackedInternVLDataset  # noqa: E402
from xtuner_plugins.models import VisionLanguageModel  # noqa: E402
from xtuner_plugins.models.attention import SEGMENT_ATTENTION, SEGMENTED, VARLEN_ATTENTION  # noqa: E402


# The rows: ours on padded batches, ours on packs, XTuner 0.2.0's InternVL_V1_5 on the padded batches.


PATHS = ('unpacked', 'packed', 'xtuner')


def step_plans(ds, packed, batch: int) -> Dict[str, List[Tuple[List[int], List[int]]]]:
    """(seq_lens, tiles) of every step of both paths over the data set, from its header-based estimates:
    unpacked batches of consecutive samples, and the packs."""
    lengths, tiles = ds.length, ds.num_tiles_per_item
    unpacked = [(lengths[i:i + batch], tiles[i:i + batch]) for i in range(0, len(lengths) - batch + 1, batch)]
    packs = [([lengths[i] for i in pack], [tiles[i] for i in pack]) for pack in packed.packs]
    return dict(unpacked=unpacked, packed=packs)


def dry_run(args, shapes: ModelShapes, vision_config, llm_config, ds, packed, peak: Optional[float]) -> None:
    formula = matmul_parameters(shapes)
    expected = dict(patch_embed=formula['patch_embed'], vit_layers=shapes.vit_layers * formula['vit_layer'],
                    projector=formula['projector'], llm_layers=shapes.llm_layers * formula['llm_layer'],
                    lm_head=formula['lm_head'])
    built = meta_matmul_parameters(vision_config, llm_config, shapes.downsample_ratio)
    print(f'shapes: {dataclasses.asdict(shapes)}')
    print(f'  ViT tokens per tile {shapes.vit_tokens_per_tile}, LLM tokens per tile {shapes.image_tokens_per_tile}, '
          f'mlp1 {shapes.projector_in} -> {shapes.llm_hidden} -> {shapes.llm_hidden}')
    print(f'{"matmul weights":16s} {"formula":>14s} {"meta modules":>14s}')
    for key in expected:
        print(f'{key:16s} {expected[key]:14,d} {built[key]:14,d}')
    if expected != built:
        raise SystemExit('the FLOPs formula and the modules built from the configs disagree')
    print(f'tiles per sample: {sorted(set(ds.num_tiles_per_item))}; mean {np.mean(ds.length):.0f} tokens per sample')
    print(f'{"path":10s} {"steps":>6s} {"tokens":>8s} {"samples":>8s} {"vision":>9s} {"projector":>9s} {"llm":>9s} '
          f'{"lm_head":>9s} {"TFLOP/step":>10s} {"fwd TFLOP":>10s}' + (f' {"s @45% MFU":>10s}' if peak else ''))
    plans_by_path = {k: v for k, v in step_plans(ds, packed, args.batch).items() if k in args.paths}
    if 'xtuner' in args.paths and not args.no_xtuner:
        plans_by_path['xtuner'] = plans_by_path['unpacked']  # XTuner trains the unpacked path's batches
    for name, plans in plans_by_path.items():
        per = [train_step_flops(shapes, lens, tiles, **TRAINED) for lens, tiles in plans]
        mean = {k: np.mean([p[k] for p in per]) / 1e12 for k in per[0]}
        line = (f'{name:10s} {len(plans):6d} {np.mean([sum(lens) for lens, _ in plans]):8.0f} '
                f'{np.mean([len(lens) for lens, _ in plans]):8.2f} {mean["vision"]:9.4g} {mean["projector"]:9.4g} '
                f'{mean["llm"]:9.4g} {mean["lm_head"]:9.4g} {mean["total"]:10.4g} {mean["forward"]:10.4g}')
        if peak:
            line += f' {mean["total"] / (0.45 * peak):10.4g}'
        print(line)
    print('(TFLOP per step: model FLOPs of training with the ViT frozen, projector + LLM trained; see '
          'train_step_flops. lm_head is counted at every token here, an upper bound: a training run counts it '
          'at the supervised tokens only, the logits the model computes. No weights were allocated and nothing '
          'was trained.)')
    if 'xtuner' in args.paths and not args.no_xtuner:
        found = importlib.util.find_spec('xtuner') is not None
        print('XTuner 0.2.0 InternVL_V1_5 (row xtuner): the unpacked batches (same FLOPs); '
              + ('xtuner is installed' if found else 'xtuner is NOT installed: a training run would skip it'))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--real', action='store_true', help='real model shapes (random weights; needs a GPU)')
    p.add_argument('--llm', choices=sorted(REAL_LLMS), default=None,
                   help='Qwen2.5 size for --real (default 0.5b, as in InternVL2_5-1B)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to train (default cpu)')
    p.add_argument('--samples', type=int, default=48, help='synthetic samples (default 48)')
    p.add_argument('--batch', type=int, default=4, help='unpacked samples per step (default 4)')
    p.add_argument('--max-tokens', type=int, default=None,
                   help='tokens per pack (default: 16384 with --real, else 4 x the mean sample length)')
    p.add_argument('--steps', type=int, default=20, help='timed steps each way (default 20)')
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers (default 8 with --real, else 2)')
    p.add_argument('--attn', choices=['sdpa', 'flash_attention_2', 'eager', 'flex_attention', *SEGMENTED],
                   default=None,
                   help='attention kernels (default: flash_attention_2 on cuda when flash_attn is installed, '
                        'else sdpa, whose packed rows use a dense block-diagonal mask); flex_attention: the LLM '
                        'on compiled FlexAttention with a document-causal BlockMask (no flash_attn needed; '
                        f'cuda only, as FlexAttention has no backward on a CPU); {SEGMENT_ATTENTION}: causal SDPA '
                        f'on each packed sample (no mask); {VARLEN_ATTENTION}: a batch\'s packed samples in one '
                        'varlen_attn call on cuda; XTuner\'s row runs sdpa for the last three')
    p.add_argument('--llm-ckpt', choices=['keep_attention', 'full', 'none'], default='keep_attention',
                   help="our LLM's gradient checkpointing with --real (default keep_attention; models/recompute.py); "
                        "XTuner's row always recomputes whole layers, as XTuner does")
    p.add_argument('--llm-ckpt-layers', type=int, default=None, metavar='N',
                   help="only the LLM's first N decoder layers checkpointed (the model's llm_grad_ckpt_layers; "
                        'default all; without --real it turns checkpointing on)')
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='peak FLOPS of the device in TFLOPS for MFU (default on cuda: from the device name, '
                        f'{", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS)} bf16 dense; on cpu: no MFU)')
    p.add_argument('--no-xtuner', action='store_true',
                   help="leave out XTuner 0.2.0's InternVL path (InternVL_V1_5 on the unpacked batches)")
    p.add_argument('--compile-blocks', action='store_true',
                   help="the model's compile_blocks=True (each LLM and vision block under torch.compile; two "
                        "warm-up steps); default eager")
    p.add_argument('--liger-kernel', nargs='*', default=None, metavar='PART',
                   help="the model's liger_kernel: Liger Kernel's RMSNorm, SwiGLU, RoPE and fused loss (CUDA), or "
                        'the parts named (models/liger.py); first the loss and gradients of one pack without and '
                        'with them are compared')
    p.add_argument('--dry-run', action='store_true',
                   help='build configs, data and meta-device modules and print the FLOPs per step; no weights, '
                        'no training')
    p.add_argument('--paths', nargs='+', choices=PATHS, default=list(PATHS), help='rows to measure (default: all)')
    p.add_argument('--precision-check', type=int, default=None, metavar='STEPS',
                   help='instead of timing: train STEPS steps on the first packs in bf16 (as the timed rows) and '
                        'in fp32 from the same weights and compare the losses (see precision_check)')
    p.add_argument('--workdir', default=None,
                   help='keep the written models and data set here and reuse them in later runs (default: a '
                        'temporary folder)')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the raw figures to PATH as JSON')
    p.add_argument('--cudnn-sdpa', action='store_true',
                   help="leave PyTorch's cuDNN SDPA backend on (our model's cudnn_attention=True; it turns it off "
                        'by default, process-wide, so the XTuner row runs the same attention kernels as ours)')
    p.add_argument('--profile', default=None, metavar='PATH',
                   help="profile our first row's timed steps with torch.profiler and write its table of operators "
                        'by device time to PATH (a diagnosis: that row\'s timings are not figures)')
    args = p.parse_args()
    if args.llm is not None and not args.real:
        p.error('--llm selects the real-size LLM; it needs --real')
    if args.llm_ckpt_layers is not None and args.llm_ckpt == 'none':
        p.error('--llm-ckpt-layers needs checkpointing (--llm-ckpt keep_attention or full)')
    if args.device == 'cuda' and not args.dry_run and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available')
    if args.attn == 'flex_attention' and args.device == 'cpu' and not args.dry_run:
        p.error("--attn flex_attention trains on cuda only (torch's FlexAttention has no backward on a CPU)")
    if args.samples < args.batch or args.steps < 1 or args.batch < 1:
        p.error('need --steps >= 1 and --samples >= --batch >= 1')
    if args.precision_check is not None and args.precision_check < 1:
        p.error('--precision-check needs at least 1 step')
    paths = [x for x in PATHS if x in args.paths and not (x == 'xtuner' and args.no_xtuner)]
    llm_size = args.llm or '0.5b'
    workers = args.workers if args.workers is not None else (8 if args.real else 2)
    attn = args.attn or ('flash_attention_2' if args.device == 'cuda' and importlib.util.find_spec('flash_attn')
                         else 'sdpa')
    peak = args.peak_tflops
    if peak is None and args.device == 'cuda' and torch.cuda.is_available():
        peak = default_peak_tflops(torch.cuda.get_device_name())
    size = f'real (InternViT-300M + Qwen2.5-{llm_size.upper()}, random weights)' if args.real else 'tiny'
    if args.real and args.device == 'cpu' and not args.dry_run:
        print('warning: real sizes on the CPU take minutes per step', file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        models, data = prepare(work, args.real, llm_size, args.samples, weights=not args.dry_run)
        ds = InternVLDataset(data, image_folders=os.path.join(work, 'data', 'images'), tokenizer=models['llm'],
                             image_size=models['image_size'], max_dynamic_patch=12, cache_dir=os.path.join(work, 'c'))
        max_tokens = args.max_tokens or (16384 if args.real else int(4 * np.mean(ds.length)))
        packed = PackedInternVLDataset(ds, max_tokens=max_tokens, max_tiles=None, seed=0)
        tiles = '/'.join(map(str, sorted(set(ds.num_tiles_per_item))))
        header = (f'models: {size}; device: {args.device}; attention: {attn}; LLM checkpointing: '
                  f'{args.llm_ckpt if args.real or args.llm_ckpt_layers is not None else "none"}'
                  f'{f" (first {args.llm_ckpt_layers} layers)" if args.llm_ckpt_layers is not None else ""}; cuDNN SDPA {"on" if args.cudnn_sdpa else "off"}; '
                  f'{args.samples} samples of {tiles} '
                  f'tiles, mean {np.mean(ds.length):.0f} tokens; unpacked batch {args.batch}, packs of <= '
                  f'{max_tokens} tokens ({len(packed)} packs)')
        if args.dry_run:
            vision_config, llm_config = real_configs(llm_size) if args.real else folder_configs(models)
            shapes = model_shapes(vision_config, llm_config, 0.5)
            print(f'{header}; dry run; torch {torch.__version__}')
            dry_run(args, shapes, vision_config, llm_config, ds, packed, peak)
            return
        precision = args.precision_check is not None
        model = VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], **TRAINED,
                                    compile_blocks=args.compile_blocks,
                                    llm_grad_ckpt=(args.real or args.llm_ckpt_layers is not None) and (
                                        False if args.llm_ckpt == 'none' else args.llm_ckpt),
                                    llm_grad_ckpt_layers=args.llm_ckpt_layers,
                                    attn_implementation=attn, cudnn_attention=args.cudnn_sdpa,
                                    torch_dtype='bfloat16' if args.device == 'cuda' and not precision else 'float32')
        if args.real:  # the tiny tokenizer made the vocabulary small: give the LM head its real width back
            model.language_model.resize_token_embeddings(REAL_VOCAB, mean_resizing=False)
        model.to(args.device).train()
        if args.profile:   # the profile's split puts the tower's forward and the norms in their own kinds
            from benchmarks.profile_kinds import mark_modules
            mark_modules(model, model.vision_model)
        shapes = model_shapes(model.vision_model.config, model.language_model.config, model.downsample_ratio)
        if shapes.vocab_size != model.language_model.get_output_embeddings().weight.shape[0]:
            raise SystemExit(f'config vocab {shapes.vocab_size} != lm_head rows '
                             f'{model.language_model.get_output_embeddings().weight.shape[0]}')
        if precision:
            batches = [internvl_collate_fn([packed[i % len(packed)]])['data'] for i in range(args.precision_check)]
            result = precision_check(model, batches, args.device)
            print(f'{header}; torch {torch.__version__}')
            print(format_precision(result))
            write_json(args.json, dict(header=header, precision=result))
            return

        def loader(dataset, batch_size):
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10 ** 6,
                                                     generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                               num_workers=workers, collate_fn=internvl_collate_fn,
                                               pin_memory=args.device == 'cuda')

        xtuner_skip, folder, ours_check, check, liger_check = None, None, None, None, None
        if args.liger_kernel is not None:   # Liger's kernels against the eager model on one pack, then the rows
            from xtuner_plugins.models.liger import apply_liger, check_liger
            first = internvl_collate_fn([packed[0]])['data']
            eager = check_step(lambda b: ours_loss(model, b), trained_parameters(model), first, args.device)
            model.liger_kernel = apply_liger(model.language_model, check_liger(args.liger_kernel or True))
            liger_check = compare_checks(eager, check_step(lambda b: ours_loss(model, b), trained_parameters(model),
                                                           first, args.device), CHECK_TOLERANCE[args.device])
            liger_check['parts'] = list(model.liger_kernel)
        if 'xtuner' not in paths:
            xtuner_skip = 'left out (--no-xtuner)' if args.no_xtuner else 'left out (--paths)'
        elif importlib.util.find_spec('xtuner') is None:
            xtuner_skip = 'skipped: xtuner is not installed'
        if xtuner_skip is None:  # before any training step: the folder holds the weights both paths start from
            check_batch = internvl_collate_fn([ds[i] for i in range(args.batch)])['data']
            try:
                folder = write_official_folder(model, os.path.join(tmp, 'official'), models['image_size'])
                ours_check = check_step(lambda b: ours_loss(model, b), trained_parameters(model), check_batch,
                                        args.device)
            except Exception as e:  # noqa: BLE001 -- the reason is printed instead of XTuner's numbers
                xtuner_skip = f'could not run: preparing its folder and check failed: {type(e).__name__}: {e}'
        # compiled code is built at the first shape and again, with dynamic shapes, at the second
        results, warmup = {}, 2 if attn == 'flex_attention' or args.compile_blocks else 1
        if 'unpacked' in paths:
            results['unpacked'] = run(model, loader(ds, args.batch), args.steps, args.device, shapes,
                                      adamw=ours_adamw(), profile=args.profile, warmup=warmup)
        if 'packed' in paths:
            results['packed'] = run(model, loader(packed, 1), args.steps, args.device, shapes, adamw=ours_adamw(),
                                    profile=None if 'unpacked' in paths else args.profile, warmup=warmup)
        if xtuner_skip is None:
            del model  # one model on the device at a time
            gc.collect()
            if args.device == 'cuda':
                torch.cuda.empty_cache()
            created = False
            try:
                created = ensure_process_group(tmp)
                xt = build_xtuner_model(folder, args.device, grad_ckpt=args.real,
                                        attn='sdpa' if attn in ('flex_attention', *SEGMENTED) else attn)
                check = compare_checks(ours_check, check_step(lambda b: xtuner_loss(xt, b),
                                                              trained_parameters(xt.model), check_batch, args.device),
                                       CHECK_TOLERANCE[args.device])
                results['xtuner'] = run(xt, loader(ds, args.batch), args.steps, args.device, shapes,
                                        step_loss=lambda b: xtuner_loss(xt, b), freeze=TRAINED,
                                        img_context_token_id=xt.model.img_context_token_id)
            except Exception as e:  # noqa: BLE001 -- the reason is printed instead of XTuner's numbers
                xtuner_skip = f'could not run: {type(e).__name__}: {e}'
            finally:
                if created:
                    torch.distributed.destroy_process_group()
    cpu = platform.processor() or platform.machine()
    machine = (torch.cuda.get_device_name() if args.device == 'cuda' else
               f'{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads')
    print(f'{header}; {args.steps} timed steps each, {workers} workers; torch {torch.__version__}; {machine}')
    print(f'{"path":10s} {"tokens/s":>10s} {"samples/s":>10s} {"TFLOP/step":>11s} {"TFLOPS":>9s} {"MFU":>7s} '
          f'{"data share":>10s} {"pad share":>9s} {"peak MiB":>9s}')
    for name, r in results.items():
        r['mfu'] = r['tflops'] / peak if peak else None
        mfu = f'{r["mfu"]:7.1%}' if peak else f'{"n/a":>7s}'
        print(f'{name:10s} {r["tokens_per_s"]:10.1f} {r["samples_per_s"]:10.2f} {r["flops_per_step"] / 1e12:11.4g} '
              f'{r["tflops"]:9.4g} {mfu} {r["data_share"]:10.1%} {r["pad_share"]:9.1%} {r["peak_mib"]:9.0f}')
    if peak:
        print(f'MFU against a peak of {peak:g} TFLOPS')
    else:
        print('MFU needs a peak: pass --peak-tflops (the achieved TFLOPS above are model FLOPs per second)')
    if 'xtuner' in results:
        from importlib.metadata import version
        print(f'XTuner {version("xtuner")} InternVL_V1_5 (row xtuner): the unpacked batches (same samples and '
              f'order, tokenised and tiled by our pipeline, converted to its input format on the device in the timed '
              f'step); the same weights, dtypes, trained parts (mlp1 + LLM), optimizer and autocast; LLM gradient '
              f'checkpointing {"on" if args.real else "off"} and LLM attention {attn} as ours, its own ViT attention '
              f'(SDPA)')
    if check is not None:
        print(format_check(check))
    if liger_check is not None:
        c = liger_check
        print(f'liger check ({", ".join(c["parts"])}; one pack, before training): eager {c["loss_ours"]:.6f}, '
              f'liger {c["loss_xtuner"]:.6f} (rel {c["loss_rel"]:.2e}); gradient norms of {c["tensors"]} tensors: '
              f'max diff {c["grad_rel"]:.2e} of the largest -> {"OK" if c["ok"] else "FAILED"} '
              f'(tolerance {c["tolerance"]:g})')
    if xtuner_skip is not None:
        print(f'XTuner 0.2.0 InternVL path: {xtuner_skip}')
    if 'xtuner' in results:
        x = results['xtuner']
        flag = '' if check['ok'] else ' (loss check FAILED: not the same computation, not comparable)'
        ratios = {k: (results[k]['tokens_per_s'] / x['tokens_per_s'], results[k]['samples_per_s'] / x['samples_per_s'])
                  for k in ('unpacked', 'packed') if k in results}
        if ratios:
            print(f'ours/xtuner tokens/s: {", ".join(f"{k} {t:.2f}" for k, (t, _) in ratios.items())}; samples/s: '
                  f'{", ".join(f"{k} {v:.2f}" for k, (_, v) in ratios.items())} (goal on a GPU: >= 1.5){flag}')
    if 'packed' in results and 'unpacked' in results:
        ratio = results['packed']['tokens_per_s'] / results['unpacked']['tokens_per_s']
        print(f'packed/unpacked tokens/s: {ratio:.2f}')
    write_json(args.json, dict(header=header, machine=machine, torch=torch.__version__, attn=attn, steps=args.steps,
                               workers=workers, peak_tflops=peak, rows=results, check=check, xtuner_skip=xtuner_skip,
                               liger_check=liger_check))


def write_json(path: Optional[str], figures: dict) -> None:
    """``--json``: the raw figures of the run."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(figures, f, indent=1)
            f.write('\n')


if __name__ == '__main__':
    main()
