# LLaVA-format json/jsonl (or InternVL meta files) with InternVL 2.5 dynamic tiling.
from xtuner.dataset.samplers import LengthGroupedSampler

from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.engine import DATALOADER_WORKERS

data_files = ['data/llava_pretrain/blip_laion_cc_sbu_558k.json']
image_folders = ['data/llava_pretrain/images']
tokenizer_path = None      # the LLM's tokenizer: the stage config sets its model's llm_path
batch_size = 4          # per device
num_workers = DATALOADER_WORKERS   # 4, or the core count where smaller
max_length = 8192
image_size = 448        # the vision encoder's tile size
max_dynamic_patch = 12

train_dataset = dict(
    type=InternVLDataset,
    data_files=data_files,
    image_folders=image_folders,
    repeat_times=1.0,
    tokenizer=tokenizer_path,
    template='internvl2_5',
    max_length=max_length,
    image_size=image_size,
    patch_size=14,
    downsample_ratio=0.5,
    min_dynamic_patch=1,
    max_dynamic_patch=max_dynamic_patch,
    use_thumbnail=True,
    max_bad_fraction=0.01,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=num_workers,
    pin_memory=True,
    persistent_workers=True,
    dataset=train_dataset,
    sampler=dict(type=LengthGroupedSampler, length_property='length', per_device_batch_size=batch_size,
                 seed=42),
    collate_fn=dict(type=internvl_collate_fn),
)
