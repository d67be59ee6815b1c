# Runtime shared by every stage: hooks, logging (console + TensorBoard), environment, seeds.
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer

from xtuner_plugins.engine import (DIST_BACKEND, MP_START_METHOD, BadSampleHook, CheckpointCleanupHook,
                                   LineageHook, ModelDataCheckHook, NonFiniteGuardHook, ThroughputHook)
from xtuner_plugins.engine.ckptfit import CheckpointFitHook
from xtuner_plugins.engine.progress import ProgressHook
from xtuner_plugins.engine.runlock import RunLockHook
from xtuner_plugins.engine.watchdog import StallWatchdogHook

save_every = 500          # checkpoint every N iterations (and at the end); --cfg-options save_every=50
                          # (raised to a multiple of optim_wrapper.accumulative_counts: checkpoints at optimizer steps)
save_total_limit = 2      # keep the last N checkpoints (-1: all)
log_interval = 10
nonfinite_policy = 'stop'  # a NaN/inf loss or gradient norm: 'stop' at once, or 'skip' the step (not DeepSpeed)
max_skipped_steps = 10    # with 'skip': stop once more steps than this were dropped
stall_timeout = 300       # s without a word from a rank (stopped or frozen): stop the run (0: off)

custom_hooks = [dict(type=ModelDataCheckHook), dict(type=ThroughputHook),
                dict(type=NonFiniteGuardHook, policy=nonfinite_policy, max_skipped=max_skipped_steps),
                dict(type=CheckpointCleanupHook), dict(type=BadSampleHook)]
# Evaluation during training (off by default): accuracy, blind accuracy and image reliance on a held-out file
# every `interval` iterations and at the end, to the console and TensorBoard (xtuner_plugins/eval/hook.py):
#   from xtuner_plugins.eval import EvalHook
#   custom_hooks.append(dict(type=EvalHook, data_file='data/val.jsonl', image_folder='data/images', interval=500,
#                            max_questions=200, max_new_tokens=16, min_reliance=0.1, on_low_reliance='warn'))

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=log_interval),
    param_scheduler=dict(type=ParamSchedulerHook),
    # its interval: save_every, filled in when the runner is built (so --cfg-options save_every=N reaches it)
    checkpoint=dict(type=CheckpointHook, by_epoch=False, max_keep_ckpts=save_total_limit, save_last=True),
    sampler_seed=dict(type=DistSamplerSeedHook),
    # what the model was trained from, in every checkpoint; a stage meant to follow another stops without it
    lineage=dict(type=LineageHook),
    # one run per work folder (WORK_DIR/run.lock); a rank not heard from for `stall_timeout` s stops the run,
    # named: --cfg-options default_hooks.stall_watchdog.timeout=900 (xtuner_plugins/engine/runlock.py, watchdog.py)
    run_lock=dict(type=RunLockHook),
    stall_watchdog=dict(type=StallWatchdogHook, timeout=stall_timeout),
    # the console: a start line, `iter k/N  loss  lr  tokens/s  eta  mem` every `log_interval` iterations and
    # at the last, an end line (MMEngine's full lines and start-up dumps: the work dir's log file)
    progress=dict(type=ProgressHook),
    # model.llm_grad_ckpt_layers='auto': on a GPU, fewer LLM layers checkpointed where its memory allows
    # (xtuner_plugins/engine/ckptfit.py; here, not in custom_hooks, so their --cfg-options indices stay)
    ckpt_fit=dict(type=CheckpointFitHook),
)

# DIST_BACKEND is 'nccl' with CUDA and 'gloo' without; reading it or MP_START_METHOD (the runner does so first)
# imports xtuner_plugins/engine/runtime.py, which makes MMEngine's distributed start-up work on a CPU-only
# machine and formats the config's text once per run.
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method=MP_START_METHOD, opencv_num_threads=0),
    dist_cfg=dict(backend=DIST_BACKEND),
)

visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend), dict(type=TensorboardVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=42, deterministic=False)
log_processor = dict(by_epoch=False)
