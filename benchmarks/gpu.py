"""The GPU goals in one run: real sizes on one GPU machine in under 10 minutes, every figure in its own process.

Usage (``benchmarks/gpu.sh`` is the entry: it brings the pinned packages onto an offline GPU image first)::

    bash benchmarks/gpu.sh --out work_dirs/gpu          # on a GPU machine: real sizes, bf16
    bash benchmarks/gpu.sh --tiny --out work_dirs/gpu   # tiny models on the CPU: every row end to end (a smoke run)

Rows (each a child process with its own time budget, so a failure, an out-of-memory or a timeout is that row's
result and the run goes on; a row that no longer fits in the run's budget is reported as not run):

* ``prepare``: random checkpoints with the real shapes (InternViT-300M-448px + Qwen2.5-0.5B and -1.5B for
  ``bench_train.py``; InternViT-300M + Qwen2.5-1.5B with its 151936-row vocabulary for ``bench_memory.py``) and
  the synthetic data set (JPEGs of 12-tile grids), written once into ``--work`` and reused by every row (and by
  later runs);
* full fine-tuning (projector + LLM trained, ViT frozen; bf16 autocast, LLM gradient checkpointing), per LLM:
  ``unpacked`` (padded batches), ``packed flex`` (packs, ``--attn flex_attention``), ``packed segments`` (packs,
  causal SDPA on each sample: ``--attn sdpa_segments``), ``packed varlen`` (packs, every sample of a batch in one
  call of torch's ``varlen_attn``: ``--attn sdpa_varlen``), ``packed segments liger`` (``packed segments`` with
  Liger Kernel's kernels: ``--liger-kernel``), ``packed sdpa`` (packs, SDPA with a dense
  block-diagonal mask) and ``xtuner`` (XTuner 0.2.0's ``InternVL_V1_5`` on the unpacked batches, with the same
  SDPA backends as ours: cuDNN's off): ``bench_train.py --paths ... --json``: tokens/s, samples/s, model FLOPs, MFU, data-time share (JPEG
  decoding in DataLoader workers), peak memory;
* ``bf16 vs fp32``: ``bench_train.py --precision-check`` (losses of a few steps and first-step gradients, on
  packs of the first LLM size);
* ``profile``: the first size's packed step (``sdpa_segments``; on a GPU with its blocks compiled, the default
  there) under torch.profiler: the split by kind (``benchmarks/profile_kinds.py``, the GPU's kernel time) and its
  operators' table (``raw/profile_SIZE.txt``);
* ``memory``: MLP warm-up, LoRA and full fine-tuning at real size (``bench_memory.py``'s ``measure``);
* ``stage``: ``configs/finetune_full_packed.py`` trained through ``tools/train.py`` on the first size's models
  and data (``benchmarks/stage_run.py``): what its defaults choose on the machine (``llm_grad_ckpt_layers='auto'``)
  and whether that run fits (peak memory, tokens/s);
* ``cuda tests``: the test modules with checks that run on CUDA only (``CUDA_TESTS``: torch's own ``varlen_attn``
  against the segments, with and without a sliding window; packed gradients on the GPU; Liger's kernels), under
  pytest on the GPU machine. CI has no GPU: there a reference stands in for each kernel.

The order puts the goal rows first (1.5B), so a run that runs out of time loses the 0.5B rows. Writes into
``--out``: ``table.md`` (what is printed), ``results.json`` (every row's command, status, reason, seconds and raw
figures), ``raw/*.json`` (each child's own output) and ``logs/*.log``. Exits 1 when a row did not succeed. A row
that trains on CUDA only (``packed flex``: torch's FlexAttention has no backward on a CPU) takes the GPU in a
``--tiny`` run where there is one, and is skipped, with the reason printed, where there is none.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu_rows import cuda_available, execute  # noqa: E402

MEMORY_STAGES = ('pretrain_mlp', 'finetune_lora', 'finetune_full')
#: why a row runs on CUDA only (a --tiny run on a machine without CUDA skips it, naming the reason)
CUDA_ONLY = {'packed flex': "torch's FlexAttention has no backward on a CPU",
             'packed segments compiled': "compile_blocks is measured on the CPU by realsize.sh's _compiled rows",
             'packed segments compiled half ckpt': "compile_blocks is measured on the CPU by realsize.sh's _compiled "
                                                   'rows',
             'packed segments compiled no ckpt': "compile_blocks is measured on the CPU by realsize.sh's _compiled "
                                                 'rows',
             'packed varlen compiled no ckpt': "varlen_attn is FlashAttention's CUDA kernel, and compile_blocks is "
                                               "measured on the CPU by realsize.sh's _compiled rows",
             'packed segments liger': "Liger Kernel's Triton kernels run on CUDA only (tests/models/test_liger.py "
                                      "checks them in Triton's interpreter)",
             'packed varlen': "varlen_attn is FlashAttention's CUDA kernel (on a CPU sdpa_varlen is the segments' "
                              'loop)',
             'cuda tests': 'their CUDA checks skip or take a reference on a CPU, where make test runs them'}
#: the test modules whose checks run on CUDA where there is one (the ``cuda tests`` row)
CUDA_TESTS = ('tests/models/test_packing.py', 'tests/models/test_liger.py')
# the goal rows first (XTuner's and our default's, compile_blocks='auto' being both parts compiled on a GPU), so a
# run that runs out of time loses the comparisons
TRAIN_ROWS = (('xtuner', ['--paths', 'xtuner', '--attn', 'sdpa']),
              ('packed segments compiled', ['--paths', 'packed', '--attn', 'sdpa_segments', '--compile-blocks']),
              # no recomputation at all (1.5B on an 80 GB GPU: about 30 GiB more, planned): MFU counts model
              # FLOPs, so what recomputation costs is what it takes off the MFU
              ('packed segments compiled no ckpt', ['--paths', 'packed', '--attn', 'sdpa_segments',
                                                    '--compile-blocks', '--llm-ckpt', 'none']),
              # the same with every sample of a batch in one varlen_attn call: none of the segments' per-sample
              # copies (cast/copy 13% of that row's kernel time in the H100 profile)
              ('packed varlen compiled no ckpt', ['--paths', 'packed', '--attn', 'sdpa_varlen', '--compile-blocks',
                                                  '--llm-ckpt', 'none']),
              ('packed segments', ['--paths', 'packed', '--attn', 'sdpa_segments']),
              # less recomputation: half the layers checkpointed (1.5B: 15 GiB more, planned), or whole layers
              # recomputed without selective checkpointing's Python dispatch mode (host time in the H100 profile)
              ('packed segments compiled half ckpt', ['--paths', 'packed', '--attn', 'sdpa_segments',
                                                      '--compile-blocks', '--llm-ckpt-layers', 'HALF']),
              ('packed segments ckpt full', ['--paths', 'packed', '--attn', 'sdpa_segments', '--llm-ckpt', 'full']),
              ('packed varlen', ['--paths', 'packed', '--attn', 'sdpa_varlen']),
              ('packed flex', ['--paths', 'packed', '--attn', 'flex_attention']),
              ('packed segments liger', ['--paths', 'packed', '--attn', 'sdpa_segments', '--liger-kernel']),
              ('packed sdpa', ['--paths', 'packed', '--attn', 'sdpa']),
              ('unpacked', ['--paths', 'unpacked', '--attn', 'sdpa']))
# Settings per mode: LLM sizes in order, bench_train/bench_memory sizes, per-row budgets (s), the run's budget.
MODES = {
    # the fp32 reference runs on packs of <= 8192 tokens: fp32 attention with a dense mask over 16384 tokens
    # risks running out of memory beside the fp32 optimizer state
    'real': dict(sizes=('1.5b', '0.5b'), samples=48, batch=4, steps=10, precision_steps=4, precision_tokens=8192,
                 memory_batch=2, memory_steps=2, stage_steps=8,
                 budget=dict(prepare=200, train=110, flex=170, xtuner=160, precision=150, memory=100, stage=180,
                             tests=150),
                 run_budget=570, min_start=30),
    'tiny': dict(sizes=('tiny',), samples=8, batch=2, steps=2, precision_steps=2, memory_batch=1,
                 memory_steps=1, stage_steps=3, budget=dict(prepare=120, train=120, flex=180, xtuner=150,
                                                            precision=120, memory=120, stage=240, tests=300),
                 run_budget=900, min_start=5),
}


def plan(mode: str, out: str, work: str) -> List[dict]:
    """The rows in order: ``name``, ``kind``, ``cmd``, ``budget``, ``json`` (where the child writes its figures),
    ``group`` (rows of one group start together: the writers). Models and data go to ``work``."""
    m = MODES[mode]
    raw, py = os.path.join(out, 'raw'), sys.executable
    gpu = [] if mode == 'tiny' else ['--device', 'cuda']
    me, bench = os.path.join(ROOT, 'benchmarks', 'gpu.py'), os.path.join(ROOT, 'benchmarks', 'bench_train.py')
    rows = []

    def add(name, kind, cmd, budget, group=None, cuda_only=None):
        path = os.path.join(raw, re.sub(r'[^a-z0-9.]+', '_', name) + '.json')
        rows.append(dict(name=name, kind=kind, cmd=[py] + cmd + ['--json', path], budget=budget, json=path,
                         group=group, cuda_only=cuda_only))

    def train_args(size):
        real = [] if size == 'tiny' else ['--real', '--llm', size]
        return [bench, *real, *gpu, '--workdir', os.path.join(work, size), '--samples', str(m['samples']),
                '--batch', str(m['batch'])]

    for size in m['sizes']:
        add(f'prepare {size}', 'prepare', [me, '--child', 'prepare-train', '--size', size, '--work',
                                           os.path.join(work, size), '--samples', str(m['samples'])],
            m['budget']['prepare'], group='prepare')
    add('prepare memory', 'prepare', [me, '--child', 'prepare-memory', '--size', mode, '--work',
                                      os.path.join(work, 'memory')], m['budget']['prepare'], group='prepare')
    models = os.path.join(work, 'memory', 'models.json')
    for i, size in enumerate(m['sizes']):
        for name, extra in TRAIN_ROWS:
            kind = 'flex' if 'flex' in name or 'compiled' in name else 'xtuner' if name == 'xtuner' else 'train'
            # a --tiny run trains on the CPU, but a row that trains on CUDA only takes the GPU when there is one
            device = ['--device', 'cuda'] if name in CUDA_ONLY and not gpu else []
            extra = [str(half_the_layers(size)) if a == 'HALF' else a for a in extra]
            add(f'{size} {name}', 'train', train_args(size) + device + ['--steps', str(m['steps'])] + extra,
                m['budget'][kind], cuda_only=CUDA_ONLY.get(name))
            if i == 0 and name == 'packed segments':   # where the default's step goes (compiled: on a GPU)
                add(f'{size} profile', 'profile', train_args(size) + [
                    '--steps', '3', '--paths', 'packed', '--attn', 'sdpa_segments', *(['--compile-blocks'] if gpu
                                                                                      else []),
                    '--profile', os.path.join(raw, f'profile_{size}.txt')], m['budget']['flex'])
        if i == 0:  # the checks on the first (goal) size, before the other sizes
            add('cuda tests', 'tests', [me, '--child', 'tests'], m['budget']['tests'],
                cuda_only=CUDA_ONLY['cuda tests'])
            # the stage config through tools/train.py: what its defaults ('auto' checkpointing) choose, and fit
            add(f'{size} stage', 'stage', [os.path.join(ROOT, 'benchmarks', 'stage_run.py'), '--work',
                                           os.path.join(work, size), '--steps', str(m['stage_steps']),
                                           '--timeout', str(m['budget']['stage'] - 15)], m['budget']['stage'])
            packs = ['--max-tokens', str(m['precision_tokens'])] if m.get('precision_tokens') else []
            add(f'{size} bf16 vs fp32', 'precision', train_args(size) + ['--attn', 'sdpa', '--precision-check',
                                                                          str(m['precision_steps']), *packs],
                m['budget']['precision'])
            for stage in MEMORY_STAGES:
                # LoRA's peak measured 1.55x its plan on an H100 (RESULTS.md): its allocator history, to find why
                snap = (['--snapshot', os.path.join(raw, 'memory_finetune_lora.pickle')]
                        if stage == 'finetune_lora' and gpu else [])
                add(f'memory {stage}', 'memory', [me, '--child', 'memory', '--stage', stage, '--models', models,
                                                  *gpu, '--batch', str(m['memory_batch']),
                                                  '--steps', str(m['memory_steps']), *snap], m['budget']['memory'])
    return rows


def half_the_layers(size: str) -> int:
    """Half the decoder layers of the real-size LLM ``size`` (the tiny one's: 1)."""
    from benchmarks.synthetic import REAL_LLMS
    return REAL_LLMS[size]['num_layers'] // 2 if size in REAL_LLMS else 1


def only(rows: List[dict], patterns: List[str]) -> List[dict]:
    """The rows whose names match one of ``patterns`` (fnmatch), and the prepare rows that write what they read:
    ``prepare SIZE`` for the rows of that size, ``prepare memory`` for the ``memory`` rows."""
    kept = [r for r in rows if r['kind'] != 'prepare' and any(fnmatch.fnmatch(r['name'], q) for q in patterns)]
    sizes = {r['name'].split()[0] for r in kept}
    return [r for r in rows if any(r is k for k in kept) or r['kind'] == 'prepare' and r['name'].split()[1] in sizes]


def child(args) -> None:
    """The steps that are not a bench_train.py run: writing models and data, one bench_memory.py stage."""
    figures = {}
    if args.child == 'prepare-train':
        from benchmarks.synthetic import prepare
        tiny = args.size == 'tiny'
        models, data = prepare(args.work, not tiny, None if tiny else args.size, args.samples)
        figures = dict(models=models, data=data)
    elif args.child == 'prepare-memory':
        from benchmarks.bench_memory import write_family_models
        models = write_family_models(args.work, 'internvit', args.size == 'real')
        with open(os.path.join(args.work, 'models.json'), 'w') as f:
            json.dump(models, f)
        figures = dict(models=models)
    elif args.child == 'tests':
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *args.tests],
                              cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-20000:] + proc.stderr[-5000:], flush=True)
        lines = proc.stdout.strip().splitlines()
        figures = dict(rc=proc.returncode, summary=lines[-1] if lines else proc.stderr.strip()[-300:])
        with open(args.json, 'w') as f:
            json.dump(figures, f)
        sys.exit(proc.returncode)   # its row fails with pytest's summary line
    elif args.child == 'memory':
        from benchmarks.bench_memory import measure
        with open(args.models) as f:
            models = json.load(f)
        figures = measure(args.stage, models, args.device, args.batch, args.steps, args.snapshot)
        print(json.dumps(figures))
    with open(args.json, 'w') as f:
        json.dump(figures, f, indent=1)


def _pct(x) -> str:
    return f'{x:.1%}' if x is not None else 'n/a'


def table(rows: List[dict], header: str, tiny: bool) -> str:
    by = {r['name']: r for r in rows}
    lines = [header, '', 'Full fine-tuning (projector + LLM trained, ViT frozen), one process per row:', '',
             '| row | status | tokens/s | samples/s | TFLOP/step | TFLOPS | MFU | data share | pad share | '
             'peak MiB | warm-up s | s | note |', '|' + '---|' * 13]
    for r in (r for r in rows if r['kind'] == 'train'):
        f = (r['figures'] or {}).get('rows') or {}
        x = next(iter(f.values()), None)
        note = r['reason']
        for key, what in (('check', 'loss check'), ('liger_check', 'against eager: loss')):
            c = (r['figures'] or {}).get(key) if x is not None else None
            if c:
                note = (note + ' ' if note else '') + f'{what} rel {c["loss_rel"]:.1e}, grads {c["grad_rel"]:.1e}'
        cells = ([f'{x["tokens_per_s"]:.1f}', f'{x["samples_per_s"]:.2f}', f'{x["flops_per_step"] / 1e12:.4g}',
                  f'{x["tflops"]:.4g}', _pct(x.get('mfu')), _pct(x['data_share']), _pct(x['pad_share']),
                  f'{x["peak_mib"]:.0f}', f'{x["warmup_s"]:.1f}'] if x else [''] * 9)
        lines.append(f'| {r["name"]} | {r["status"]} | ' + ' | '.join(cells) + f' | {r["seconds"]} | {note} |')
    lines += ['', 'Peak memory per stage (' + ('tiny InternViT + Qwen2' if tiny else 'InternViT-300M + Qwen2.5-1.5B') +
              ', one 13-tile image per sample):', '',
              '| row | status | trainable | total | peak MiB | s/step | s | note |', '|' + '---|' * 8]
    for r in (r for r in rows if r['kind'] == 'memory'):
        x = r['figures'] if r['status'] == 'ok' else None
        cells = ([f'{x["trainable"]:,}', f'{x["total"]:,}', f'{x["peak_mb"]:.0f}', f'{x["step_s"]:.3f}'] if x
                 else [''] * 4)
        lines.append(f'| {r["name"]} | {r["status"]} | ' + ' | '.join(cells) + f' | {r["seconds"]} | {r["reason"]} |')
    profiles = {r['name']: next(iter(r['figures']['rows'].values()))['kinds'] for r in rows
                if r['kind'] == 'profile' and r['status'] == 'ok'}
    if profiles:
        from benchmarks.profile_kinds import table as kinds_table
        lines += ['', 'Where a step goes (torch.profiler over 3 packed steps, ' + (
            "each operator's own time on the host" if tiny else "each operator's own kernels' time on the GPU; "
            "'not in an operator': no kernel of the step running") + '; its operators in raw/profile_*.txt; '
            'a diagnosis, not a timing):', '', kinds_table(profiles)]
    lines.append('')
    for r in (r for r in rows if r['kind'] in ('prepare', 'precision', 'stage', 'tests')):
        text = r['reason']
        if r['kind'] == 'tests' and r['figures']:
            text = f'{", ".join(CUDA_TESTS)}: {r["figures"]["summary"]}'
        if r['kind'] == 'stage' and r['figures']:
            x = r['figures']
            text = (f'configs/finetune_full_packed.py through tools/train.py, {x["last_iter"]} iterations, '
                    f'{x.get("lm_head_rows") or 0:,} LM head rows: '
                    f'{x["auto"] or "no llm_grad_ckpt_layers line"}; peak {x["peak_mib"] or 0:,.0f} MiB; '
                    f'{x["tokens_per_s"] or 0:,.0f} tokens/s' + (f'; {"; ".join(x["reasons"])}' if x['reasons']
                                                                else ''))
        if r['kind'] == 'precision' and r['figures']:
            from benchmarks.train_loop import format_precision
            text = format_precision(r['figures']['precision'])
        lines.append(f'- {r["name"]}: {r["status"]} ({r["seconds"]} s){": " + text if text else ""}')
    first = MODES['tiny' if tiny else 'real']['sizes'][0]

    def tps(name):
        r = by.get(f'{first} {name}')
        return r['figures']['rows'][next(iter(r['figures']['rows']))] if r and r['status'] == 'ok' else None

    xt = tps('xtuner')
    # the packed rows' figures (None: the row did not succeed), by their short names; sdpa's dense mask is a baseline
    packed = {k: tps(f'packed {k}') for k in ('segments compiled', 'segments compiled no ckpt',
                                              'varlen compiled no ckpt', 'segments', 'varlen', 'flex',
                                              'segments liger', 'sdpa')}
    with_mfu = {k: p for k, p in packed.items() if k != 'sdpa' and p and p.get('mfu') is not None}
    best = max(with_mfu, key=lambda k: with_mfu[k]['mfu'], default=None)
    best_mfu = f'{_pct(with_mfu[best]["mfu"])} ({best})' if best else 'n/a'
    shares = [r['figures']['rows'][k]['data_share'] for r in rows if r['kind'] == 'train' and r['status'] == 'ok'
              for k in r['figures']['rows']]
    over = ', '.join(f'{k} {p["tokens_per_s"] / xt["tokens_per_s"]:.2f}' if p and xt else f'{k} n/a'
                     for k, p in packed.items())
    lines += ['', ('Goals (smoke run: tiny models on a CPU, the figures are not the goals):' if tiny else 'Goals:'),
              f'- MFU of {first} packed, the best row: {best_mfu} (goal >= 40% on an H100)',
              f'- tokens/s of {first} packed over xtuner: {over} (goal >= 1.5)',
              f'- data-time share: at most {max(shares):.1%} over the training rows (goal < 5%)' if shares else
              '- data-time share: n/a']
    return '\n'.join(lines) + '\n'


def machine(tiny: bool) -> str:
    gpu = ''
    if not tiny:
        try:
            gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total', '--format=csv,noheader'],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            gpu = 'no nvidia-smi'
    cpu = f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs'
    return f'{gpu}; {cpu}' if gpu else cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', help='folder for table.md, results.json, raw/, logs/ and work/ (models, data)')
    p.add_argument('--tiny', action='store_true', help='tiny models on the CPU: a smoke run of every row')
    p.add_argument('--budget', type=float, default=None,
                   help='seconds for the whole run, counted from $GPU_BENCH_START when set (gpu.sh sets it '
                        'before installing): default 570 real, 900 tiny')
    p.add_argument('--only', nargs='+', default=None, metavar='PATTERN',
                   help='run only the rows whose names match (fnmatch), e.g. "1.5b *" "memory *", and the '
                        'prepare rows that write what they read (they reuse what --work holds)')
    p.add_argument('--jobs', type=int, default=None,
                   help='rows at a time after the prepare rows (default 1: timings need the GPU alone; 2 with '
                        '--tiny, whose figures are not timings)')
    p.add_argument('--child', choices=['prepare-train', 'prepare-memory', 'memory', 'tests'],
                   help=argparse.SUPPRESS)
    p.add_argument('--tests', nargs='+', default=list(CUDA_TESTS), help=argparse.SUPPRESS)
    p.add_argument('--size', help=argparse.SUPPRESS)
    p.add_argument('--work', help='folder for the written models and data, reused by later runs (default: '
                                  '$TMPDIR/xtuner_plugins_gpu/MODE; about 17 GB at real size, so not under --out)')
    p.add_argument('--samples', type=int, help=argparse.SUPPRESS)
    p.add_argument('--stage', help=argparse.SUPPRESS)
    p.add_argument('--models', help=argparse.SUPPRESS)
    p.add_argument('--device', default='cpu', help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, help=argparse.SUPPRESS)
    p.add_argument('--steps', type=int, help=argparse.SUPPRESS)
    p.add_argument('--json', help=argparse.SUPPRESS)
    p.add_argument('--snapshot', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if not args.out:
        p.error('--out DIR is required')
    t0 = float(os.environ.get('GPU_BENCH_START') or time.time())
    mode = 'tiny' if args.tiny else 'real'
    deadline = t0 + (args.budget if args.budget is not None else MODES[mode]['run_budget'])
    out = os.path.abspath(args.out)
    work = os.path.abspath(args.work or os.path.join(tempfile.gettempdir(), 'xtuner_plugins_gpu', mode))
    if not args.tiny and not cuda_available():
        p.error('no CUDA device here: the real run needs a GPU (--tiny is the smoke run of every row on the CPU)')
    rows = plan(mode, out, work)
    if args.only:
        rows = only(rows, args.only)
    when = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or 'unknown'
    header = (f'{"SMOKE RUN (tiny models on the CPU; not the goals)" if args.tiny else "GPU goals (real sizes)"}: '
              f'`{shlex.join(["benchmarks/gpu.sh"] + sys.argv[1:])}`; {when}; {machine(args.tiny)}; '
              f'commit {commit}; python {platform.python_version()}')
    print(header, flush=True)
    execute(rows, out, deadline, MODES[mode]['min_start'], args.jobs or (2 if args.tiny else 1))
    text = table(rows, header, args.tiny) + f'\nwall: {time.time() - t0:.0f} s\n'
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(dict(header=header, mode=mode, wall_s=round(time.time() - t0, 1), rows=rows), f, indent=1)
    print(text, end='')
    sys.exit(0 if all(r['status'] in ('ok', 'skipped') for r in rows) else 1)


if __name__ == '__main__':
    main()
