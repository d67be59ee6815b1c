# configs/pretrain_mlp.py with iterations slowed down (slow_hook.py), for the Slurm test's stops mid-run
from mmengine.config import read_base

from tests.slurm.slow_hook import SlowIterHook

with read_base():
    from ...configs.pretrain_mlp import *  # noqa: F401,F403

custom_hooks.append(dict(type=SlowIterHook, seconds=0.3))
