# LLaVA-1.5 on Qwen2.5 (CLIP ViT-L/14-336 + 2-layer MLP + Qwen2.5-0.5B-Instruct), stage 1: the projector only,
# on LLaVA-Pretrain (LLaVA-1.5's lr 1e-3).
#
#   NPROC_PER_NODE=4 xtuner train configs/llava_pretrain.py --deepspeed deepspeed_zero2
#
# configs/pretrain_mlp.py with the model of configs/_base_/models/clip_llava.py; data as there.
from mmengine.config import read_base

with read_base():
    from .pretrain_mlp import *
    from ._base_.models.clip_llava import *

lr = 1e-3
model.update(vision_encoder=vision_encoder, projector=projector, image_mode=image_mode, llm=llm_path)
optim_wrapper.optimizer.update(lr=lr)
