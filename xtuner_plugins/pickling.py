"""``torch.load`` through an unpickler of our own, for the two readers of training checkpoints:
``models/checkpoint.py`` (as data, for conversion: anything unknown an inert placeholder) and
``engine/resume_load.py`` (as training state, for resume: anything unknown refused). Each has its unpickler; how
it reaches ``torch.load`` is here."""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch


def pickle_module(unpickler: type) -> types.ModuleType:
    """A module to pass as ``torch.load``'s ``pickle_module``: its ``Unpickler`` and ``load`` are ``unpickler``'s."""
    module = types.ModuleType(f'xtuner_plugins_{unpickler.__name__}')
    module.Unpickler = unpickler
    module.load = lambda f, **kwargs: unpickler(f, **kwargs).load()
    return module


@contextlib.contextmanager
def torch_load_as(load: Callable) -> Iterator[None]:
    """Inside the block, ``torch.load(f, map_location, **kwargs)`` is ``load(real_torch_load, f, map_location,
    **kwargs)``: for code that calls ``torch.load`` itself (XTuner's seed reader, DeepSpeed's ``zero_to_fp32``)."""
    real = torch.load
    torch.load = lambda f, map_location=None, **kwargs: load(real, f, map_location, **kwargs)
    try:
        yield
    finally:
        torch.load = real
