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
# Models: see configs/pretrain_mlp.py. Data: LLaVA-format json/jsonl (README, "Data").
from mmengine.config import read_base

with read_base():
    from ._base_.datasets.internvl_sft import *
    from ._base_.default_runtime import *
    from ._base_.models.internvit_qwen2_5 import *
    from ._base_.schedules.cosine import *

# ---------------------------------------------------------------- settings users edit
vision_encoder_path = 'models/InternViT-300M-448px-V2_5'
llm_path = 'models/Qwen2.5-1.5B-Instruct'
pretrained_pth = None     # the MLP warm-up checkpoint (file or DeepSpeed folder)
data_files = ['data/my_sft.jsonl']
image_folders = ['data/my_images']
llm_lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear')  # InternVL's LoRA rank 16
vision_lora = None        # e.g. dict(r=16, lora_alpha=32, lora_dropout=0.05)
batch_size = 4
accumulative_counts = 4
lr = 4e-5                 # InternVL 2.5 stage 2 (the LoRA adapters)
projector_lr = 4e-5       # mlp1; a larger one than the adapters' helps a fresh projector catch up
weight_decay = 0.05
max_length = 8192
max_dynamic_patch = 12
# ---------------------------------------------------------------------------------------

model.update(vision_encoder=vision_encoder_path, llm=llm_path, pretrained_pth=pretrained_pth,
             freeze_vision=True, freeze_projector=False, freeze_llm=True,
             llm_lora=llm_lora, vision_lora=vision_lora)
train_dataloader.update(batch_size=batch_size)
train_dataloader.sampler.update(per_device_batch_size=batch_size)
train_dataloader.dataset.update(data_files=data_files, image_folders=image_folders, tokenizer=llm_path,
                                max_length=max_length, max_dynamic_patch=max_dynamic_patch)
optim_wrapper.update(accumulative_counts=accumulative_counts)
# paramwise_cfg sits inside `optimizer` so that it survives XTuner's --deepspeed rewrite
optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay, paramwise_cfg=dict(
    custom_keys={'mlp1': dict(lr_mult=projector_lr / lr)}))
