# LLaVA-1.5 on Qwen2.5, stage 2 with LoRA: vision tower frozen, LoRA adapters on every linear layer of the LLM,
# the projector trained with a larger learning rate than the adapters; exported as transformers' LLaVA.
#
#   xtuner train configs/llava_finetune_lora.py --cfg-options model.pretrained_pth=work_dirs/llava_pretrain/iter_N.pth \
#       train_dataloader.dataset.data_files=[my_data/train.jsonl] \
#       train_dataloader.dataset.image_folders=[my_data/images]
#   python tools/convert_to_official.py configs/llava_finetune_lora.py work_dirs/llava_finetune_lora/iter_M.pth \
#       work_dirs/my_llava --format llava --cfg-options model.pretrained_pth=work_dirs/llava_pretrain/iter_N.pth
#
# configs/finetune_lora.py with the model of configs/_base_/models/clip_llava.py; data as there.
from mmengine.config import read_base

with read_base():
    from .finetune_lora import *
    from ._base_.models.clip_llava import *

lr = 2e-4                 # the LoRA adapters (LLaVA-1.5's LoRA lr)
projector_lr = 1e-3       # the projector: larger, so a fresh one catches up
llm_lora = dict(r=128, lora_alpha=256, lora_dropout=0.05, target_modules='all-linear')  # LLaVA-1.5's LoRA
model.update(vision_encoder=vision_encoder, projector=projector, image_mode=image_mode, llm=llm_path,
             llm_lora=llm_lora)
optim_wrapper.optimizer.update(lr=lr, paramwise_cfg=dict(custom_keys={'mlp1': dict(lr_mult=projector_lr / lr)}))
