"""benchmarks/rss.py: a window's rise of malloc's bytes in use is what the window held at once, even where glibc
keeps the freed memory (the resident set then does not fall back)."""

import time

import pytest
import torch

from benchmarks.rss import RssSampler, _heap_in_use


@pytest.mark.skipif(_heap_in_use() is None, reason='malloc is not glibc (no mallinfo2): the RSS is used instead')
def test_window_rise_is_what_was_held_at_once():
    sampler = RssSampler(period=0.005)
    mib = 2 ** 20
    sampler.mark()
    for _ in range(3):   # three 200 MiB tensors one after another: 200 MiB held at once, not 600
        x = torch.ones(50 * mib)
        time.sleep(0.05)
        del x
    time.sleep(0.05)
    rise = sampler.live_peak - sampler.live_start
    assert 190 * mib < rise < 260 * mib, rise / mib
    assert sampler.live() - sampler.live_start < 20 * mib   # freed: no longer in use
