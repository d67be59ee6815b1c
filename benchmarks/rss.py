"""Memory of this process while it trains, sampled in a thread: the resident set, and the bytes glibc's malloc
has in use (which torch's CPU allocator draws on). Used by ``realsize.py`` and ``realsize_scaling.py``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
                                               'uordblks', 'fordblks', 'keepcost')]


def _jemalloc_in_use():
    """jemalloc's ``stats.allocated`` (its statistics refreshed by writing ``epoch``): the bytes it has handed out,
    when this process runs on it (``tools/train.py`` on a CPU: ``xtuner_plugins/malloc.py``); else None."""
    from xtuner_plugins.malloc import jemalloc_loaded
    if not jemalloc_loaded():
        return None
    mallctl = ctypes.CDLL(None).mallctl
    epoch, value, size = ctypes.c_uint64(1), ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))

    def read() -> int:
        mallctl(b'epoch', None, None, ctypes.byref(epoch), ctypes.c_size_t(ctypes.sizeof(epoch)))
        mallctl(b'stats.allocated', ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
        return value.value
    return read


def _heap_in_use():
    """The bytes malloc has handed out and not taken back, which torch's CPU allocator draws on: jemalloc's where
    it runs (:func:`_jemalloc_in_use`), else glibc's ``mallinfo2`` (``uordblks`` in its arenas + ``hblkhd``
    mapped); None off both."""
    jemalloc = _jemalloc_in_use()
    if jemalloc is not None:
        return jemalloc
    try:
        fn = ctypes.CDLL('libc.so.6').mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        m = fn()
        return m.uordblks + m.hblkhd
    return read


class RssSampler:
    """Resident set size, and the bytes malloc has in use, sampled every ``period`` s in a thread: ``mark()``
    starts a window; ``peak``/``start`` its largest and first RSS, ``live_peak``/``live_start`` the same of the
    bytes in use. The RSS keeps what glibc retains after a free, so a window's RSS rise after a smaller step
    counts the heap's growth; the bytes in use rise by what the window allocates and holds at once, whatever
    glibc retains (the activations the planner predicts). The thread takes the GIL at every sample: every 20 ms it
    slowed a real-size training step by 10% (51.7 and 50.9 s against 45.6 and 46.8 s without it); every 0.25 s
    (the default) by nothing measurable (48.5 s against 49.6 and 46.4 s). A step's peaks last seconds."""

    def __init__(self, period: float = 0.25):
        self.period, self.start, self.peak, self._stop = period, 0, 0, False
        self.live_start = self.live_peak = 0
        self._live = _heap_in_use()
        self._page = os.sysconf('SC_PAGE_SIZE')
        threading.Thread(target=self._loop, daemon=True).start()

    def rss(self) -> int:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * self._page

    def live(self) -> int:
        return self._live() if self._live else 0

    def mark(self):
        self.start = self.peak = self.rss()
        self.live_start = self.live_peak = self.live()

    def rise(self) -> int:
        """The window's rise: of the bytes in use (glibc), else of the resident set."""
        return self.live_peak - self.live_start if self._live else self.peak - self.start

    def ops(self, large: int = 16 * 2 ** 20):
        """A context in which the bytes in use are also read after every operator torch dispatches whose output
        holds ``large`` bytes or more (a ``TorchDispatchMode``), so that a peak shorter than the thread's period
        is not missed: a real-size step's forward peaks at the loss, for less than 0.25 s (benchmarks/RESULTS.md).
        Only after large outputs: reading after every operator cost 10% of a real-size step. Inside one operator
        only the thread sees."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        sampler = self

        class AfterLargeOutputs(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if any(torch.is_tensor(t) and t.nbytes >= large for t in tree_leaves(out)):
                    sampler.live_peak = max(sampler.live_peak, sampler.live())
                return out
        return AfterLargeOutputs() if self._live else contextlib.nullcontext()

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            self.live_peak = max(self.live_peak, self.live())
            time.sleep(self.period)
