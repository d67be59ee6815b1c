# configs/finetune_full_packed_shards.py writing what each rank trained on (record_hook.py)
from mmengine.config import read_base

from tests.configs.recorded.record_hook import RecordSamplesHook

with read_base():
    from ....configs.finetune_full_packed_shards import *  # noqa: F401,F403

custom_hooks.append(dict(type=RecordSamplesHook))  # noqa: F405
