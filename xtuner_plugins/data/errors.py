"""Errors raised for bad samples.

Every problem with one sample is a :class:`SampleError`. It carries a short ``reason`` (a stable key used
to count skips of the same kind, e.g. ``"missing_image"``) and a message that names the file, the line
and the numbers involved. The dataset catches it, counts it, logs the first one of each reason, and stops
training only past a configurable fraction of failures.
"""

from __future__ import annotations

from typing import Optional

from xtuner_plugins.errors import Stated


class SampleError(Exception):
    """A sample that cannot be used, with a countable reason.

    Args:
        reason: short stable key for counting (``"missing_image"``, ``"image_tag_mismatch"``, ...).
        message: human-readable explanation with the numbers involved.
        source: where the sample comes from, ``"FILE:LINE"``; filled in by the dataset when known.
    """

    def __init__(self, reason: str, message: str, source: Optional[str] = None):
        self.reason = reason
        self.message = message
        self.source = source
        super().__init__(self.__str__())

    def with_source(self, source: str) -> "SampleError":
        self.source = source
        self.args = (self.__str__(),)
        return self

    def __str__(self) -> str:
        prefix = f'{self.source}: ' if self.source else ''
        return f'{prefix}{self.message} [{self.reason}]'


class TooManyBadSamplesError(Stated, RuntimeError):
    """Raised when the fraction of bad samples passes the configured limit."""


def from_pretrained_named(load, path: str, key: str):
    """``load(path)`` (a ``from_pretrained``); a path that is neither a folder nor in the local Hugging Face cache
    is reported with the config key that set it, where transformers would speak of an internet connection
    (nothing is downloaded at run time here)."""
    import os
    try:
        return load(path)
    except (OSError, ValueError) as exc:  # not cached / not a repo id (huggingface_hub's HFValidationError)
        if os.path.isdir(path):
            raise
        raise FileNotFoundError(f'{key}: {path!r} is neither a folder nor in the local Hugging Face cache (nothing '
                                f'is downloaded at run time); download it first (huggingface-cli download REPO '
                                f'--local-dir FOLDER) and set {key} to its folder') from exc
