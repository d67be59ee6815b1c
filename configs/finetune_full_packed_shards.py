# configs/finetune_full_packed_online.py reading WebDataset tar shards (tools/shard_dataset.py) instead of annotation
# files: online packing (each DataLoader worker packs its own stream in a buffer of max_buffer_size open packs) over
# each worker's own shards (data/shards.py). The per-sample settings (tokenizer, template, max_length, tiling) stay
# finetune_full_packed's; the training length is in iterations (max_iters). A resumed run continues each
# worker's shards and buffer exactly where they stood (StreamStateHook), with the same numbers of ranks and workers.
#
#   python tools/shard_dataset.py --data data/sft.jsonl --image-folder data/images --out data/sft_shards
#   NPROC_PER_NODE=8 xtuner train configs/finetune_full_packed_shards.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth max_iters=5000 \
#       train_dataloader.dataset.dataset.shards=data/sft_shards
from mmengine.config import read_base

from xtuner_plugins.data.shards import ShardDataset, ShardSamples

with read_base():
    from .finetune_full_packed_online import *

# ---------------------------------------------------------------- settings users edit
shards = 'data/my_shards'  # tools/shard_dataset.py's --out
# ---------------------------------------------------------------------------------------

train_dataloader['dataset']['dataset'] = dict(type=ShardDataset, shards=shards, dataset=dict(
    train_dataloader['dataset']['dataset'], type=ShardSamples, data_files=None, image_folders=None, repeat_times=None))
