# A toy XTuner-style (lazy-import) config: two Linear layers on a fixed random regression set.
# Runs with `xtuner train`, `train.py --launcher pytorch --deepspeed configs/deepspeed/zero{2,3}_cpu.json`.
# Needs the repository root on PYTHONPATH (for `tests.engine.toy`).
from mmengine.config import read_base
from mmengine.dataset import InfiniteSampler
from mmengine.runner import IterBasedTrainLoop
from torch.optim import AdamW

from tests.engine.toy import ToyRegressionDataset, ToyRegressionModel, toy_collate_fn
from xtuner_plugins.engine.runtime import AutoOptimWrapper

with read_base():
    from ._base_.toy_runtime import *  # noqa: F401,F403

# Model: `model.crash_at_iter=N` (cfg option) makes the N-th training forward raise.
model = dict(type=ToyRegressionModel, in_dim=8, hidden=16, crash_at_iter=0)

# Data: 8 fixed samples, batch 4 per process, no shuffling (InfiniteSampler: an iteration-based loop
# would otherwise restart the dataloader, which MMEngine pauses for): one process sees two alternating
# batches, each of two processes sees one batch every iteration, so iterations 1 and 5 see the same batch.
batch_size = 4
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=dict(type=ToyRegressionDataset, num_samples=8, seed=0),
    sampler=dict(type=InfiniteSampler, shuffle=False),
    collate_fn=dict(type=toy_collate_fn),
)

optim_wrapper = dict(
    type=AutoOptimWrapper,
    optimizer=dict(type=AdamW, lr=0.05, betas=(0.9, 0.999), weight_decay=0.0),
    clip_grad=dict(max_norm=1.0, error_if_nonfinite=False),
    accumulative_counts=1,
    loss_scale='dynamic',
    dtype='bfloat16',
)

train_cfg = dict(type=IterBasedTrainLoop, max_iters=max_iters)
