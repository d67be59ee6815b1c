"""Data at scale: start-up time and memory of training on a LLaVA-shaped set of N samples, on 2 ranks.

Run from the repository root (heavy: minutes; 558k samples write ~170 MB, 16M ~3.5 GB)::

    .venv/bin/python benchmarks/bench_data_scale.py --samples 558128
    .venv/bin/python benchmarks/bench_data_scale.py --samples 16000000 --format jsonl --skip-cold --skip-check

It writes, under ``--workdir``, the tiny models, ``--images`` small images that the samples share, and an annotation
file shaped like LLaVA-Pretrain's ``blip_laion_cc_sbu_558k.json`` (one image, a short question and caption each;
``--format jsonl`` writes InternVL's one-sample-a-line form), each once (kept for later runs). Then:

- ``configs/pretrain_mlp.py`` on the tiny models, 2 ranks x the config's DataLoader workers, from an
  empty cache (cold) and again with it (warm): the seconds from the launch to the first logged step (then the run
  is stopped), and the peak of the summed PSS (``/proc/PID/smaps_rollup``) of every process of the run, sampled
  every ``--every`` s;
- ``tools/check_dataset.py --tokenizer`` on the same file (every core, an empty cache): its seconds.

The ranks start as the product starts them (``xtuner_plugins.launch.train_command``): ``tools/train.py
--nproc-per-node 2`` (its ranks forked from its launcher, ``xtuner_plugins.cli.local_launch``, once it loaded
their libraries, on a machine without a GPU; DeepSpeed and bitsandbytes deferred in the ranks).
``--launcher torchrun`` (XTuner's train script under torchrun, as before), ``--eager-imports``
(``XTUNER_PLUGINS_EAGER_IMPORTS=1``) and ``--no-import PKG,...`` (packages left out as if not installed) measure
the alternatives. Each result is one line ``RESULT name: value``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ['Render a clear and concise summary of the photo.', 'Describe the image concisely.',
             'Share a concise interpretation of the image provided.', 'What is in the photo?']
CAPTION = 'a {} view of the {} with {} in the background, taken on a {} day'
WORDS = ['red', 'old', 'busy', 'quiet', 'city', 'garden', 'harbour', 'mountains', 'trees', 'sunny', 'grey', 'cold']


def write_data(folder: Path, samples: int, images: int, fmt: str, length: bool = False) -> Path:
    """The tiny models, the shared images and the annotation file (each kept once written)."""
    from tests.helpers import write_image
    from xtuner_plugins.tiny import make_tiny_models
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / 'models' / 'llm').is_dir():
        make_tiny_models(str(folder / 'models'))
    for k in range(images):
        path = folder / 'images' / f'{k // 100:05d}' / f'{k:09d}.jpg'
        if not path.is_file():
            write_image(str(path), size=(96 + k % 7 * 16, 64 + k % 5 * 16), seed=k)
    path = folder / f'llava_{samples}{"_length" if length else ""}.{fmt}'
    if path.is_file() and path.with_suffix('.done').is_file():
        return path
    t = time.perf_counter()
    with open(path.with_suffix('.tmp'), 'w', encoding='utf-8') as f:
        f.write('[\n' if fmt == 'json' else '')
        for i in range(samples):
            k = i % images
            w = [WORDS[(i >> s) % len(WORDS)] for s in (0, 3, 6, 9)]
            sample = {'id': f'{i:09d}', 'image': f'{k // 100:05d}/{k:09d}.jpg',
                      'conversations': [{'from': 'human', 'value': QUESTIONS[i % 4] + '\n<image>'},
                                        {'from': 'gpt', 'value': CAPTION.format(*w)}]}
            if length:
                sample['length'] = 300 + i % 500  # InternVL's field: a token count the data carries
            line = json.dumps(sample)
            f.write(line + (',\n' if fmt == 'json' and i < samples - 1 else '\n'))
        f.write(']\n' if fmt == 'json' else '')
    os.replace(path.with_suffix('.tmp'), path)
    path.with_suffix('.done').write_text('')
    print(f'wrote {samples} samples to {path} ({path.stat().st_size / 2**20:.0f} MiB) in '
          f'{time.perf_counter() - t:.0f} s', flush=True)
    return path


def pss_of_tree(root: int):
    """``(summed PSS in bytes, [(pid, private, PSS, anonymous PSS)])`` of ``root`` and every process below it.
    Anonymous: PSS less the pages of mapped files (libraries, a memory-mapped annotation file read through), which
    are page cache the kernel can take back (``Pss_Anon``; the whole PSS on kernels without it)."""
    try:
        procs = [psutil.Process(root)] + psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, []
    each = []
    for p in procs:
        try:
            with open(f'/proc/{p.pid}/smaps_rollup') as f:
                rollup = {line.split(':')[0]: int(line.split()[1]) * 1024 for line in f if line.endswith('kB\n')}
            each.append((p.pid, rollup.get('Private_Dirty', 0) + rollup.get('Private_Clean', 0), rollup['Pss'],
                         rollup.get('Pss_Anon', rollup['Pss'])))
        except (OSError, psutil.Error):
            pass
    return sum(e[2] for e in each), each


NO_IMPORT = '''# by benchmarks/bench_data_scale.py --no-import: these packages fail to import, as if not installed
import importlib.abc, importlib.machinery, sys
NAMES = {names!r}
class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f'{{spec.name}} is left out of this run (--no-import)', name=spec.name)
    def exec_module(self, module):
        pass
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, _Loader()) if name.split('.')[0] in NAMES else None
sys.meta_path.insert(0, _Finder())
'''


def launch_variant(env: dict, folder: Path, no_import: list) -> dict:
    """``env`` with, for ``no_import``, a ``sitecustomize`` that makes those packages fail to import in every
    process of the run."""
    if no_import:
        site = folder / 'no_import'
        site.mkdir(parents=True, exist_ok=True)
        (site / 'sitecustomize.py').write_text(NO_IMPORT.format(names=sorted(no_import)))
        env = dict(env, PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    return env


def first_step(folder: Path, data: Path, cache: Path, every: float, timeout: float, name: str,
               length_field: bool = False, launcher: str = 'local', no_import: list = (),
               eager_imports: bool = False) -> None:
    """Launch the 2-rank training, time the launch to the first logged step, sample the summed PSS; stop it."""
    from xtuner_plugins.launch import train_command
    m = folder / 'models'
    options = {'model.vision_encoder': str(m / 'internvit'), 'model.llm': str(m / 'llm'), 'model.from_scratch': True,
               'train_dataloader.dataset.data_files': f'[{data}]',
               'train_dataloader.dataset.image_folders': f'[{folder / "images"}]',
               'train_dataloader.dataset.max_dynamic_patch': 4, 'train_dataloader.dataset.max_length': 2048,
               'train_dataloader.dataset.cache_dir': str(cache), 'train_dataloader.batch_size': 2,
               'train_dataloader.sampler.per_device_batch_size': 2, 'max_iters': 5,
               'default_hooks.logger.interval': 1, 'log_processor.window_size': 1,
               'default_hooks.checkpoint.interval': 1000}
    if length_field:
        options['train_dataloader.dataset.length_field'] = 'length'
    cmd, env = train_command(str(ROOT / 'configs' / 'pretrain_mlp.py'), str(folder / f'work_{name}'), nproc=2,
                             cfg_options=options, launcher='torchrun' if launcher == 'torchrun' else 'auto')
    env = launch_variant(env, folder, list(no_import))
    if eager_imports:
        env['XTUNER_PLUGINS_EAGER_IMPORTS'] = '1'
    log_path = folder / f'{name}.log'
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **{k: str(v) for k, v in env.items()}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak, done = [0, []], threading.Event()

    def sample():
        while not done.is_set():
            total, each = pss_of_tree(proc.pid)
            if total > peak[0]:
                peak[:] = [total, each]
            done.wait(every)
    threading.Thread(target=sample, daemon=True).start()
    step = None
    while proc.poll() is None and time.perf_counter() - start < timeout:
        if re.search(r' - INFO - iter 1/', log_path.read_text(errors='replace')):
            step = time.perf_counter() - start
            break
        time.sleep(0.5)
    time.sleep(every * 2)  # the step's own memory
    done.set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(30)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    if step is None:
        print(log_path.read_text(errors='replace')[-3000:])
        raise SystemExit(f'{name}: no first step within {timeout:.0f} s (log {log_path})')
    print(f'RESULT {name} start to first step: {step:.1f} s', flush=True)
    print(f'RESULT {name} peak summed PSS: {peak[0] / 2**30:.2f} GiB ({len(peak[1])} processes: '
          + ', '.join(f'{pss / 2**20:.0f}' for _, _, pss, _ in peak[1]) + ' MiB; private: '
          + ', '.join(f'{private / 2**20:.0f}' for _, private, _, _ in peak[1]) + ' MiB; anonymous, not mapped '
          f'files: {sum(anon for *_, anon in peak[1]) / 2**30:.2f} GiB)', flush=True)


def check(folder: Path, data: Path, workers: int) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(folder / 'check_cache'))
    shutil.rmtree(folder / 'check_cache', ignore_errors=True)
    cmd = [sys.executable, str(ROOT / 'tools' / 'check_dataset.py'), '--data', str(data), '--image-folder',
           str(folder / 'images'), '--tokenizer', str(folder / 'models' / 'llm'), '--image-size', '56',
           '--max-dynamic-patch', '4', '--max-length', '2048'] + (['--workers', str(workers)] if workers else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    print('\n'.join(out.stdout.splitlines()[-12:]))
    if out.returncode not in (0, 1):
        raise SystemExit(f'check_dataset failed ({out.returncode}): {out.stderr[-2000:]}')
    print(f'RESULT check_dataset: {took:.1f} s (exit {out.returncode})', flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--samples', type=int, default=558128)
    p.add_argument('--format', choices=('json', 'jsonl'), default='json')
    p.add_argument('--images', type=int, default=1000, help='distinct images the samples share (default 1000)')
    p.add_argument('--workdir', default=str(ROOT / 'work_dirs' / 'bench_data_scale'))
    p.add_argument('--every', type=float, default=1.0, help='seconds between PSS samples (default 1)')
    p.add_argument('--timeout', type=float, default=1800)
    p.add_argument('--workers', type=int, default=0, help='check_dataset --workers (default: its own, every core)')
    p.add_argument('--length-field', action='store_true',
                   help='samples carry InternVL\'s "length" and the data set uses it (length_field=\'length\')')
    p.add_argument('--launcher', choices=('local', 'torchrun'), default='local',
                   help="'local' (default): the product's, tools/train.py --nproc-per-node 2; "
                        "'torchrun': XTuner's train script under torchrun")
    p.add_argument('--eager-imports', action='store_true',
                   help='the ranks import DeepSpeed and bitsandbytes at start-up (XTUNER_PLUGINS_EAGER_IMPORTS=1)')
    p.add_argument('--no-import', default='', metavar='PKG,...',
                   help='packages the run\'s processes may not import, as if not installed (measurement only; '
                        'e.g. deepspeed,bitsandbytes, which MMEngine imports eagerly)')
    p.add_argument('--skip-cold', action='store_true', help='keep the cache of an earlier run (warm only)')
    p.add_argument('--skip-check', action='store_true')
    p.add_argument('--skip-train', action='store_true')
    args = p.parse_args(argv)
    folder = Path(args.workdir)
    data = write_data(folder, args.samples, args.images, args.format, args.length_field)
    cache = folder / f'cache_{data.stem}'
    variant = dict(launcher=args.launcher, no_import=[x for x in args.no_import.split(',') if x],
                   eager_imports=args.eager_imports)
    tag = (f' {args.launcher}' if args.launcher != 'local' else '') + (
        ' eager-imports' if args.eager_imports else '') + (f' no-import={args.no_import}' if args.no_import else '')
    if not args.skip_train:
        if not args.skip_cold:
            shutil.rmtree(cache, ignore_errors=True)
            first_step(folder, data, cache, args.every, args.timeout, f'{data.stem} cold{tag}', args.length_field,
                       **variant)
        first_step(folder, data, cache, args.every, args.timeout, f'{data.stem} warm{tag}', args.length_field,
                   **variant)
    if not args.skip_check:
        check(folder, data, args.workers)
    return 0


if __name__ == '__main__':
    sys.exit(main())
