# Stage 1, MLP warm-up (InternVL 2.5): train the projector `mlp1` only; vision tower and LLM frozen (the
# model defaults of configs/_base_/models/internvit_qwen2_5.py).
#
#   NPROC_PER_NODE=4 xtuner train configs/pretrain_mlp.py --deepspeed deepspeed_zero3
#   xtuner train configs/pretrain_mlp.py                              # one process (also on a CPU)
#   NPROC_PER_NODE=2 xtuner train configs/pretrain_mlp.py --deepspeed configs/deepspeed/zero2_cpu.json
#
# Models: the folders models/InternViT-300M-448px-V2_5 and models/Qwen2.5-1.5B-Instruct, set (with their
# download commands and how to point elsewhere) in configs/_base_/models/internvit_qwen2_5.py. Data:
#   huggingface-cli download liuhaotian/LLaVA-Pretrain --repo-type dataset --local-dir data/llava_pretrain
#   (cd data/llava_pretrain && mkdir -p images && unzip -q images.zip -d images)
# Data layout: data/llava_pretrain/blip_laion_cc_sbu_558k.json + data/llava_pretrain/images/<00000>/<id>.jpg
# Check it first: python tools/check_dataset.py --data data/llava_pretrain/blip_laion_cc_sbu_558k.json \
#                     --image-folder data/llava_pretrain/images --tokenizer models/Qwen2.5-1.5B-Instruct
from mmengine.config import read_base

with read_base():
    from ._base_.datasets.internvl_sft import *
    from ._base_.default_runtime import *
    from ._base_.models.internvit_qwen2_5 import *
    from ._base_.schedules.cosine import *

# ---------------------------------------------------------------- settings users edit
data_files = ['data/llava_pretrain/blip_laion_cc_sbu_558k.json']
image_folders = ['data/llava_pretrain/images']
batch_size = 4            # per device; 4 GPUs x 4 x accumulation 4 = 64 samples per step
accumulative_counts = 4
lr = 2e-4                 # InternVL 2.5 stage 1
weight_decay = 0.01
max_length = 8192
max_dynamic_patch = 12
# ---------------------------------------------------------------------------------------

train_dataloader.update(batch_size=batch_size)
train_dataloader.sampler.update(per_device_batch_size=batch_size)
train_dataloader.dataset.update(data_files=data_files, image_folders=image_folders, max_length=max_length,
                                max_dynamic_patch=max_dynamic_patch)  # tile size, tokenizer...: the model's
optim_wrapper.update(accumulative_counts=accumulative_counts)
optim_wrapper.optimizer.update(lr=lr, weight_decay=weight_decay)
