# AdamW with linear warm-up then cosine decay, counted in iterations; mixed precision on GPUs.
from mmengine.optim import CosineAnnealingLR
from torch.optim import AdamW
from xtuner.engine.runner import TrainLoop

from xtuner_plugins.engine import AutoOptimWrapper, WarmupLR

lr = 2e-4
weight_decay = 0.01
betas = (0.9, 0.999)
max_norm = 1.0            # gradient clipping
accumulative_counts = 1   # gradient accumulation
max_epochs = 1
warmup_ratio = 0.03

# bf16 autocast when CUDA is available, plain fp32 on a CPU (AutoOptimWrapper decides).
optim_wrapper = dict(
    type=AutoOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    dtype='bfloat16',
)

param_scheduler = [
    # WarmupLR: MMEngine's LinearLR, lasting at least one iteration on short runs
    dict(type=WarmupLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)
