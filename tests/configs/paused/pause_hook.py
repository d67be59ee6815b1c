"""A hook that holds a run still right after a checkpoint is saved, so that tests/configs/test_resume.py can
SIGKILL it there on any machine: the tiny runs make an iteration in ~20 ms, less than a test's polling."""

import time

from mmengine.hooks import Hook


class PauseAfterSaveHook(Hook):
    """Sleeps ``seconds`` after iteration ``at`` once every other hook of it ran (the checkpoint saved)."""

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW)

    def __init__(self, at: int = 4, seconds: float = 60):
        self.at, self.seconds = at, seconds

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.at:
            time.sleep(self.seconds)
