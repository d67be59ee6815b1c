# LLaVA-format json/jsonl (or InternVL meta files) with InternVL 2.5 dynamic tiling.
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.data.sampler import LengthGroupedSampler  # XTuner's order, numpy arrays (no list per sample)
from xtuner_plugins.engine import DATALOADER_WORKERS

# The tile size, tokens per tile, image mode, padding colour, template and tokenizer are the model's: left None
# here, each is read from the stage config's `model` (its encoder's config.json, projector, LLM folder) before the
# data set is built (xtuner_plugins/engine/derive.py), and logged (`data set: image_size 448, ...`). Setting one
# (here or --cfg-options train_dataloader.dataset.KEY=...) keeps it; one that disagrees with the model stops
# start-up, naming both values (ModelDataCheckHook).
data_files = ['data/llava_pretrain/blip_laion_cc_sbu_558k.json']
image_folders = ['data/llava_pretrain/images']
batch_size = 4          # per device
num_workers = DATALOADER_WORKERS   # 4, or the core count where smaller
max_length = 8192
max_dynamic_patch = 12

train_dataset = dict(
    type=InternVLDataset,
    data_files=data_files,
    image_folders=image_folders,
    repeat_times=1.0,
    tokenizer=None,         # the model's: model.tokenizer, model.llm or model.official_checkpoint
    template=None,          # the model's: model.template
    max_length=max_length,
    image_size=None,        # the vision encoder's tile size
    num_image_token=None,   # the projector's tokens per tile
    image_mode=None,        # the model's: model.image_mode
    image_mean=None,        # the encoder's mean (the padding colour of image_mode 'pad')
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
