# configs/dpo_lora.py held still for a minute after its iteration-4 checkpoint (the resume test kills it there)
from mmengine.config import read_base

from tests.configs.paused.pause_hook import PauseAfterSaveHook

with read_base():
    from ....configs.dpo_lora import *  # noqa: F401,F403

custom_hooks.append(dict(type=PauseAfterSaveHook, at=4))
