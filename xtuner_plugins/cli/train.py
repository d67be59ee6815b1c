"""Train with XTuner's own train script, in this process, so the exit code is the run's.

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--deepspeed JSON|NAME] [--resume CKPT] [--cfg-options ...]
    torchrun --nproc_per_node=4 tools/train.py CONFIG --launcher pytorch --deepspeed deepspeed_zero2

The same options as ``xtuner train`` (it runs ``xtuner/tools/train.py``'s ``main``), with three differences:
``xtuner train`` exits 0 even when training crashed, this exits non-zero with the traceback and a closing
``train: FAILED: ...`` line; and
``--resume work_dirs/<cfg>/iter_N.pth`` works under torch >= 2.6, where XTuner reads the checkpoint's seed with
``torch.load``'s new ``weights_only`` default, which refuses MMEngine checkpoints (they pickle training state
next to the weights) before any training code runs (only resume from checkpoints you trust: your own runs);
and ``--cfg-options`` are checked first: a variable of the config file (``llm_path=...``, which changes nothing
once the file is read) or a misspelt setting of a component is refused with what to set instead.
"""

import os
import sys
import traceback
from unittest import mock

import torch

import xtuner_plugins.engine  # noqa: F401  (the checkpoint patches: atomic writes, resume loading)


def main() -> int:
    from xtuner.tools import train as xtuner_train
    read_seed = xtuner_train.get_seed_from_checkpoint

    def seed_from_checkpoint(path):
        # MMEngine / DeepSpeed checkpoints of one's own runs: full unpickling, as the runner's resume does
        with mock.patch.object(torch, 'load', lambda *a, **k: torch_load(*a, **{'weights_only': False, **k})):
            return read_seed(path)

    torch_load = torch.load
    xtuner_train.get_seed_from_checkpoint = seed_from_checkpoint
    args = xtuner_train.parse_args()
    if args.cfg_options and os.path.isfile(args.config):
        from mmengine.config import Config

        from xtuner_plugins.engine.options import check_cfg_options
        problems = check_cfg_options(Config.fromfile(args.config), args.cfg_options)
        if problems:
            print('train: error: --cfg-options:\n  ' + '\n  '.join(problems), file=sys.stderr)
            return 2
    try:
        xtuner_train.main()
    except Exception as exc:  # the traceback first, then a short summary a person sees at the end
        traceback.print_exc()
        work_dir = args.work_dir or os.path.join('work_dirs', os.path.splitext(os.path.basename(args.config))[0])
        message = str(exc).splitlines()[0] if str(exc) else ''
        print(f'\ntrain: FAILED: {type(exc).__name__}: {message}\n  the traceback is above; the run\'s log is under '
              f'{work_dir}/<timestamp>/', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
