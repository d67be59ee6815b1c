"""The toy model of ``toy.py`` that stops one rank in the middle of a run, for the run guard tests
(``test_runguard.py``): ``pause_at_iter=N`` makes rank ``pause_rank`` stop in its N-th training forward,
``pause_how='stop'`` with SIGSTOP to itself (a frozen rank), ``'sleep'`` in a sleep of ``pause_s`` seconds (a
run still going: a slow step)."""

import os
import signal
import time

from tests.engine.toy import ToyRegressionModel


class PausingToyModel(ToyRegressionModel):

    def __init__(self, pause_at_iter: int = 0, pause_rank: int = 0, pause_how: str = 'stop', pause_s: float = 3600,
                 **kwargs):
        super().__init__(**kwargs)
        self.pause_at_iter, self.pause_rank, self.pause_how, self.pause_s = pause_at_iter, pause_rank, pause_how, pause_s
        self._forwards = 0

    def forward(self, data, data_samples=None, mode='loss'):
        if mode == 'loss' and self.training:
            self._forwards += 1
            if self._forwards == self.pause_at_iter and int(os.environ.get('RANK', '0')) == self.pause_rank:
                if self.pause_how == 'stop':
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    time.sleep(self.pause_s)
        return super().forward(data, data_samples, mode)
