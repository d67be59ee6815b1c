"""benchmarks/rss.py: a window's rise of malloc's bytes in use is what the window held at once, even where glibc
keeps the freed memory (the resident set then does not fall back)."""

import contextlib
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
    rise = sampler.rise()
    assert 190 * mib < rise < 260 * mib, rise / mib
    assert sampler.live() - sampler.live_start < 20 * mib   # freed: no longer in use


@pytest.mark.skipif(_heap_in_use() is None, reason='malloc is not glibc (no mallinfo2): the RSS is used instead')
def test_ops_catch_a_peak_shorter_than_the_period():
    """A 200 MiB tensor that lives between two operators, far shorter than the thread's period: the window's
    rise still counts it when the bytes in use are read after operators with large outputs."""
    mib = 2 ** 20
    sampler = RssSampler(period=3600)
    time.sleep(0.05)   # the thread's first read is done; the next is an hour away
    for ops, expect in ((False, False), (True, True)):
        sampler.mark()
        with sampler.ops() if ops else contextlib.nullcontext():
            torch.ones(50 * mib).sum()
        rise = sampler.rise()
        assert (rise > 190 * mib) == expect, (ops, rise / mib)
