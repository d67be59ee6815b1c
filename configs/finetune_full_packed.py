# configs/finetune_full.py on packed sequences (as InternVL 2.5 trains): samples are packed greedily up to
# 16384 tokens and 48 tiles per row, attention never crosses samples, one pack per device per step.
#
#   NPROC_PER_NODE=8 xtuner train configs/finetune_full_packed.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth \
#       train_dataloader.dataset.dataset.data_files=[data/sft.jsonl] \
#       train_dataloader.dataset.dataset.image_folders=[data/images]
#
# Attention inside packs (attn_implementation below, or --cfg-options model.attn_implementation=NAME):
# 'sdpa_segments' (the default: causal SDPA on each sample in turn, no mask; trains on a CPU and a GPU), on a GPU
# with flash-attn 'flash_attention_2' (varlen kernels), on a GPU without it 'flex_attention' (PyTorch's
# FlexAttention with a document-causal BlockMask; compiled, about 30 s at the start; no CPU backward); 'sdpa'
# (a dense block-diagonal mask, L x L per pack) is the baseline. On an H100, 1.5B, 16k-token packs: segments
# 17.0k tokens/s, flex about 19.7k once compiled, sdpa 11.8k in an earlier run (benchmarks/RESULTS.md, GPU). With
# blocks compiled and no layer checkpointed (what this config's 'auto' settings chose on an H200) 34.2k on an H200.
from mmengine.config import read_base

from xtuner_plugins.data.packing import PackedInternVLDataset

with read_base():
    from .finetune_full import *

# ---------------------------------------------------------------- settings users edit
max_tokens = 16384        # tokens per pack (InternVL 2.5)
max_tiles = 48            # tiles per pack: bounds the vision tower's batch
loss_reduction = 'square'  # InternVL 2.5's square averaging, per sample inside the packs
attn_implementation = 'sdpa_segments'  # 'flex_attention' on a GPU without flash-attn, 'flash_attention_2' with it
# ---------------------------------------------------------------------------------------

model.update(loss_reduction=loss_reduction, attn_implementation=attn_implementation)
# assigned, not update()d: update() would merge into the wrapped dataset's own dict
train_dataloader['dataset'] = dict(type=PackedInternVLDataset, dataset=train_dataloader['dataset'],
                                   max_tokens=max_tokens, max_tiles=max_tiles)
train_dataloader.update(batch_size=1)
train_dataloader.sampler.update(per_device_batch_size=1)
