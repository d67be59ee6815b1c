# Stage 2 with QLoRA: configs/finetune_lora.py with the LLM loaded in 4-bit NF4 with double quantisation
# (bitsandbytes); LoRA adapters on top, the projector and vision tower in full precision.
#
#   xtuner train configs/finetune_qlora.py --cfg-options model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth \
#       train_dataloader.dataset.data_files=[my_data/train.jsonl] train_dataloader.dataset.image_folders=[my_data/images]
#   NPROC_PER_NODE=4 xtuner train configs/finetune_qlora.py --deepspeed deepspeed_zero2 --cfg-options ...
#
# 4-bit weights are not partitioned by ZeRO-3: use plain data parallel or ZeRO-2.
from mmengine.config import read_base

with read_base():
    from .finetune_lora import *

# ---------------------------------------------------------------- settings users edit
llm_quantization = dict(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)
# ---------------------------------------------------------------------------------------

model.update(llm_quantization=llm_quantization)
