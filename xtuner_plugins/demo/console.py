"""The demo's terminal output: :class:`Console` prints and keeps ``demo.log``; :class:`DemoError` is a failed
stage."""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Iterator, Optional

from xtuner_plugins.quiet import quiet_mmengine_info

__all__ = ['Console', 'DemoError', 'fmt_time', 'quiet_mmengine_info']


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

    @contextlib.contextmanager
    def under_step(self, indent: str = '    ') -> Iterator[None]:
        """A tool run in this process (the converter, a model built to read its geometry): what it prints goes
        under the step, indented, and into ``demo.log``; MMEngine's INFO lines (the CPU patches, the parameter
        counts, the tensors loaded) are left out, its warnings and errors still print."""
        out = io.StringIO()
        try:
            with quiet_mmengine_info(), contextlib.redirect_stdout(out):
                yield
        finally:
            for line in out.getvalue().splitlines():
                self(indent + line)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f'{m:d}:{s:02d}'


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""
