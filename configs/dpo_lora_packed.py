# configs/dpo_lora.py on packed pairs: several pairs per row, up to 16384 tokens and 48 tiles (a pack of pairs
# is a row of chosen answers and a row of rejected answers, the pairs in the same order; attention never
# crosses pairs, each pair's log-probabilities are summed on its own), one pack per device per step.
#
#   xtuner train configs/dpo_lora_packed.py --cfg-options model.pretrained_pth=work_dirs/finetune_lora/iter_N.pth \
#       train_dataloader.dataset.dataset.data_files=[data/my_pairs.jsonl] \
#       train_dataloader.dataset.dataset.image_folders=[data/images]
#
# attn_implementation as in configs/finetune_full_packed.py ('sdpa_segments' anywhere; 'flex_attention' or
# 'flash_attention_2' on a GPU).
from mmengine.config import read_base

from xtuner_plugins.data.packing import PackedInternVLDataset

with read_base():
    from .dpo_lora import *

# ---------------------------------------------------------------- settings users edit
max_tokens = 16384        # tokens per row (each pair counted by its longer answer)
max_tiles = 48            # tiles per pack
attn_implementation = 'sdpa_segments'
# ---------------------------------------------------------------------------------------

model.update(attn_implementation=attn_implementation)
# assigned, not update()d: update() would merge into the wrapped dataset's own dict
train_dataloader['dataset'] = dict(type=PackedInternVLDataset, dataset=train_dataloader['dataset'],
                                   max_tokens=max_tokens, max_tiles=max_tiles)
train_dataloader.update(batch_size=1)
train_dataloader.sampler.update(per_device_batch_size=1)
