# The toy config with the run guards of configs/_base_/default_runtime.py: one run per work folder
# (RunLockHook) and the stall watchdog (`stall_timeout` seconds), on a model that can stop one rank
# (`model.pause_at_iter=N model.pause_rank=R model.pause_how=stop|sleep`, see tests/engine/pausing_toy.py).
from mmengine.config import read_base

from tests.engine.pausing_toy import PausingToyModel
from xtuner_plugins.engine.runlock import RunLockHook
from xtuner_plugins.engine.watchdog import StallWatchdogHook

with read_base():
    from .toy_regression import *  # noqa: F401,F403

stall_timeout = 300
model = dict(type=PausingToyModel, in_dim=8, hidden=16, pause_at_iter=0, pause_rank=0, pause_how='stop')
default_hooks.update(run_lock=dict(type=RunLockHook),  # noqa: F405
                     stall_watchdog=dict(type=StallWatchdogHook, timeout=stall_timeout))
