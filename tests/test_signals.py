"""SIGTERM taken as Ctrl-C (xtuner_plugins/signals.py), as the demo, the converter and the model tools take it."""

import os
import signal
import time

import pytest

from xtuner_plugins.signals import Terminated, sigterm_as_interrupt


def test_sigterm_raises_an_interrupt_inside_and_the_handler_before_comes_back():
    """A SIGTERM left the demo's training running, orphaned, and a converter's folder half written: inside the
    block it raises Terminated (a KeyboardInterrupt), and the handler before is put back."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler raises here at once
    assert issubclass(Terminated, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
