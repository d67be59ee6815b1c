"""Errors raised for bad samples.

Every problem with one sample is a :class:`SampleError`. It carries a short ``reason`` (a stable key used
to count skips of the same kind, e.g. ``"missing_image"``) and a message that names the file, the line
and the numbers involved. The dataset catches it, counts it, logs the first one of each reason, and stops
training only past a configurable fraction of failures.
"""

from __future__ import annotations

from typing import Optional


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


class TooManyBadSamplesError(RuntimeError):
    """Raised when the fraction of bad samples passes the configured limit."""
