# The toy model under the stage configs' schedule (configs/_base_/schedules/cosine.py: AdamW, warm-up, cosine
# decay over the run, max_epochs / max_iters) and checkpoint setting (save_every): 8 samples, batch 4, two
# iterations per epoch. Needs the repository root on PYTHONPATH (for `tests.engine.toy`).
from mmengine.config import read_base
from mmengine.dataset import InfiniteSampler

from tests.engine.toy import ToyRegressionDataset, ToyRegressionModel, toy_collate_fn

with read_base():
    from ._base_.toy_runtime import *  # noqa: F401,F403
    from ....configs._base_.schedules.cosine import *  # noqa: F401,F403

model = dict(type=ToyRegressionModel, in_dim=8, hidden=16)
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    dataset=dict(type=ToyRegressionDataset, num_samples=8, seed=0),
    # InfiniteSampler: its length is still one pass (2 batches), and MMEngine restarts no data loader (it
    # sleeps 2 s at each restart of an iteration-based loop's)
    sampler=dict(type=InfiniteSampler, shuffle=False),
    collate_fn=dict(type=toy_collate_fn),
)
optim_wrapper.optimizer.update(lr=0.05, weight_decay=0.0)  # noqa: F405
save_every = 1000
default_hooks.checkpoint.update(interval=None, max_keep_ckpts=-1)  # noqa: F405  (save_every's)
