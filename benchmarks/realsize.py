"""Real sizes on the CPU: ours unpacked, ours packed and XTuner 0.2.0's InternVL_V1_5, each row in its own process.

Usage (``benchmarks/realsize.sh`` runs it)::

    python benchmarks/realsize.py --out DIR [--work DIR] [--settings a b c] [--steps 1]

Settings (the seeds' real pairs, written once by ``xtuner_plugins.tiny.realsize`` into ``--work/models``, with
the published configs and random weights, loaded by the code that loads the real checkpoints):

* ``a``: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B-Instruct, full fine-tuning (projector + LLM; ViT frozen);
* ``b``: InternViT-300M-448px-V2_5 + Qwen2.5-1.5B-Instruct, LoRA r=16 on every LLM linear layer (+ projector);
* ``c``: SigLIP-so400m-patch14-384 + bilinear MLP (169 tokens) + Qwen2.5-0.5B-Instruct, full fine-tuning.

Rows: ``unpacked`` (padded batches, SDPA), ``packed`` (packs with the dense block-diagonal mask, SDPA),
``packed_segments`` (packs, ``attn_implementation='sdpa_segments'``: each sample attended on its own, no mask),
``packed_segments_nockpt`` (the same without the LLM's gradient checkpointing: no recomputation; (a) and (c)),
``xtuner`` (its own default: the LLM checkpointed); any of ours with ``_compiled`` added (``unpacked_compiled``,
``packed_segments_compiled``): the model's ``compile_blocks='llm'`` (each LLM block under ``torch.compile``, what
``'auto'`` gives on a CPU with native bf16), warmed up by a second step of other sizes so that no graph is
compiled in the timed steps (the row says how many were). Every other row checkpoints the LLM. By default
``unpacked``, ``packed_segments`` and ``xtuner`` run, and the two ``_compiled`` rows too where ``'auto'`` compiles
on this machine (:func:`default_rows`; ``--rows`` to choose). The closing line's "ours" is our fastest row, its
"packed" the faster packed row (both named). Around each row a short bf16 ``torch.mm`` reads the machine's rate
again (``roofline.probe``, printed at the row's end): shares are of the highest reading, and a ratio of two rows
whose readings spread by over 15% is marked "not a figure" (a shared host's rate moved 2x within minutes).

Data (:func:`write_mix`): a LLaVA-665K-like length mix, see its docstring. (a) and (b) tile every image to 12
tiles + thumbnail (13 x 256 = 3,328 image tokens, as COCO's 4:3 images are under ``max_dynamic_patch=12``), or to
6 + thumbnail in every row of them on a machine under 32 GiB, where XTuner's rows do not fit at 12
(``realsize_report.default_tiles``; ``--max-dynamic-patch`` to choose; the closing line says which);
(c) resizes each image to one 384 px tile. Every row of a setting times the same samples in the same order, those
of ``--steps`` packs drawn at random (:func:`timed_steps`): packed one pack of up to ``--max-tokens`` tokens a
step, unpacked and XTuner's rows the packs' samples, ``--batch`` a step (padded); so a ratio of two rows' tokens/s
is over the same tokens. Precision: frozen weights bf16, trained ones fp32, bf16 autocast (the GPU recipe), for every row. The
optimizer: torch's AdamW with our configs' options for our rows (``fused=True``: ``train_loop.ours_adamw``),
with torch's defaults for XTuner's (as its configs build it). Each row's untimed warm-up step (gradients and
AdamW's states made) trains the first sample at one tile (``--warmup short``; ``full``: a full-size batch), which
keeps the run short; the data come in the row's own process (a forked loader worker would keep a copy-on-write
image of the 10-20 GB process).

First the roofline: a large ``torch.mm`` (bf16, and fp32) timed in this process. Each row prints s/step,
tokens/s, its own peak RSS, achieved model TFLOP/s (``flops.train_step_flops``) and its share of the
bf16 roofline, the LLM's share (its layers' and LM head's FLOPs over the step's time less the vision tower's
forward, timed by hooks; the closing line's roofline share), the data-time share, and the planner's step peak
(activations + autocast copies, or AdamW's temporaries: ``planner.plan_memory``) beside the measured rise of
malloc's bytes in use during the last timed step (``RssSampler``, read by its thread; with ``--op-reads``, in our
rows, also after every operator with a large output, ``RssSampler.ops``, and on glibc; under jemalloc its
``stats.allocated``, each large block at its size class, which the row line marks).
XTuner's rows are checked against our unpacked row on the first timed step (``train_loop.run``'s ``check``: the warm-up
at rate 0, then the loss and every trained tensor's gradient norm of that step's batch before its update, out of
its time; the same batch in both processes, no step of its own); a failed check marks the ratios not comparable.
XTuner 0.2.0 has
no bilinear projector and no SigLIP path in InternVL_V1_5: (c) has no XTuner row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import flops, train_loop, xtuner_row  # noqa: E402
from benchmarks.realsize_data import ensure_models, timed_steps, write_mix  # noqa: E402
from benchmarks.realsize_report import (closing, convert, parse_tiles, print_row, row_env,  # noqa: E402
                                        run_watched, total_memory)
from benchmarks.roofline import model_weights, probe, roofline, slow_bf16_note, slow_bf16_refusal  # noqa: E402
from benchmarks.rss import RssSampler  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear')  # no dropout: the check is exact
SETTINGS = {
    'a': dict(vision='InternViT-300M-448px-V2_5', llm='Qwen2.5-0.5B-Instruct', projector='pixel_shuffle_mlp',
              image_mode='tile', model=dict(freeze_llm=False), xtuner=True),
    'b': dict(vision='InternViT-300M-448px-V2_5', llm='Qwen2.5-1.5B-Instruct', projector='pixel_shuffle_mlp',
              image_mode='tile', model=dict(freeze_llm=True, llm_lora=LORA), xtuner=True),
    'c': dict(vision='siglip-so400m-patch14-384', llm='Qwen2.5-0.5B-Instruct', projector='bilinear_mlp',
              image_mode='resize', model=dict(freeze_llm=False), xtuner=False),
}
DEFAULT_ROWS = ('unpacked', 'packed_segments', 'xtuner')
COMPILED_ROWS = ('unpacked', 'unpacked_compiled', 'packed_segments', 'packed_segments_compiled', 'xtuner')


def default_rows() -> tuple:
    """The rows run without ``--rows``: the eager ones, and beside them the compiled ones where the models'
    default (``compile_blocks='auto'``) compiles the LLM's blocks on this machine (a CPU where bf16 pays and a
    C++ compiler), so that the run measures what training does by default."""
    from xtuner_plugins.models.compile import AUTO_MIN_LLM_PARAMETERS, compile_parts
    return COMPILED_ROWS if compile_parts('auto', AUTO_MIN_LLM_PARAMETERS) else DEFAULT_ROWS
NAMES = {'a': 'InternViT-300M + Qwen2.5-0.5B full', 'b': 'InternViT-300M + Qwen2.5-1.5B LoRA',
         'c': 'SigLIP-so400m + bilinear MLP + Qwen2.5-0.5B full'}


@dataclasses.dataclass(frozen=True)
class _Tokens(flops.ModelShapes):
    """Shapes of a projector that is no pixel shuffle (the bilinear MLP of (c)): its tokens per tile given, its
    input the ViT width (``downsample_ratio`` 1); FLOPs as ``flops.train_step_flops`` counts them."""
    tokens: int = 0

    @property
    def image_tokens_per_tile(self) -> int:
        return self.tokens


def build_data(setting: str, work: str, models: dict, samples: int):
    s = SETTINGS[setting]
    tiled = s['image_mode'] == 'tile'
    folder = os.path.join(work, 'data', 'tiled' if tiled else 'single')
    data = os.path.join(folder, 'data.jsonl')
    if not os.path.exists(data):
        write_mix(folder, samples, tiled)
    return data, os.path.join(folder, 'images')


def collated(dataset, batches):
    """Each step's items, loaded and collated when the step asks (the data time is the step's; in this process:
    a forked loader worker keeps a copy-on-write image of a 10+ GB process, and every page the step rewrites is
    then held twice: the kernel killed XTuner's (a) row with its worker at 9 GB)."""
    from xtuner_plugins.data import internvl_collate_fn
    for step in batches:
        yield internvl_collate_fn([dataset[index] for index in step])


def child(args) -> dict:
    """One row of one setting, in this process."""
    from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
    from xtuner_plugins.data.packing import PackedInternVLDataset, pack_items
    from xtuner_plugins.models import VisionLanguageModel
    from xtuner_plugins.models.compile import compiled_graphs
    from xtuner_plugins.plan_activations import Batch
    from xtuner_plugins.planner import plan_memory
    torch.manual_seed(0)
    s = SETTINGS[args.setting]
    models = {k: os.path.join(args.work, 'models', s[k]) for k in ('vision', 'llm')}
    sampler = RssSampler()
    shared = os.path.abspath(os.path.join(args.work, 'rows', args.setting))  # a file:// rendezvous needs it absolute
    os.makedirs(shared, exist_ok=True)

    def build(**settings):
        return VisionLanguageModel(vision_encoder=models['vision'], llm=models['llm'], projector=s['projector'],
                                   image_mode=s['image_mode'], freeze_vision=True,
                                   llm_grad_ckpt='_nockpt' not in args.row,
                                   compile_blocks='llm' if args.row.endswith('_compiled') else False,
                                   torch_dtype='bfloat16', from_scratch=True,
                                   attn_implementation='sdpa_segments' if args.row.startswith('packed_segments')
                                   else args.attn,
                                   **settings)
    official = os.path.join(shared, 'official')
    if args.row == 'unpacked' and s['xtuner'] and 'llm_lora' in s['model']:
        # the official folder holds plain weights: written from the model before its adapters (B = 0 at the
        # start, so the adapted model computes the same); the same seed gives the same projector
        plain = build(**{k: v for k, v in s['model'].items() if k != 'llm_lora'})
        xtuner_row.write_official_folder(plain, official, plain.geometry['image_size'])
        del plain
    model = build(**s['model'])
    model.train()
    data, images = build_data(args.setting, args.work, models, args.samples)
    ds = InternVLDataset(data, image_folders=images, tokenizer=models['llm'], max_dynamic_patch=args.tiles,
                         max_length=args.max_tokens, cache_dir=os.path.join(args.work, 'cache', args.setting),
                         **model.geometry)
    packed = PackedInternVLDataset(ds, max_tokens=args.max_tokens, max_tiles=None, seed=0)
    shapes = flops.model_shapes(model.vision_model.config, model.language_model.config,
                                model.downsample_ratio or 1.0,
                                vocab_size=model.language_model.get_output_embeddings().weight.shape[0])
    if shapes.image_tokens_per_tile != model.num_image_token:  # bilinear MLP: 27 x 27 patches -> 13 x 13 tokens
        shapes = _Tokens(**{f.name: getattr(shapes, f.name) for f in dataclasses.fields(shapes)},
                         tokens=model.num_image_token)
    order = torch.Generator().manual_seed(0)

    dataset, batches = timed_steps(packed, args.steps, order, args.row, args.batch)
    warmup = None
    if args.warmup == 'short':   # the first sample at one tile (packed rows: packed alone), not a full-size step
        small = InternVLDataset(data, image_folders=images, tokenizer=models['llm'], max_dynamic_patch=1,
                                max_length=args.max_tokens, cache_dir=os.path.join(args.work, 'cache',
                                                                                   args.setting + '-1tile'),
                                **model.geometry)
        warmup = internvl_collate_fn([pack_items([small[0]]) if args.row.startswith('packed') else small[0]])
        if args.row.endswith('_compiled'):   # a second warm-up of other sizes (the 4:3 images at 2 x 2 tiles +
            # thumbnail, two samples a pack): graphs for sizes of one (torch specialises them) and for any other
            # size are made before the timed step
            two = InternVLDataset(data, image_folders=images, tokenizer=models['llm'], max_dynamic_patch=4,
                                  max_length=args.max_tokens, cache_dir=os.path.join(args.work, 'cache',
                                                                                     args.setting + '-4tile'),
                                  **model.geometry)
            warmup = [warmup, internvl_collate_fn([pack_items([two[0], two[1]]) if args.row.startswith('packed')
                                                   else two[0]])]
    result = dict(setting=args.setting, row=args.row)
    step_loss, xt, check = None, None, None
    if args.row == 'unpacked' and s['xtuner']:  # before any step: the weights XTuner starts from; checked in run
        if 'llm_lora' not in s['model']:
            xtuner_row.write_official_folder(model, official, model.geometry['image_size'])
        check = train_loop.trained_parameters(model)
        torch.save({k: v.detach().clone() for k, v in check.items()}, os.path.join(shared, 'trained.pt'))
    if args.row == 'xtuner':
        del model
        xt, check = xtuner_row.build_row(official, shared, args.attn, LORA if 'llm_lora' in s['model'] else None)
        model = xt
        step_loss = lambda b: xtuner_row.xtuner_loss(xt, b)  # noqa: E731
    steps = len(batches)
    adamw = train_loop.ours_adamw() if xt is None else {}   # our configs' options (read once); XTuner's: torch's
    marks, seen = [], []

    def remembered(batches):  # the batches the run takes: the planner's is the measured step's, the LLM's FLOPs
        for item in batches:   # those of the timed steps'
            seen.append(item)
            yield item
    vision_s = []   # each vision-tower forward's seconds: the LLM's time is the step's less these (one a step)
    tower = (xt.model if xt is not None else model).vision_model
    tower.register_forward_pre_hook(lambda *_: vision_s.append(-time.perf_counter()))
    tower.register_forward_hook(lambda *_: vision_s.__setitem__(-1, vision_s[-1] + time.perf_counter()))

    def mark():   # each step's window, from the end of the one before (its gradients freed): the rise of
        marks.append(sampler.rise())   # the bytes in use (glibc), else of the RSS
        sampler.mark()
    freeze = dict(freeze_vision=True, freeze_projector=False, freeze_llm='llm_lora' in s['model'])
    ctx = xt.model.img_context_token_id if xt is not None else model.img_context_token_id
    sampler.mark()
    profile = None
    if args.profile:
        from benchmarks.profile_kinds import mark_modules
        os.makedirs(args.profile, exist_ok=True)
        profile = os.path.join(args.profile, f'{args.setting}-{args.row}.txt')
        mark_modules(xt.model if xt is not None else model, tower)
    with sampler.ops() if xt is None and args.op_reads else contextlib.nullcontext():   # beside the plan: ours
        r = train_loop.run(model, remembered(collated(dataset, batches)), steps, 'cpu', shapes,
                           step_loss=step_loss, freeze=freeze if xt is not None else None, img_context_token_id=ctx,
                           autocast=True, warmup_batch=warmup, adamw=adamw, check=check, after_step=mark,
                           profile=profile, warmup=len(warmup) if isinstance(warmup, list) else 1,
                           graphs=compiled_graphs if args.row.endswith('_compiled') else None)
    if check is not None:   # the first timed step's, before its update: the same batch in both processes
        result['check' if xt is None else 'check_xtuner'] = r.pop('check')
    from xtuner_plugins.malloc import jemalloc_loaded
    result.update(r, act_measured=marks[-1], malloc='jemalloc' if jemalloc_loaded() else 'glibc')
    # the LLM's share: its matmul FLOPs (layers and LM head) over the timed steps' time less the vision tower's
    # forwards (projector, loss and optimizer step stay in the LLM's time: the share is a lower bound)
    llm_flops = 0
    for item in seen[-steps:]:
        b = item['data']
        lens, tiles_ = flops.batch_samples(b, ctx, shapes.image_tokens_per_tile)
        f = flops.train_step_flops(shapes, lens, tiles_, **freeze, supervised=int((b['labels'][:, 1:] != -100).sum()))
        llm_flops += f['llm'] + f['lm_head']
    timed_vision = sum(vision_s[-steps:])
    result.update(vision_s=timed_vision / steps, llm_tflops=llm_flops / (r['s_per_step'] * steps - timed_vision) / 1e12,
                  timed_steps=steps)
    if xt is None and args.row == 'unpacked' and 'llm_lora' in s['model']:  # what the runner saves: for item 6
        torch.save({'meta': {'lineage': model.lineage}, 'state_dict': model.state_dict()},
                   os.path.join(shared, 'lora.pth'))
    # the planner's activations for the last (measured) step's batch (ours; XTuner's path is not the model planned)
    last = seen[-1]['data']
    rows, length = last['input_ids'].shape
    tiles = int(last['pixel_values'].shape[0])
    sup = int((last['labels'][:, 1:] != -100).sum())
    result['batch'] = dict(rows=rows, length=length, tiles=tiles, supervised=sup)   # the measured step's
    if xt is None:
        plan = plan_memory(model, Batch(rows=rows, length=length, tiles=tiles, supervised=sup,
                                        packed=args.row.startswith('packed')), 'bf16', device='cpu',
                           fused=adamw.get('fused', False))
        # the window's rise (from the previous step's end, its gradients freed as MMEngine frees them): the
        # forward's peak, or the backward's or the optimizer step's with the gradients
        result['act_predicted'] = plan['step_peak']
        result['act_parts'] = dict(plan['parts'], autocast_copies=plan['autocast_copies'],
                                   optimizer_temporaries=plan['optimizer_temporaries'])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='work_dirs/realsize/out')
    p.add_argument('--work', default='work_dirs/realsize')
    p.add_argument('--settings', nargs='+', default=['a', 'c', 'b'], choices=list(SETTINGS),
                   help='in this order (default a c b: the 1.5B rows, the longest, last)')
    p.add_argument('--rows', nargs='+', default=None,
                   help='of unpacked packed packed_segments packed_segments_nockpt xtuner, ours with _compiled '
                        '(unpacked_compiled, packed_segments_compiled; default: unpacked '
                        'packed_segments xtuner, and the _compiled two where compile_blocks=\'auto\' compiles on '
                        'this machine; the dense-mask and no-checkpointing rows are levers, measured once '
                        'in benchmarks/RESULTS.md)')
    p.add_argument('--steps', type=int, default=1, help='packs timed per row, after the warm-up step: the packed rows\' timed '
                   'steps; the other rows time the same samples, --batch a step (default 1)')
    p.add_argument('--warmup', choices=('short', 'full'), default='short',
                   help="the warm-up step: 'short' the first sample at one tile (default), 'full' the loader's "
                        "first batch (a full-size step, as long as the timed one)")
    p.add_argument('--batch', type=int, default=1, help='unpacked samples per step (default 1)')
    p.add_argument('--samples', type=int, default=8, help='samples in the data set (default 8)')
    p.add_argument('--max-tokens', type=int, default=8192, help='tokens per pack (and max_length; default 8192)')
    p.add_argument('--attn', default='sdpa')
    p.add_argument('--max-dynamic-patch', nargs='+', default=[], metavar='SETTING=N',
                   help='tiles per image of a setting, for every row of it (a=6 b=6; default for a and b: 12 + '
                        'thumbnail, 6 on a machine under 32 GiB, where XTuner\'s rows do not fit at 12)')
    p.add_argument('--malloc', choices=('train', 'keep', 'default'), default='train',
                   help="the rows' malloc: 'train' (default) ours as tools/train.py runs on this machine (jemalloc "
                        "where installed: xtuner_plugins/malloc.py; else glibc keeping what is freed) and XTuner's "
                        "with glibc keeping what is freed (KEEP_FREED); 'keep' every row on glibc keeping what is "
                        "freed; 'default' glibc's own settings")
    p.add_argument('--deadline', type=float, default=float(os.environ.get('REALSIZE_DEADLINE', 0)),
                   help='epoch seconds after which no further row starts (default: $REALSIZE_DEADLINE, none)')
    p.add_argument('--reuse', action='store_true',
                   help="keep the rows of --out's results.json that ran without error; run only the others")
    p.add_argument('--profile', default=None, metavar='DIR',
                   help='each row\'s timed step under torch.profiler: its operators in DIR/SETTING-ROW.txt and the '
                        'split by kind (benchmarks/profile_kinds.py) in DIR/kinds.md; the rows\' timings are then '
                        'not figures')
    p.add_argument('--op-reads', dest='op_reads', action='store_true',
                   help='our rows with a bytes-in-use read after every large operator, on glibc (--malloc '
                        'keep: its exact bytes; a Python dispatch mode in the timed step, which XTuner\'s rows do not run: 5-10%% of an eager step, and it keeps '
                        'compiled blocks from running compiled; benchmarks/RESULTS.md); default: the sampling '
                        'thread alone, which can miss a short peak (15%% of (b) unpacked\'s activations once): use '
                        'it to check the planner, not to time')
    p.add_argument('--no-op-reads', dest='op_reads', action='store_false', help=argparse.SUPPRESS)   # the default
    p.add_argument('--child', nargs=2, metavar=('SETTING', 'ROW'), help=argparse.SUPPRESS)
    p.add_argument('--tiles', type=int, default=12, help=argparse.SUPPRESS)   # a child's max_dynamic_patch
    args = p.parse_args()
    tiles = parse_tiles(p, args.max_dynamic_patch, total_memory())
    if args.child:
        args.setting, args.row = args.child
        print('RESULT ' + json.dumps(child(args), default=float), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    roof = roofline()
    sizes = roof['size']
    print(f'roofline (torch.mm, this process): bf16 {roof["bf16"]:.3f} TFLOP/s ({sizes["bf16"]}^3), fp32 '
          f'{roof["fp32"]:.3f} TFLOP/s ({sizes["fp32"]}^3); torch {torch.__version__}, {os.cpu_count()} CPUs, '
          f'{torch.get_num_threads()} threads; rows\' malloc: {args.malloc} (ours: '
          f'{"jemalloc" if "LD_PRELOAD" in row_env(args.malloc, "unpacked", args.op_reads) else "glibc"})',
          flush=True)
    refusal = slow_bf16_refusal(roof, max(model_weights(args.work, SETTINGS[s]['llm']) for s in args.settings))
    if refusal:
        sys.exit(f'realsize: not run: {refusal}')
    note = slow_bf16_note(roof)
    if note:
        print(f'realsize: {note}', flush=True)
    ensure_models(args.work, sorted({SETTINGS[s][k] for s in args.settings for k in ('vision', 'llm')}))
    results = {}
    saved = os.path.join(args.out, 'results.json')
    if args.reuse and os.path.exists(saved):  # rows measured before, without error, are not run again
        with open(saved) as f:
            results = {tuple(k.split(' ')): v for k, v in json.load(f)['rows'].items() if 'error' not in v}
    for setting in args.settings:
        rows = args.rows or default_rows()
        for row in rows:
            if row == 'xtuner' and not SETTINGS[setting]['xtuner']:
                continue
            if (setting, row) in results:
                print_row(setting, row, results[(setting, row)], roof, flush=True)
                continue
            if args.deadline and time.time() > args.deadline:
                results[(setting, row)] = dict(error=['not run: past --deadline'], wall_s=0.0)
                print_row(setting, row, results[(setting, row)], roof, flush=True)
                continue
            t, before = time.perf_counter(), probe()
            cmd = [sys.executable, os.path.abspath(__file__), '--child', setting, row, '--work', args.work,
                   '--steps', str(args.steps), '--batch', str(args.batch), '--samples', str(args.samples),
                   '--max-tokens', str(args.max_tokens), '--attn', args.attn, '--warmup', args.warmup,
                   '--tiles', str(tiles[setting])]
            if args.profile:
                cmd += ['--profile', os.path.abspath(args.profile)]
            if args.op_reads:
                cmd += ['--op-reads']
            # the planner is checked on glibc's exact bytes: jemalloc counts each block at its size class
            proc, peak = run_watched(cmd, env=row_env(args.malloc, row, args.op_reads))
            with open(os.path.join(args.out, f'{setting}-{row}.log'), 'w') as f:
                f.write(proc.stdout + proc.stderr)
            lines = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
            at_peak = f'; its RSS peaked at {peak / 2 ** 30:.2f} GiB of {total_memory() / 2 ** 30:.1f}'
            if proc.returncode < 0:  # a signal: SIGKILL is most likely the kernel's OOM killer (see dmesg)
                results[(setting, row)] = dict(error=[f'killed by signal {-proc.returncode}' + (
                    ' (the kernel\'s out-of-memory killer, most likely: `dmesg | grep -i killed`)'
                    if proc.returncode == -9 else '') + at_peak])
            elif proc.returncode or not lines:
                results[(setting, row)] = dict(error=[line + at_peak for line in (
                    proc.stderr or proc.stdout)[-400:].strip().splitlines()[-1:]])
            else:
                results[(setting, row)] = json.loads(lines[-1][7:])
            results[(setting, row)]['wall_s'] = time.perf_counter() - t
            results[(setting, row)]['machine_bf16'] = [before, probe()]   # the rate around the row
            print_row(setting, row, results[(setting, row)], roof, flush=True)
    if 'b' in args.settings and os.path.exists(os.path.join(args.work, 'rows', 'b', 'lora.pth')) and not (
            args.deadline and time.time() > args.deadline):
        convert(args.work, args.out, SETTINGS['b'])
    closing(results, args.settings, roof, tiles)
    if args.profile:
        from benchmarks.profile_kinds import table
        kinds = {f'({s}) {r}': v['kinds'] for (s, r), v in results.items() if 'kinds' in v}
        with open(os.path.join(args.profile, 'kinds.md'), 'w') as f:
            f.write(table(kinds) + '\n')
        print('where the timed steps went, by kind (torch.profiler, self time):\n' + table(kinds), flush=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(dict(roofline=roof, rows={f'{s} {r}': v for (s, r), v in results.items()}), f, indent=1,
                  default=float)


if __name__ == '__main__':
    main()
