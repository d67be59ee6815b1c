"""``realsize.py``'s rows from the outside: each row's process environment (its malloc) and watched for its peak
memory, the tiles option, and the lines printed (a row's line, the closing lines with the ratios; the conversion
of (b)'s checkpoint, timed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks import train_loop

# glibc keeping what is freed (no block handed back to the kernel, so no page faults on every large activation;
# benchmarks/RESULTS.md): XTuner's rows (and ours where there is no jemalloc), :func:`row_env`
KEEP_FREED = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '68719476736'}


def row_env(setting: str, row: str, op_reads: bool = False):
    """A row's environment for ``--malloc SETTING``: 'train' runs ours under jemalloc as ``tools/train.py`` does
    where it finds it (``malloc.jemalloc_env``), XTuner's (``xtuner train`` does nothing of the kind) and ours where
    there is no jemalloc on glibc keeping what is freed; 'keep' every row on the latter; 'default' glibc's own.
    ``op_reads`` (``--op-reads``: the planner checked against the bytes in use) makes 'train' 'keep': jemalloc
    counts each block at its size class, glibc the bytes asked for."""
    from xtuner_plugins.malloc import jemalloc_env
    if op_reads and setting == 'train':
        setting = 'keep'
    plain = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF')}
    if setting == 'default':
        return plain
    keep = dict(plain, **KEEP_FREED)
    return (jemalloc_env(keep) or keep) if setting == 'train' and row != 'xtuner' else keep


SETTING_NAMES = ('a', 'b', 'c')


# below this much memory XTuner's rows of the tiled settings do not fit at 12 tiles per image (killed at 24 GiB,
# benchmarks/RESULTS.md; 17.4-21.2 GiB at 6), so every row of those settings takes 6 unless told
FULL_TILES_MEMORY = 32 * 2 ** 30
TILED = ('a', 'b')


def default_tiles(memory: int) -> int:
    """The tiled settings' tiles per image on a machine of ``memory`` bytes: 12 (the seeds' COCO images), or 6
    below :data:`FULL_TILES_MEMORY`."""
    return 12 if memory >= FULL_TILES_MEMORY else 6


def parse_tiles(parser, values, memory: int = FULL_TILES_MEMORY) -> dict:
    """``--max-dynamic-patch a=6 b=6`` -> each setting's tiles per image (where not given: 12 for (c)'s resized
    images; :func:`default_tiles` of ``memory`` for the tiled settings)."""
    tiles = {s: default_tiles(memory) if s in TILED else 12 for s in SETTING_NAMES}
    for value in values:
        setting, _, n = value.partition('=')
        if setting not in SETTING_NAMES or not n.isdigit() or not 1 <= int(n) <= 40:
            parser.error(f'--max-dynamic-patch {value!r}: expected SETTING=N with SETTING one of '
                         f'{", ".join(SETTING_NAMES)} and N from 1 to 40')
        tiles[setting] = int(n)
    return tiles


def total_memory() -> int:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def run_watched(cmd, env=None):
    """Run a row's process; returns ``(CompletedProcess, its peak RSS in bytes)``, the peak read from /proc every
    0.2 s, so a row the kernel kills still says how far it got."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        chunks = {'out': [], 'err': []}
        import threading
        readers = [threading.Thread(target=lambda f=f, k=k: chunks[k].append(f.read()), daemon=True)
                   for f, k in ((proc.stdout, 'out'), (proc.stderr, 'err'))]
        for t in readers:
            t.start()
        peak = 0
        while proc.poll() is None:
            try:
                with open(f'/proc/{proc.pid}/status') as f:
                    rss = next((int(x.split()[1]) * 1024 for x in f if x.startswith('VmRSS:')), 0)
                peak = max(peak, rss)
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)
        for t in readers:
            t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, ''.join(chunks['out']), ''.join(chunks['err'])), peak


def over(r) -> str:
    """What a row timed: its samples and steps (the same samples in every row of a setting)."""
    return f' ({r["samples"]} samples, {r["timed_steps"]} steps)' if 'timed_steps' in r else ''


def rounded(r) -> str:
    """A row measured under jemalloc: its bytes in use count each large block at its size class (up to 25% over
    the bytes asked for, never touched), so the planner is checked on glibc's (``--op-reads``)."""
    return ' (jemalloc\'s size classes)' if r.get('malloc') == 'jemalloc' else ''


#: the spread of the bf16 matmul rate read around two rows past which their ratio compares the machine's moods
SWING = 1.15


def row_roof(r, roof) -> float:
    """The bf16 roofline a row is held to: the highest of the run's first reading and the two taken around the
    row (``machine_bf16``), so that a machine faster during the row than at the start is not read as the code
    passing its roofline (a share of 94% once, at a first reading of 0.70 TFLOP/s)."""
    return max([roof['bf16'], *r.get('machine_bf16', ())])


def swing(*rows) -> str:
    """`` (machine ...: not a figure)`` where the bf16 rate read around ``rows`` spreads over :data:`SWING`."""
    rates = [x for r in rows for x in r.get('machine_bf16', ())]
    if len(rates) < 2 or max(rates) <= SWING * min(rates):
        return ''
    return (f' (machine bf16 {min(rates):.2f}-{max(rates):.2f} TFLOP/s around these rows, '
            f'{max(rates) / min(rates) - 1:.0%} apart: not a figure)')


def print_row(setting, row, r, roof, flush=False):
    if 'error' in r:
        print(f'{setting} {row:9s} FAILED: {r["error"]}', flush=flush)
        return
    pred = f'{r["act_predicted"] / 2 ** 30:.2f}' if r.get('act_predicted') else 'n/a'
    top = row_roof(r, roof)
    machine = ('  machine bf16 {:.2f} -> {:.2f} TFLOP/s'.format(*r['machine_bf16'])
               if 'machine_bf16' in r else '')
    print(f'{setting} {row:9s} s/step {r["flops_per_step"] / (r["tflops"] * 1e12):7.1f} '
          f'tokens/s {r["tokens_per_s"]:7.1f}{over(r)} peak {r["peak_mib"] / 1024:6.2f} GiB  TFLOP/s {r["tflops"]:.3f} '
          f'({r["tflops"] / top:.0%} of bf16 roofline; the LLM\'s {r["llm_tflops"] / top:.0%}, '
          f'vision tower {r["vision_s"]:.1f} s)  data {r["data_share"]:.0%}  pad {r["pad_share"]:.0%}  '
          f'activations measured {r["act_measured"] / 2 ** 30:.2f} GiB{rounded(r)}, planned {pred} GiB  '
          f'(row {r["wall_s"]:.0f} s){machine}'
          + (f'  compiled: warm-up steps {r["warmup_s"]:.0f} s, graphs compiled in the timed steps '
             f'{r["graphs_in_timed"]}' if 'graphs_in_timed' in r else ''), flush=flush)


def closing(results, settings, roof, tiles=None):
    for s in settings:
        fewer = f' (at {tiles[s]} tiles per image, not 12, in every row of it)' if tiles and tiles[s] != 12 else ''
        un, xt = results.get((s, 'unpacked'), {}), results.get((s, 'xtuner'), {})
        ours = [v for (s_, r), v in results.items() if s_ == s and r != 'xtuner' and 'tokens_per_s' in v]
        pk = max((x for x in ours if x['row'].startswith('packed')), key=lambda x: x['tokens_per_s'], default={})
        best_un = max((x for x in ours if x['row'].startswith('unpacked')), key=lambda x: x['tokens_per_s'],
                      default={})
        best = max((x for x in (best_un, pk) if 'tokens_per_s' in x), key=lambda x: x['tokens_per_s'], default={})
        if best:
            print(f'rows of {s}: ours = {best["row"]}, packed = {pk.get("row")}')

        def ratio(a, b, key):
            return f'{a[key] / b[key]:.2f}' if key in a and key in b else 'n/a'
        comparable = ''
        if 'check' in un and 'check_xtuner' in xt:
            c = train_loop.compare_checks(un['check'], xt['check_xtuner'], 2e-2)
            print(train_loop.format_check(c))
            comparable = '' if c['ok'] else ' (check FAILED: not comparable)'
        # the LLM's matmul work; under 1% (tiny models) in two figures, not rounded to 0
        fraction = best['llm_tflops'] / row_roof(best, roof) if best else None
        share = 'n/a' if fraction is None else f'{fraction:.0%}' if fraction >= 0.01 else f'{fraction * 100:.2g}%'
        print(f'real-size {s}{fewer}: tokens/s ours/xtuner {ratio(best, xt, "tokens_per_s")}{comparable}'
              f'{swing(best, xt) if "tokens_per_s" in xt else ""}; '
              f'peak memory ours/xtuner {ratio(best, xt, "peak_mib")}; packed/unpacked '
              f'{ratio(pk, best_un, "tokens_per_s")}{swing(pk, best_un) if pk and best_un else ""}; '
              f'roofline share {share}')


def convert(work: str, out_dir: str, setting: dict) -> None:
    """The converter on (b)'s LoRA checkpoint (adapters merged, bf16, official layout): time and peak RSS against
    the model's size in bf16 (``setting``: (b)'s models, under ``work``; the log in ``out_dir``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.path.join(work, 'rows', 'b')
    out = os.path.join(work, 'converted_b')
    cmd = ['/usr/bin/time', '-v', sys.executable, os.path.join(root, 'tools', 'convert_to_official.py'),
           os.path.join(root, 'configs', 'finetune_lora.py'), os.path.join(shared, 'lora.pth'), out, '--dtype', 'bf16',
           '--overwrite', '--cfg-options', f'model.vision_encoder={os.path.join(work, "models", setting["vision"])}',
           f'model.llm={os.path.join(work, "models", setting["llm"])}', 'model.llm_lora.lora_dropout=0.0',
           'model.from_scratch=True']
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)   # as a user runs it: glibc's own malloc settings
    seconds = time.perf_counter() - t
    with open(os.path.join(out_dir, 'b-convert.log'), 'w') as f:
        f.write(' '.join(cmd) + '\n' + proc.stdout + proc.stderr)
    rss = [int(x.split(':')[1]) for x in proc.stderr.splitlines() if 'Maximum resident set size' in x]
    if proc.returncode or not rss:
        print(f'conversion (b): FAILED (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [""])[-1]}')
        return
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith('.safetensors'))
    peak = rss[0] * 1024
    print(f'conversion (b: 1.5B LoRA merged, official layout, bf16): {seconds:.0f} s, peak RSS '
          f'{peak / 2 ** 30:.2f} GiB = {peak / size:.2f} x the written model ({size / 2 ** 30:.2f} GiB in bf16; '
          'target <= 1.5)', flush=True)
    subprocess.run(['rm', '-rf', out])
