"""Peak memory of a conversion, against a plain converter on the same checkpoint in the same run.

Usage::

    .venv/bin/python benchmarks/bench_convert.py                 # ~180M-parameter LLM, full fine-tuning .pth
    .venv/bin/python benchmarks/bench_convert.py --hidden 1536 --layers 28 --intermediate 8960   # Qwen2.5-1.5B shapes

It writes a random InternViT (tiny) + Qwen2 LLM (the given shapes) in their real layouts, a full
fine-tuning checkpoint of ``configs/finetune_full.py`` (every LLM and projector weight, fp32, as MMEngine saves
it), and converts it to bf16 twice, each in its own process:

* ``ours``: ``tools/convert_to_official.py`` (model built once in bf16, checkpoint memory-mapped and copied
  tensor by tensor, shards written from the model's own memory);
* ``plain``: what a straightforward converter does (XTuner's ``convert_to_official`` pattern): build the
  training model in fp32, ``torch.load`` the whole checkpoint, load it, cast a bf16 copy of the state dict,
  save it.

Memory is sampled from ``/proc/PID/status`` every 10 ms: ``RssAnon`` (the process's own memory, what an
out-of-memory kill counts) and ``VmRSS`` (also file pages mapped from the checkpoint and the source weights,
which the kernel can drop). Each peak is reported over the process's memory right after its imports (a
process that only imports the same modules), as a multiple of the converted model's size (its bf16 bytes).
Goal (issue): ours under 1.5x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PLAIN = r'''
import sys, torch
from safetensors.torch import save_file
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.models.export import official_state_dict
from xtuner_plugins.models.internvl import VisionLanguageModel
from mmengine.config import DictAction
config, ckpt, out = sys.argv[1:4]
options = dict(a.split('=', 1) for a in sys.argv[4:])
cfg = load_config(config, {k: DictAction._parse_iterable(v) for k, v in options.items()})
kw = {k: v for k, v in dict(cfg.model).items() if k != 'type'}
kw.update(torch_dtype='float32')
model = VisionLanguageModel(**kw)                                     # the training model, fp32
state = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict']   # whole checkpoint
model.load_state_dict(state, strict=False)
del state
out_state = {k: v.to(torch.bfloat16).contiguous() for k, v in official_state_dict(model).items()}  # bf16 copy
save_file(out_state, out + '/model.safetensors')
'''

IMPORTS = ('import torch, transformers, xtuner_plugins.models.export, xtuner_plugins.models.internvl, '
           'safetensors.torch, mmengine.config, peft, time; time.sleep(3)')


def _status(pid: int) -> dict:
    values = {}
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            key, _, rest = line.partition(':')
            if key in ('RssAnon', 'VmRSS'):
                values[key] = int(rest.split()[0]) / 1024  # MB
    return values


def run_measured(cmd, env) -> dict:
    """Run ``cmd``; peak RssAnon / VmRSS (MB) sampled every 10 ms, wall time, return code."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {'RssAnon': 0.0, 'VmRSS': 0.0}

    def sample():
        while proc.poll() is None:
            try:
                for key, value in _status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    return dict(peaks, wall_s=time.time() - start, returncode=proc.returncode, output=output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--hidden', type=int, default=1024)
    parser.add_argument('--layers', type=int, default=16)
    parser.add_argument('--heads', type=int, default=16)
    parser.add_argument('--kv-heads', type=int, default=4)
    parser.add_argument('--intermediate', type=int, default=2816)
    parser.add_argument('--workdir', default=None, help='keep the files here (default: a temporary folder)')
    args = parser.parse_args()

    import torch
    from tests.configs.conftest import tiny_options
    from tests.helpers import tiny_workspace
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    from xtuner_plugins.tiny.llm import write_tiny_qwen2

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        paths = tiny_workspace(tmp)
        paths['llm'] = write_tiny_qwen2(os.path.join(tmp, 'llm_big'), hidden_size=args.hidden,
                                        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                        intermediate_size=args.intermediate)
        options = tiny_options(paths, paths['same'], repeat=1)
        config = os.path.join(ROOT, 'configs', 'finetune_full.py')
        model = build_for_export(load_config(config, options), None, torch.float32, log=lambda m: None)
        params = sum(p.numel() for p in model.parameters())
        ckpt = os.path.join(tmp, 'iter_1.pth')
        torch.save({'meta': {}, 'state_dict': model.state_dict()}, ckpt)
        del model
        out_bytes = params * 2
        print(f'model: {params / 1e6:.1f}M parameters; checkpoint {os.path.getsize(ckpt) / 2**20:.0f} MB (fp32); '
              f'converted (bf16) {out_bytes / 2**20:.0f} MB', flush=True)

        env = dict(os.environ, PYTHONPATH=ROOT)
        opts = [f'{k}={v}' for k, v in options.items()]
        base = run_measured([sys.executable, '-c', IMPORTS], env)
        rows = []
        for name, cmd in [
            ('ours', [sys.executable, os.path.join(ROOT, 'tools', 'convert_to_official.py'), config, ckpt,
                      os.path.join(tmp, 'ours'), '--dtype', 'bf16', '--cfg-options', *opts]),
            ('plain', [sys.executable, '-c', PLAIN, config, ckpt, os.path.join(tmp, 'plain'), *opts]),
        ]:
            os.makedirs(os.path.join(tmp, 'plain'), exist_ok=True)
            result = run_measured(cmd, env)
            if result['returncode'] != 0:
                print(result['output'][-3000:])
                raise SystemExit(f'{name} failed')
            anon = (result['RssAnon'] - base['RssAnon']) * 2**20 / out_bytes
            rss = (result['VmRSS'] - base['VmRSS']) * 2**20 / out_bytes
            rows.append((name, result['RssAnon'], result['VmRSS'], anon, rss, result['wall_s']))
        print(f'imports alone: RssAnon {base["RssAnon"]:.0f} MB, VmRSS {base["VmRSS"]:.0f} MB')
        print(f'{"converter":<8} {"RssAnon MB":>11} {"VmRSS MB":>9} {"anon/model":>11} {"rss/model":>10} {"wall s":>7}')
        for name, anon_mb, rss_mb, anon, rss, wall in rows:
            print(f'{name:<8} {anon_mb:>11.0f} {rss_mb:>9.0f} {anon:>11.2f} {rss:>10.2f} {wall:>7.1f}')
        print(f'ours: peak own memory {rows[0][3]:.2f}x the converted model (goal < 1.5x); '
              f'plain: {rows[1][3]:.2f}x')


if __name__ == '__main__':
    main()
