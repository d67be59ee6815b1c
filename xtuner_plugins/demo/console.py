"""The demo's terminal output: :class:`Console` prints and keeps ``demo.log``; :class:`DemoError` is a failed
stage."""

from __future__ import annotations

import os
import time
from typing import Optional

__all__ = ['Console', 'DemoError', 'fmt_time']


class Console:
    """Prints to the terminal and appends to ``demo.log`` in the work folder."""

    def __init__(self, log_path: Optional[str] = None, quiet: bool = False):
        self.log_path = log_path
        self.quiet = quiet
        self.start = time.perf_counter()
        if log_path:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, 'w', encoding='utf-8'):
                pass

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str = '') -> None:
        if not self.quiet:
            print(message, flush=True)
        if self.log_path:
            with open(self.log_path, 'a', encoding='utf-8') as f:
                f.write(message + '\n')

    def step(self, title: str) -> None:
        self(f'\n== [{fmt_time(self.elapsed())}] {title}')


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f'{m:d}:{s:02d}'


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""
