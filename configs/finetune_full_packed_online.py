# configs/finetune_full_packed.py with online packing, as InternVL's PackedDataset: each rank's DataLoader workers
# pack their own part of the data as it streams in (a buffer of max_buffer_size open packs), so no sample's length
# is computed before training starts. The training length is in iterations (max_iters: packed batches): the number of packs is
# not known ahead. A resumed run continues each worker's stream exactly where it stood (StreamStateHook), with the
# same numbers of ranks and DataLoader workers.
#
#   NPROC_PER_NODE=8 xtuner train configs/finetune_full_packed_online.py --deepspeed deepspeed_zero3 --cfg-options \
#       model.pretrained_pth=work_dirs/pretrain_mlp/iter_N.pth max_iters=5000 \
#       train_dataloader.dataset.dataset.data_files=[data/sft.jsonl] \
#       train_dataloader.dataset.dataset.image_folders=[data/images]
from mmengine.config import read_base

from xtuner_plugins.data.online_packing import OnlinePackedDataset
from xtuner_plugins.data.streaming import stream_collate_fn
from xtuner_plugins.engine.streamstate import StreamStateHook

with read_base():
    from .finetune_full_packed import *

# ---------------------------------------------------------------- settings users edit
max_iters = 1000          # iterations (max_epochs cannot be counted before the packs are made)
max_buffer_size = 20      # open packs each DataLoader worker keeps (InternVL's)
# ---------------------------------------------------------------------------------------

train_dataloader['dataset'] = dict(type=OnlinePackedDataset, dataset=train_dataloader['dataset']['dataset'],
                                   max_tokens=max_tokens, max_tiles=max_tiles, max_buffer_size=max_buffer_size)
train_dataloader['sampler'] = None  # a stream: each worker reads its own part (data/streaming.py)
train_dataloader['collate_fn'].update(type=stream_collate_fn)
custom_hooks.append(dict(type=StreamStateHook))
