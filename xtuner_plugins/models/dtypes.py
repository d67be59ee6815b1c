"""Dtype names: one parser for every ``--dtype`` / ``torch_dtype`` setting, one writer for ``config.json``."""

from __future__ import annotations

from typing import Union

import torch

from xtuner_plugins.errors import Refused

DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
          'float16': torch.float16, 'fp16': torch.float16}


def device_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def resolve_dtype(dtype: Union[str, torch.dtype, None], auto: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``: a dtype, or a name (``'bf16'``, ``'bfloat16'``, ``'torch.bfloat16'``, ...).

    ``'auto'`` (and None) means ``auto`` when the caller gives one (e.g. the dtype a folder's config records),
    else :func:`device_dtype`.
    """
    if dtype is None or dtype == 'auto':
        if auto is None or auto == 'auto':
            return device_dtype()
        dtype = auto
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace('torch.', '')
    if name not in DTYPES:
        raise Refused(f'unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or "auto"')
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``, as ``config.json`` records it."""
    return str(dtype).replace('torch.', '')
