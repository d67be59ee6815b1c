# Preference training (DPO, or InternVL's MPO) with LoRA on pairs, after SFT: the LoRA adapters learn, the
# reference policy is the same model with its adapters off (no second copy), projector and vision frozen.
#
#   xtuner train configs/dpo_lora.py --cfg-options model.pretrained_pth=work_dirs/finetune_lora/iter_N.pth \
#       train_dataloader.dataset.data_files=[data/my_pairs.jsonl] train_dataloader.dataset.image_folders=[data/images]
#
# Pairs: InternVL's MMPR jsonl ({"image", "question", "chosen", "rejected"}) or conversations + chosen/rejected
# (xtuner_plugins/data/preference.py). MPO: set preference = MPO below (sigmoid 0.8 + bco_pair 0.2 + sft 1.0).
from mmengine.config import read_base

from xtuner_plugins.data import InternVLPreferenceDataset, preference_collate_fn
from xtuner_plugins.engine import PreferenceStateHook

with read_base():
    from .finetune_lora import *

# ---------------------------------------------------------------- settings users edit
data_files = ['data/my_pairs.jsonl']
image_folders = ['data/my_images']
preference = dict(types=('sigmoid',), beta=0.1)   # or xtuner_plugins.models.preference.MPO
lr = 5e-6
batch_size = 2            # pairs per device: twice the rows in one forward
# ---------------------------------------------------------------------------------------

model.update(preference=preference, freeze_projector=True)
train_dataloader.update(batch_size=batch_size, collate_fn=dict(type=preference_collate_fn))
train_dataloader.sampler.update(per_device_batch_size=batch_size)
train_dataloader.dataset.update(type=InternVLPreferenceDataset, data_files=data_files, image_folders=image_folders)
optim_wrapper.optimizer.update(lr=lr)
custom_hooks.append(dict(type=PreferenceStateHook))   # MPO's BCO baseline goes into checkpoints
