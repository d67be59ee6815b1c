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
# How long to train, in your words: max_epochs=N passes over the data, or max_iters=N iterations (batches: an
# optimizer step every accumulative_counts of them; when set it wins over max_epochs); also --cfg-options max_epochs=3 or max_iters=200. The loop, the warm-up and the
# cosine decay follow the final value (filled in when the runner is built: xtuner_plugins/engine/length.py).
max_epochs = 1
max_iters = None
warmup_ratio = 0.03       # share of the run spent warming up

# bf16 autocast with CUDA (AmpOptimWrapper); on a CPU the model's own choice (model.torch_dtype: 'auto' trains bf16
# weights under bf16 autocast on a CPU where bf16 pays, models/precision.py; 'float32' plain fp32).
optim_wrapper = dict(
    type=AutoOptimWrapper,
    # fused: one kernel per step over every tensor (CUDA and CPU), no temporaries; torch's default (foreach on
    # CUDA) holds an fp32 copy of every trained parameter during the step (2.4 GiB for Qwen2.5-0.5B), and its
    # single-tensor CPU path took 1.7-2.4 s a step against 0.17 s fused (benchmarks/RESULTS.md)
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay, fused=True),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    dtype='bfloat16',
)

# begin/end in fractions of the run (schedule_unit='run'): stretched over max_epochs epochs, or over max_iters
# iterations, when the runner is built; the learning rate reaches eta_min at the end of the run.
schedule_unit = 'run'
param_scheduler = [
    # WarmupLR: MMEngine's LinearLR, lasting at least two iterations on short runs
    dict(type=WarmupLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio, convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio, end=1,
         convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop)  # its max_epochs / max_iters: from the settings above
