"""Train with XTuner's own train script, in this process, so the exit code is the run's.

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--deepspeed JSON|NAME] [--resume CKPT] [--cfg-options ...]
    torchrun --nproc_per_node=4 tools/train.py CONFIG --launcher pytorch --deepspeed deepspeed_zero2

The same options as ``xtuner train`` (it runs ``xtuner/tools/train.py``'s ``main``), with two differences:
``xtuner train`` exits 0 even when training crashed, this exits non-zero with the traceback; and
``--resume work_dirs/<cfg>/iter_N.pth`` works under torch >= 2.6, where XTuner reads the checkpoint's seed with
``torch.load``'s new ``weights_only`` default, which refuses MMEngine checkpoints (they pickle training state
next to the weights) before any training code runs. Only resume from checkpoints you trust (your own runs).
"""

import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import xtuner_plugins.engine  # noqa: E402,F401  (the checkpoint patches: atomic writes, resume loading)


def main() -> int:
    from xtuner.tools import train as xtuner_train
    read_seed = xtuner_train.get_seed_from_checkpoint

    def seed_from_checkpoint(path):
        # MMEngine / DeepSpeed checkpoints of one's own runs: full unpickling, as the runner's resume does
        with mock.patch.object(torch, 'load', lambda *a, **k: torch_load(*a, **{'weights_only': False, **k})):
            return read_seed(path)

    torch_load = torch.load
    xtuner_train.get_seed_from_checkpoint = seed_from_checkpoint
    xtuner_train.main()
    return 0


if __name__ == '__main__':
    sys.exit(main())
