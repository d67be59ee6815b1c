# configs/finetune_lora.py reading WebDataset tar shards (tools/shard_dataset.py) instead of annotation files: for
# data that outgrows one file. Each rank's DataLoader workers stream their own shards (data/shards.py); the items,
# tiling and templates are InternVLDataset's. A resumed run continues each worker's stream where it stood
# (StreamStateHook), with the same numbers of ranks and DataLoader workers.
#
#   python tools/shard_dataset.py --data data/my_sft.jsonl --image-folder data/my_images --out data/my_shards
#   NPROC_PER_NODE=4 xtuner train configs/finetune_lora_shards.py --deepspeed deepspeed_zero2 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth train_dataloader.dataset.shards=data/my_shards
from mmengine.config import read_base

from xtuner_plugins.data.shards import ShardDataset, ShardSamples
from xtuner_plugins.data.streaming import stream_collate_fn
from xtuner_plugins.engine.streamstate import StreamStateHook

with read_base():
    from .finetune_lora import *

# ---------------------------------------------------------------- settings users edit
shards = 'data/my_shards'  # tools/shard_dataset.py's --out
# ---------------------------------------------------------------------------------------

# the per-sample settings (tokenizer, template, max_length, tiling) stay finetune_lora's; the files are the shards'
train_dataloader['dataset'] = dict(type=ShardDataset, shards=shards, dataset=dict(
    train_dataloader['dataset'], type=ShardSamples, data_files=None, image_folders=None, repeat_times=None))
train_dataloader['sampler'] = None  # a stream: each worker reads its own shards
train_dataloader['collate_fn'].update(type=stream_collate_fn)
custom_hooks.append(dict(type=StreamStateHook))
