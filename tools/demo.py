"""The embedded demo: tiny models and synthetic data made here, MLP warm-up, fine-tuning, conversion to the
layout that fits the model family and answers to held-out questions, on a CPU, with nothing downloaded.

Usage::

    make demo                                        # = .venv/bin/python tools/demo.py
    make demo NPROC_PER_NODE=2 DEEPSPEED=zero3       # two processes, DeepSpeed ZeRO-3 (CPU JSON)
    python tools/demo.py --recipe quick              # a shortened run
    python tools/demo.py --set finetune=lora finetune_iters=2000  # change the recipe
    python tools/demo.py --recipe quick --set vision=clip projector=mlp   # LLaVA-style: CLIP + MLP -> llava
    xtuner-plugins-demo --recipe quick               # the same, installed as a console script

Outputs (logs, TensorBoard events, checkpoints, the converted folder, answers) go to ``work_dirs/demo/``;
the last lines printed are ``serving: ...`` (how to serve it with vLLM), ``converted: PATH (FORMAT)`` and
``demo accuracy: A (N questions); blind control: B``. ``--configs DIR`` names the repository's ``configs/`` when the package is installed without its
checkout. The orchestration is ``xtuner_plugins/demo/run.py``; its parts are beside it in ``xtuner_plugins/demo/``.
"""

import sys

from xtuner_plugins.demo.run import main

if __name__ == '__main__':
    sys.exit(main())
