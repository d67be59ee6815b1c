# SigLIP-so400m-384 + bilinear MLP + Qwen2.5-0.5B-Instruct, stage 2: SFT of the projector and the whole LLM,
# from the stage-1 checkpoint.
#
#   NPROC_PER_NODE=4 xtuner train configs/siglip_finetune.py --deepspeed deepspeed_zero2 --cfg-options \
#       model.pretrained_pth=work_dirs/siglip_pretrain/iter_N.pth
#   python tools/convert_to_official.py configs/siglip_finetune.py work_dirs/siglip_finetune/iter_M.pth OUT \
#       --cfg-options model.pretrained_pth=work_dirs/siglip_pretrain/iter_N.pth    # a remote-code folder
#
# configs/finetune_full.py with the model of configs/_base_/models/siglip_bilinear.py; data as there.
from mmengine.config import read_base

with read_base():
    from .finetune_full import *
    from ._base_.models.siglip_bilinear import *

lr = 2e-5                 # LLaVA-1.5's stage-2 lr
model.update(vision_encoder=vision_encoder, projector=projector, image_mode=image_mode, llm=llm_path)
optim_wrapper.optimizer.update(lr=lr)
