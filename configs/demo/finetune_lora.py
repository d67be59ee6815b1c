# The embedded demo's stage 2, LoRA fine-tuning: configs/finetune_lora.py with the demo's short system message
# (configs/_base_/demo.py). `make demo` (tools/demo.py) trains it on the demo's tiny models and data, which it
# passes as --cfg-options (the full command is in work_dirs/demo/<stage>/train_output.log).
# A system message is set in a config, not with --cfg-options: MMEngine deletes the spaces of option values.
from mmengine.config import read_base

with read_base():
    from .._base_.demo import *
    from ..finetune_lora import *

train_dataloader.dataset.update(system=demo_system_message)
