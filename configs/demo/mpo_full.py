# The embedded demo's preference stage with `--set preference=mpo preference_train=full`: configs/mpo_full.py
# (projector and LLM trained, a frozen copy as the reference) with the demo's short system message, from the
# demo's fully fine-tuned checkpoint. tools/demo.py passes the models, pairs, loss and schedule as --cfg-options.
from mmengine.config import read_base

with read_base():
    from .._base_.demo import *
    from ..mpo_full import *

train_dataloader.dataset.update(system=demo_system_message)
