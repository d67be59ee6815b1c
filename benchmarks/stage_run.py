"""A stage config trained through ``tools/train.py`` on ``benchmarks/synthetic.py``'s prepared models and data: what
the configs' defaults do on the machine (``llm_grad_ckpt_layers='auto'`` and ``compile_blocks='auto'`` on a GPU),
and whether the run they choose fits. ``benchmarks/gpu.py``'s ``SIZE stage`` row runs it; by hand::

    python benchmarks/stage_run.py --work /tmp/gpuwork/1.5b --steps 8 --json stage.json

Prints and writes (``--json``): whether the run succeeded (``xtuner_plugins.outcome.judge``, no checkpoint asked:
none is saved, to spare the minutes a real-size one takes), the ``llm_grad_ckpt_layers='auto'`` line, the peak
memory (``train/peak_mem_mb``, ThroughputHook's) and the tokens/s of the last logged iterations.

The prepared LLM folder holds the tiny tokenizer (524 rows with InternVL's tokens). Training resizes the embeddings
to the tokenizer, so the run trains beside it, in ``WORK/stage_llm``, the same config and weights (linked) with a
tokenizer of Qwen2.5's length (``xtuner_plugins.tiny.realsize.build_qwen25_tokenizer``: the tiny tokenizer's BPE,
its merges and first ids unchanged, padded to 151,643 entries, then Qwen2.5's special tokens): the LM head has the
real 151,674 rows, as bench_train.py's rows resize to, and the texts tokenize as with the tiny tokenizer. (Rows of
the fourth GPU runs and before: 524 rows.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, 'configs', 'finetune_full_packed.py')


def options(models: dict, data: str, work: str, steps: int) -> dict:
    inner = 'train_dataloader.dataset.dataset.'
    images = os.path.join(os.path.dirname(data), 'images')
    return {'model.vision_encoder': models['internvit'], 'model.llm': models['llm'], 'model.from_scratch': True,
            inner + 'data_files': f'[{data}]', inner + 'image_folders': f'[{images}]',
            inner + 'cache_dir': os.path.join(work, 'stage_cache'), 'max_iters': steps,
            'optim_wrapper.accumulative_counts': 1, 'default_hooks.logger.interval': 1,
            'log_processor.window_size': 1, 'save_every': steps * 1000,
            'default_hooks.checkpoint.save_last': False}


def full_vocabulary_llm(llm: str, out: str) -> str:
    """``out``: ``llm``'s files other than its tokenizer's, linked, with a tokenizer of Qwen2.5's length (module
    docstring); made once."""
    from xtuner_plugins.tiny.realsize import build_qwen25_tokenizer
    if not os.path.exists(os.path.join(out, 'tokenizer.json')):
        tokenizer = build_qwen25_tokenizer()
        os.makedirs(out, exist_ok=True)
        # config.json keeps the tiny ids (its pad id must index the weights' rows before the resize; training reads
        # the markers' ids from the tokenizer)
        for name in os.listdir(llm):
            if name.endswith(('.safetensors', '.safetensors.index.json', '.bin')) or name in (
                    'config.json', 'generation_config.json'):
                target = os.path.join(out, name)
                if not os.path.lexists(target):
                    os.symlink(os.path.abspath(os.path.join(llm, name)), target)
        tokenizer.save_pretrained(out)
    return out


def run(work: str, steps: int, timeout: float) -> dict:
    from xtuner_plugins.launch import run_train
    from xtuner_plugins.outcome import judge
    with open(os.path.join(work, 'prepared.json')) as f:
        prepared = json.load(f)
    models = dict(prepared['models'], llm=full_vocabulary_llm(prepared['models']['llm'],
                                                              os.path.join(work, 'stage_llm')))
    out = run_train(CONFIG, os.path.join(work, 'stage_run'), cfg_options=options(
        models, prepared['data'], work, steps), timeout=timeout, require_checkpoint=False)
    reasons = judge(out, require_checkpoint=False)
    auto = re.search(r"llm_grad_ckpt_layers='auto': [^\n]*", out.log)
    peaks = out.scalar_series('peak_mem_mb')
    tokens = out.scalar_series('tokens_per_sec')
    late = [tokens[i] for i in sorted(tokens)][2:]   # past the compiled blocks' warm-up
    from xtuner_plugins.models.llm import load_tokenizer
    return dict(ok=not reasons, reasons=reasons, auto=auto[0] if auto else None,
                lm_head_rows=len(load_tokenizer(models['llm'])[0]),   # the rows training resizes the head to
                peak_mib=max(peaks.values()) if peaks else None,
                tokens_per_s=sum(late) / len(late) if late else None, last_iter=out.last_iter,
                tail=out.log.splitlines()[-5:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work', required=True, help="a folder benchmarks/synthetic.py's prepare wrote")
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--timeout', type=float, default=600)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    figures = run(args.work, args.steps, args.timeout)
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=1)
    return 0 if figures['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
