# Stage 2, full fine-tuning (InternVL 2.5): the projector `mlp1` and the whole LLM trained, lr 4e-5, cosine.
# train_vision = True also trains the vision tower, as InternVL's stage 1.5 "ViT incremental learning":
# its own lr 1e-5 (a per-module lr through MMEngine's paramwise_cfg) and drop path 0.1.
#
#   NPROC_PER_NODE=8 xtuner train configs/finetune_full.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth \
#       train_dataloader.dataset.data_files=[data/sft.jsonl] train_dataloader.dataset.image_folders=[data/images]
#
# configs/pretrain_mlp.py (models, batch, sequence length, tiles) with the LLM trained on SFT data.
# Data: LLaVA-format json/jsonl or InternVL meta files (docs/data.md).
from mmengine.config import read_base

with read_base():
    from .pretrain_mlp import *

# ---------------------------------------------------------------- settings users edit
pretrained_pth = None     # the MLP warm-up checkpoint (file or DeepSpeed folder)
data_files = ['data/sft.jsonl']
image_folders = ['data/images']
train_vision = False      # True: InternVL stage 1.5, the vision tower is trained too
lr = 4e-5                 # LLM and projector
vision_lr = 1e-5          # vision tower, when trained
vision_drop_path = 0.1    # vision tower, when trained
weight_decay = 0.05
# ---------------------------------------------------------------------------------------

model.update(pretrained_pth=pretrained_pth, freeze_vision=not train_vision, freeze_llm=False,
             vision_drop_path=vision_drop_path if train_vision else 0.0, vision_grad_ckpt=train_vision)
train_dataloader.dataset.update(data_files=data_files, image_folders=image_folders)
# paramwise_cfg sits inside `optimizer` so that it survives XTuner's --deepspeed rewrite
optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay, paramwise_cfg=dict(
    custom_keys={'vision_model': dict(lr_mult=vision_lr / lr)}))
