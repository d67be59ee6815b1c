# The embedded demo's preference stage (`--set preference=dpo` or `mpo`): configs/dpo_lora.py with the demo's
# short system message (configs/_base_/demo.py), from the demo's fine-tuned checkpoint. tools/demo.py passes the
# models, pairs, loss and schedule as --cfg-options (the full command is in work_dirs/demo/preference/).
from mmengine.config import read_base

with read_base():
    from .._base_.demo import *
    from ..dpo_lora import *

train_dataloader.dataset.update(system=demo_system_message)
