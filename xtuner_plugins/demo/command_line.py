"""The demo's command line (``tools/demo.py``, ``xtuner-plugins-demo``): its options, the defaults it takes from the
environment (``$NPROC_PER_NODE``, ``$DEEPSPEED``) and their checks, each a one-line error. ``run.py``'s ``main``
reads it and runs the demo.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from .recipe import PROJECTOR_TYPES, RECIPES, VISION_TYPES
from .stages import REPO_ROOT


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='tools/demo.py',
        description='The embedded demo: tiny models and data made here, MLP warm-up, fine-tuning, conversion to '
                    'the official InternVL layout, and answers to held-out questions, on a CPU, offline.')
    parser.add_argument('--work-dir', default=os.path.join(REPO_ROOT, 'work_dirs', 'demo'),
                        help='output folder (default work_dirs/demo)')
    parser.add_argument('--nproc-per-node', type=int, default=None,
                        help='training processes (default $NPROC_PER_NODE or 1; >1 runs torch.distributed on gloo)')
    parser.add_argument('--deepspeed', default=os.environ.get('DEEPSPEED') or None,
                        help='zero2, zero3 (configs/deepspeed/*_cpu.json) or a DeepSpeed JSON (default $DEEPSPEED '
                             'or none)')
    parser.add_argument('--configs', default=None, metavar='DIR',
                        help="the repository's configs/ folder (default: the one of the checkout this package sits "
                             'in; needed when the package is installed without it)')
    parser.add_argument('--recipe', choices=sorted(RECIPES), default='default',
                        help='default: the full demo; quick: a shortened run (fewer samples and iterations)')
    parser.add_argument('--set', nargs='+', default=[], metavar='FIELD=VALUE',
                        help='override recipe fields, e.g. --set finetune_iters=2000 finetune=lora; the model '
                             f'family: vision={"|".join(VISION_TYPES)} projector={"|".join(PROJECTOR_TYPES)} '
                             '[image_mode=tile|resize|pad]')
    parser.add_argument('--seed', type=int, default=None, help='random seed (default: the recipe\'s, 0)')
    parser.add_argument('--preference-only', action='store_true',
                        help='rerun only the preference stage, from the fine-tuned model a whole run of the same '
                             'recipe left in --work-dir (to try --set preference_* settings)')
    parser.add_argument('--min-accuracy', type=float, default=None,
                        help='exit 1 when the accuracy is below this (default: no check)')
    args = parser.parse_args(argv)
    if args.nproc_per_node is None:
        try:
            args.nproc_per_node = int(os.environ.get('NPROC_PER_NODE') or 1)
        except ValueError:
            parser.error(f'NPROC_PER_NODE={os.environ["NPROC_PER_NODE"]!r}: expected a number of processes')
    if args.nproc_per_node < 1:
        parser.error(f'--nproc-per-node {args.nproc_per_node}: needs 1 or more')
    if args.deepspeed in ('', 'none', 'None', '0', 'no'):
        args.deepspeed = None
    if args.deepspeed not in (None, 'zero2', 'zero3') and not os.path.isfile(args.deepspeed):
        parser.error(f'--deepspeed {args.deepspeed}: use zero2, zero3 or a DeepSpeed JSON file')
    return args
