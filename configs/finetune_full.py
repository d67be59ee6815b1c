# Stage 2, full fine-tuning (InternVL 2.5): the projector `mlp1` and the whole LLM trained, lr 4e-5, cosine.
# train_vision = True also trains the vision tower, as InternVL's stage 1.5 "ViT incremental learning":
# its own lr 1e-5 (a per-module lr through MMEngine's paramwise_cfg) and drop path 0.1.
#
#   NPROC_PER_NODE=8 xtuner train configs/finetune_full.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth \
#       train_dataloader.dataset.data_files=[data/sft.jsonl] train_dataloader.dataset.image_folders=[data/images]
#
# Models: see configs/pretrain_mlp.py. Data: LLaVA-format json/jsonl or InternVL meta files (README, "Data").
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
data_files = ['data/sft.jsonl']
image_folders = ['data/images']
train_vision = False      # True: InternVL stage 1.5, the vision tower is trained too
lr = 4e-5                 # LLM and projector
vision_lr = 1e-5          # vision tower, when trained
vision_drop_path = 0.1    # vision tower, when trained
weight_decay = 0.05
batch_size = 4
accumulative_counts = 4
max_length = 8192
max_dynamic_patch = 12
# ---------------------------------------------------------------------------------------

model.update(vision_encoder=vision_encoder_path, llm=llm_path, pretrained_pth=pretrained_pth,
             freeze_vision=not train_vision, freeze_projector=False, freeze_llm=False,
             vision_drop_path=vision_drop_path if train_vision else 0.0, vision_grad_ckpt=train_vision,
             llm_grad_ckpt=True)
train_dataloader.update(batch_size=batch_size)
train_dataloader.sampler.update(per_device_batch_size=batch_size)
train_dataloader.dataset.update(data_files=data_files, image_folders=image_folders, tokenizer=llm_path,
                                max_length=max_length, max_dynamic_patch=max_dynamic_patch)
optim_wrapper.update(accumulative_counts=accumulative_counts)
# paramwise_cfg sits inside `optimizer` so that it survives XTuner's --deepspeed rewrite
optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay, paramwise_cfg=dict(
    custom_keys={'vision_model': dict(lr_mult=vision_lr / lr)}))
