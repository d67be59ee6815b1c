# Runtime part of the toy configs, written like a stage config's base runtime: the distributed backend and
# the optimizer wrapper come from xtuner_plugins.engine.runtime (lazy imports, resolved when the runner
# reads them), so the same config runs on GPUs (nccl, bf16 AMP) and on a CPU (gloo, fp32).
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer

from xtuner_plugins.engine.hooks import ThroughputHook
from xtuner_plugins.engine.runtime import DIST_BACKEND

max_iters = 6

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type=DistSamplerSeedHook),
)
custom_hooks = [dict(type=ThroughputHook)]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend=DIST_BACKEND),
)

visualizer = dict(type=Visualizer,
                  vis_backends=[dict(type=LocalVisBackend), dict(type=TensorboardVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=42, deterministic=False)
# window_size=1: log each iteration's own loss (the default averages `loss` over the last 10 iterations).
log_processor = dict(by_epoch=False, window_size=1)
