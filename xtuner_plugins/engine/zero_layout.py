"""Whether a DeepSpeed checkpoint folder can be resumed by this run's ZeRO stage and number of ranks, read from its
files before DeepSpeed loads it.

DeepSpeed writes a checkpoint in the layout of its ZeRO stage: under ZeRO-3 each rank saves its part of the weights
(``zero_pp_rank_R_mp_rank_00_model_states.pt``), under ZeRO-0/1/2 rank 0 saves them whole
(``mp_rank_00_model_states.pt``); under ZeRO-1/2/3 each rank also saves its partition of the optimizer's state
(``zero_pp_rank_R_mp_rank_00_optim_states.pt``, ``bf16_`` before it with a bf16 optimizer). A resume under the other
layout stopped in a bare ``AssertionError`` from DeepSpeed's loader (``assert len(self.ckpt_list) > 0``: a ZeRO-2
checkpoint resumed with ``--deepspeed zero3``), and on another number of ranks with DeepSpeed's
``ZeRORuntimeException`` after the model was built (unless its universal checkpoints are on, which re-partition):
:func:`zero_refusal` says either in one line, with how to go on, before anything is loaded.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Tuple

_PART = re.compile(r'^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$')


def saved_zero(folder: str) -> Tuple[bool, Optional[int]]:
    """``(zero3, ranks)`` of a DeepSpeed checkpoint folder: whether it holds ZeRO-3's per-rank weights, and how many
    ranks saved a partition of the optimizer's state (None where none did: ZeRO-0)."""
    zero3, ranks = False, set()
    for name in os.listdir(folder):
        m = _PART.match(name)
        if m:
            zero3 = zero3 or m.group(2) == 'model'
            if m.group(2) == 'optim':
                ranks.add(int(m.group(1)))
    return zero3, (max(ranks) + 1 if ranks else None)


def run_zero(strategy) -> Tuple[Optional[int], bool]:
    """This run's ZeRO stage (None where its DeepSpeed config does not read) and whether it loads universal
    checkpoints (``checkpoint.load_universal``), which DeepSpeed partitions again for any number of ranks."""
    config = getattr(strategy, 'config', None)
    if not isinstance(config, Mapping):
        return None, False
    zero = config.get('zero_optimization') or {}
    stage = zero.get('stage', 0) if isinstance(zero, Mapping) else None
    universal = bool((config.get('checkpoint') or {}).get('load_universal')) \
        if isinstance(config.get('checkpoint'), Mapping) else False
    return (int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None), universal


def zero_refusal(folder: str, strategy, world_size: int, said: str) -> Optional[str]:
    """Why this run (``strategy``: its DeepSpeedStrategy; ``world_size`` ranks) cannot resume the DeepSpeed
    checkpoint ``folder``, or None (module docstring). ``said``: how the message names the resume."""
    stage, universal = run_zero(strategy)
    zero3, ranks = saved_zero(folder)
    new_run = 'or start a new run from its weights (model.pretrained_pth=PATH, another --work-dir)'
    if stage is not None and zero3 != (stage == 3):
        then = 'ZeRO-3 (each rank saved its part of the weights)' if zero3 else \
            'ZeRO-0/1/2 (the weights saved whole, in mp_rank_00_model_states.pt)'
        return (f'{said}: a checkpoint saved under {then}, and this run trains under ZeRO-{stage}: DeepSpeed '
                f'resumes a checkpoint only under the ZeRO stage it was saved with ({"3" if zero3 else "0, 1 or 2"}); '
                f'resume it with that --deepspeed (e.g. {"deepspeed_zero3" if zero3 else "deepspeed_zero2"}), '
                + new_run)
    if ranks is not None and ranks != world_size and not universal and stage not in (None, 0):
        return (f'{said}: saved by {ranks} ranks (each its partition of the optimizer\'s state: '
                f'zero_pp_rank_0..{ranks - 1}_*optim_states.pt), and this run has {world_size}: DeepSpeed resumes '
                f'ZeRO\'s partitioned optimizer state only on as many ranks; resume it on {ranks} (--nproc-per-node '
                f'{ranks}, NPROC_PER_NODE={ranks}), ' + new_run)
    return None
