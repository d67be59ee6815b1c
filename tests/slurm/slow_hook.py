"""A hook that makes each training iteration last ``seconds`` longer, so that tests/test_slurm.py can stop a run
under Slurm in the middle (an iteration of the tiny runs takes ~20 ms, less than the test's polling)."""

import time

from mmengine.hooks import Hook


class SlowIterHook(Hook):
    """Sleeps ``seconds`` at the start of every training iteration."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        time.sleep(self.seconds)
