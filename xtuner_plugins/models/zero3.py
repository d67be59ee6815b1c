"""Editing weights that DeepSpeed ZeRO-3 may have partitioned.

Under ``--deepspeed`` with ZeRO-3, XTuner registers the DeepSpeed config with transformers, so
``from_pretrained`` builds the LLM inside ``deepspeed.zero.Init``: each rank holds a shard of every
weight and ``weight.data`` is empty. Reading or changing whole weights (untying embeddings, resizing
them, loading a previous stage) must gather them first; :func:`gathered` does that, and is a no-op
otherwise (plain runs, ZeRO-2, parameters DeepSpeed has not partitioned).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, 'ds_id')


def shape_of(param: torch.Tensor) -> torch.Size:
    """The full shape, also of a partitioned parameter."""
    return param.ds_shape if is_zero3_partitioned(param) else param.shape


def gathered(params: Iterable[torch.Tensor], modify: bool = False):
    """Context in which the given parameters are whole on every rank. With ``modify``, the changes
    made on rank 0 are written back to every rank's shard."""
    params = [p for p in params if is_zero3_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def hf_zero3_init(enabled: bool):
    """Let transformers build models inside ``deepspeed.zero.Init`` (its default once XTuner has
    registered a ZeRO-3 config) only when ``enabled``.

    Disabled, each rank loads whole weights and DeepSpeed partitions them when the engine starts, as
    under ZeRO-2. On a CPU with gloo, loading inside ``zero.Init`` was measured to be unreliable: in one
    of six identical 2-process runs a partitioned weight (``layers.1.self_attn.v_proj``) came out
    different, so the default turns it off without CUDA.
    """
    from transformers.integrations import deepspeed as hf_deepspeed
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps the registration here
    if not enabled:
        hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
