"""Evaluate a vision-language model, and measure how much it relies on the image.

Usage::

    # open questions in the training format (the last gpt turn is the reference), exact match after VQA's
    # normalisation (or --metric anls)
    python tools/eval.py work_dirs/my_internvl --data data/test.jsonl --image-folder data/images --out report.json
    # multiple choice in MMBench's TSV layout (base64 images), with CircularEval
    python tools/eval.py work_dirs/my_internvl --data MMBench_DEV_EN.tsv --circular
    # straight from training: the config (with the run's --cfg-options) and a checkpoint
    python tools/eval.py --config configs/finetune_lora.py --checkpoint work_dirs/finetune_lora/iter_N.pth \\
        --data data/test.jsonl

Every question is asked greedily through the converted folder (any format: official, remote, llava, hf; loaded
as ``tools/chat.py`` loads it), then again with each image replaced by a blank one of the same size (the
blind control; ``--no-blind`` skips it). The console shows a per-category table; the last line is
``accuracy: A (N questions); blind: B; image reliance: R`` (reliance = accuracy - blind accuracy: what the
image adds). ``--out`` writes a JSON report with every answer, reference and score.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from xtuner_plugins.eval import Report, evaluate, read_questions
from xtuner_plugins.eval.scoring import METRICS
from xtuner_plugins.models.inference import add_model_arguments, check_model_arguments, run_tool, tool_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument('--data', required=True, help='a training-format .jsonl, or an MMBench-layout .tsv')
    p.add_argument('--image-folder', help='folder the jsonl\'s image paths are relative to (default: its folder)')
    p.add_argument('--metric', choices=sorted(METRICS), default='exact', help='open questions: exact or anls')
    p.add_argument('--circular', action='store_true', help='MMBench: ask every rotation of the options')
    blind = p.add_mutually_exclusive_group()
    blind.add_argument('--blind', dest='blind', action='store_true', default=True,
                       help='also ask on blank images (the default)')
    blind.add_argument('--no-blind', dest='blind', action='store_false', help='skip the blind control')
    p.add_argument('--limit', type=int, default=None, help='the first N questions only')
    p.add_argument('--max-new-tokens', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=1,
                   help='questions per generation batch (one image each; others go one at a time)')
    p.add_argument('--out', help='write a JSON report here')
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error('--batch-size must be at least 1')
    check_model_arguments(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        questions = read_questions(args.data, args.image_folder, circular=args.circular)
    except (OSError, ValueError) as exc:
        return tool_error('eval', exc)
    questions = questions[:args.limit] if args.limit else questions
    torch.manual_seed(0)

    def run(model) -> None:
        start = time.perf_counter()
        step = max(1, len(questions) // 20)
        printed = [0]

        def progress(i, n, results):
            if i // step > printed[0] or i == n:
                printed[0] = i // step
                right = sum(r.score for r in results)
                print(f'  {i}/{n} questions, {right:.0f} right so far, {i / (time.perf_counter() - start):.2f} '
                      f'questions/s', file=sys.stderr, flush=True)

        results = evaluate(model, questions, blind=args.blind, metric=args.metric,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress)
        report = Report(results)
        if args.out:
            report.write(args.out, folder=args.folder or f'{args.config} + {args.checkpoint}', data=args.data,
                         metric=args.metric, circular=args.circular, blind=args.blind)
        print(report.table())
        print(report.closing_line())

    return run_tool(args, 'eval', run)


if __name__ == '__main__':
    sys.exit(main())
