"""``torch.load`` through an unpickler of our own, for the two readers of training checkpoints:
``models/checkpoint.py`` (as data, for conversion: anything unknown an inert placeholder) and
``engine/resume_load.py`` (as training state, for resume: anything unknown refused). Each has its unpickler; how
it reaches ``torch.load`` is here, and the check both make first that the file is whole (:func:`check_records`)."""

from __future__ import annotations

import contextlib
import os
import types
import zipfile
from typing import Callable, Iterator, Optional

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


def damaged_record(path) -> Optional[str]:
    """The first record of the checkpoint file ``path`` whose bytes do not match the CRC-32 ``torch.save`` wrote
    for it, or None (also for a file that is not a zip: torch.load says what it is). ``torch.load`` never checks
    them: a file with 100 flipped bytes in a weight converted and chatted without a word. Reads the whole file
    (0.41-0.46 s a GiB on the 2-core AMX Xeon, the file cached: benchmarks/RESULTS.md)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):   # not a zip, or cut short: torch.load names that
        return None


def check_records(path, error: type = ValueError, then: str = 'copy it again, or use another checkpoint') -> None:
    """Raise ``error`` naming ``path`` and its record when :func:`damaged_record` finds one (``then``: what to do)."""
    bad = damaged_record(path)
    if bad is not None:
        raise error(f'{os.fspath(path)}: its record {bad} does not match the checksum (CRC-32) written with it: the '
                    f'file is damaged (a copy that went wrong, a failing disk); {then}')
