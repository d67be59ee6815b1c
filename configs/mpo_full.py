# Full MPO (InternVL 2.5's preference stage) after SFT: the projector `mlp1` and the whole LLM trained on pairs
# (sigmoid 0.8 + bco_pair 0.2 + sft 1.0, beta 0.1, lr 1e-6), the vision tower frozen. The reference policy is a
# frozen copy of the trained parts as loaded (one more LLM in the weights' dtype; benchmarks/RESULTS.md).
#
#   NPROC_PER_NODE=8 xtuner train configs/mpo_full.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/finetune_full/iter_N.pth \
#       train_dataloader.dataset.data_files=[data/my_pairs.jsonl] train_dataloader.dataset.image_folders=[data/images]
#
# From an official InternVL folder instead: model.official_checkpoint=models/InternVL2_5-1B model.vision_encoder=None
# model.llm=None (the data set takes its tokenizer from it). Pairs: see configs/dpo_lora.py.
from mmengine.config import read_base

from xtuner_plugins.data import InternVLPreferenceDataset, preference_collate_fn
from xtuner_plugins.engine import PreferenceStateHook

with read_base():
    from .finetune_full import *

# ---------------------------------------------------------------- settings users edit
data_files = ['data/my_pairs.jsonl']
image_folders = ['data/my_images']
preference = dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1)  # MPO
lr = 1e-6
batch_size = 2            # pairs per device: twice the rows in one forward
# ---------------------------------------------------------------------------------------

model.update(preference=preference)
train_dataloader.update(batch_size=batch_size, collate_fn=dict(type=preference_collate_fn))
train_dataloader.sampler.update(per_device_batch_size=batch_size)
train_dataloader.dataset.update(type=InternVLPreferenceDataset, data_files=data_files, image_folders=image_folders)
optim_wrapper.optimizer.update(lr=lr)
custom_hooks.append(dict(type=PreferenceStateHook))   # the BCO baseline goes into checkpoints
