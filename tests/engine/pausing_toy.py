"""The toy model of ``toy.py`` that stops one rank in the middle of a run, for the run guard tests
(``test_runguard.py``): ``pause_at_iter=N`` makes rank ``pause_rank`` stop in its N-th training forward,
``pause_how='stop'`` with SIGSTOP to itself (a frozen rank), ``'sleep'`` in a sleep of ``pause_s`` seconds (a
run still going: a slow step), ``'backward'`` in that sleep inside the step's ``backward()``, in the recompute of
one of several activation-checkpointed branches (as the CPU's LLM layers run: a Ctrl-C lands there)."""

import os
import signal
import time

import torch

from tests.engine.toy import ToyRegressionModel


def _sleep(seconds: float) -> None:
    """A slow step: ``seconds`` in slices of 50 ms, as a step runs Python between its operators. The kernel may hand
    a signal for the process to any of its threads that does not block it (TensorBoard's writer, a DataLoader queue's
    feeder); its Python handler then runs at the main thread's next bytecode, and one ``time.sleep(3600)`` has none
    for an hour: the stop under test never came (3 runs of 16 on a loaded 2-core machine; faulthandler's stacks)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(end - time.monotonic(), 0)))


class PausingToyModel(ToyRegressionModel):

    def __init__(self, pause_at_iter: int = 0, pause_rank: int = 0, pause_how: str = 'stop', pause_s: float = 3600,
                 **kwargs):
        super().__init__(**kwargs)
        self.pause_at_iter, self.pause_rank, self.pause_how, self.pause_s = pause_at_iter, pause_rank, pause_how, pause_s
        self._forwards = 0

    def forward(self, data, data_samples=None, mode='loss'):
        pause = False
        if mode == 'loss' and self.training:
            self._forwards += 1
            pause = self._forwards == self.pause_at_iter and int(os.environ.get('RANK', '0')) == self.pause_rank
            if pause and self.pause_how == 'stop':
                os.kill(os.getpid(), signal.SIGSTOP)
            elif pause and self.pause_how == 'sleep':
                _sleep(self.pause_s)
        out = super().forward(data, data_samples, mode)
        if pause and self.pause_how == 'backward':
            out['loss'] = out['loss'] + self._checkpointed_branches(data['inputs'])
        return out

    def _checkpointed_branches(self, inputs):
        from torch.utils.checkpoint import checkpoint
        recomputing = []

        def branch(k, x):
            if recomputing:   # the second call of a branch: its recompute, inside backward()
                _sleep(self.pause_s)
            return (torch.tanh(self.proj(x)) @ self.proj.weight).pow(2).mean() * 0.0 * k

        total = sum(checkpoint(branch, k, inputs, use_reentrant=False) for k in range(1, 9))
        recomputing.append(True)
        return total
