# Stage 2 with LoRA: LoRA adapters on every linear layer of the LLM, the projector `mlp1` fully trained,
# the vision tower frozen (or with LoRA adapters too: set vision_lora below). The everyday
# "LoRA fine-tune on my own jsonl", starting from an MLP warm-up checkpoint:
#
#   xtuner train configs/finetune_lora.py --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth \
#       train_dataloader.dataset.data_files=[my_data/train.jsonl] \
#       train_dataloader.dataset.image_folders=[my_data/images]
#   NPROC_PER_NODE=4 xtuner train configs/finetune_lora.py --deepspeed deepspeed_zero2 --cfg-options ...
#
# configs/finetune_full.py (models, lr 4e-5, batch) with the LLM frozen under LoRA adapters.
# Data: LLaVA-format json/jsonl (docs/data.md).
from mmengine.config import read_base

with read_base():
    from .finetune_full import *

# ---------------------------------------------------------------- settings users edit
data_files = ['data/my_sft.jsonl']
image_folders = ['data/my_images']
llm_lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear')  # InternVL's LoRA rank 16
vision_lora = None        # e.g. dict(r=16, lora_alpha=32, lora_dropout=0.05)
projector_lr = 4e-5       # mlp1; a larger one than the adapters' (lr, 4e-5) helps a fresh projector catch up
# ---------------------------------------------------------------------------------------

model.update(freeze_llm=True, llm_lora=llm_lora, vision_lora=vision_lora)
train_dataloader.dataset.update(data_files=data_files, image_folders=image_folders)
# assigned, not update()d: update() would merge into finetune_full's custom_keys (the vision tower's lr)
optim_wrapper.optimizer['paramwise_cfg'] = dict(custom_keys={'mlp1': dict(lr_mult=projector_lr / lr)})
