# SigLIP-so400m-384 + bilinear MLP + Qwen2.5-0.5B-Instruct, stage 1: the projector only (169 tokens per image).
#
#   NPROC_PER_NODE=4 xtuner train configs/siglip_pretrain.py --deepspeed deepspeed_zero2
#
# configs/pretrain_mlp.py with the model of configs/_base_/models/siglip_bilinear.py; data as there.
from mmengine.config import read_base

with read_base():
    from .pretrain_mlp import *
    from ._base_.models.siglip_bilinear import *

lr = 1e-3                 # a fresh projector (LLaVA-1.5's stage-1 lr)
model.update(vision_encoder=vision_encoder, projector=projector, image_mode=image_mode, llm=llm_path)
optim_wrapper.optimizer.update(lr=lr)
