"""The demo's stages below the orchestration: its configs, models and data, each training stage's
``--cfg-options`` and run, and the conversion.

**Configs.** The demo runs the repository's stage configs ``configs/demo/*.py`` (they inherit ``configs/*.py``
and ``configs/_base_/``). :func:`demo_configs` finds them in the folder given (``--configs DIR``), by default
in the repository checkout this package sits in (an editable install); a package installed without its
checkout has no default and the demo says to pass ``--configs``. ``--deepspeed zero2|zero3`` names the CPU
JSONs of that folder's ``deepspeed/``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

from xtuner_plugins.launch import cache_env, run_train
from xtuner_plugins.outcome import ITER_LINE

from .console import Console, DemoError, quiet_mmengine_info
from .recipe import VISION_TYPES, Recipe

__all__ = ['CONFIG_FILES', 'DEFAULT_CONFIGS', 'PREFERENCE_LOSSES', 'REPO_ROOT', 'StageResult', 'demo_configs',
           'deepspeed_json', 'make_data', 'make_models', 'model_geometry', 'preference_config', 'repeat_for',
           'run_converter', 'stage_options', 'train_stage']

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The repository checkout this package sits in (an editable install), or else the current folder: the
#: default work folder is under it and the paths the demo prints are relative to it.
REPO_ROOT = _CHECKOUT if os.path.isdir(os.path.join(_CHECKOUT, 'configs', 'demo')) else os.getcwd()
#: The configs folder the demo uses by default: the checkout's ``configs/``, None when installed without it.
DEFAULT_CONFIGS: Optional[str] = os.path.join(_CHECKOUT, 'configs') if REPO_ROOT == _CHECKOUT else None
#: Each stage's config, relative to the configs folder.
CONFIG_FILES = {'pretrain': 'demo/pretrain_mlp.py', 'full': 'demo/finetune_full.py',
                'lora': 'demo/finetune_lora.py', 'preference': 'demo/dpo_lora.py',
                'preference_full': 'demo/mpo_full.py'}
PREFERENCE_LOSSES = {'dpo': dict(types=['sigmoid'], weights=[1.0]),
                     'mpo': dict(types=['sigmoid', 'bco_pair', 'sft'], weights=[0.8, 0.2, 1.0])}
VISION_WRITERS = {'internvit': 'write_tiny_internvit', 'siglip': 'write_tiny_siglip', 'clip': 'write_tiny_clip'}



# ------------------------------------------------------------------------------------------ 0. configs
def demo_configs(configs_dir: Optional[str] = None) -> Dict[str, str]:
    """``{stage: path}`` of the demo's stage configs in ``configs_dir`` (default :data:`DEFAULT_CONFIGS`).

    Raises:
        DemoError: no folder given and no repository checkout, or a stage config missing from the folder.
    """
    folder = configs_dir or DEFAULT_CONFIGS
    if folder is None:
        raise DemoError('the demo needs the repository\'s configs/ folder, and this package is installed without '
                        'its checkout: pass --configs DIR (run_demo(configs_dir=DIR)), DIR holding demo/*.py, '
                        'their _base_/ and deepspeed/')
    folder = os.path.abspath(folder)
    configs = {stage: os.path.join(folder, name) for stage, name in CONFIG_FILES.items()}
    missing = [path for path in configs.values() if not os.path.isfile(path)]
    if missing:
        raise DemoError(f'--configs {folder}: no {", ".join(missing)}; pass the repository\'s configs/ folder')
    return configs


def preference_config(recipe: Recipe, configs: Mapping[str, str]) -> str:
    """The preference stage's config among ``configs`` (:func:`demo_configs`) for ``recipe.preference_mode``.

    Raises:
        DemoError: an unknown ``preference_train``, or ``'full'`` after a LoRA fine-tune (its checkpoint holds
            adapters that the full config does not build).
    """
    mode = recipe.preference_mode
    if mode not in ('lora', 'full'):
        raise DemoError(f'preference_train={mode!r}: use lora or full')
    if mode == 'full' and recipe.finetune != 'full':
        raise DemoError('preference_train=full needs finetune=full (a LoRA fine-tune\'s adapters are merged only '
                        'by the LoRA preference stage)')
    return configs['preference' if mode == 'lora' else 'preference_full']


def deepspeed_json(deepspeed: Optional[str], configs: Mapping[str, str]) -> Optional[str]:
    """``zero2``/``zero3``: the CPU JSON in the configs folder's ``deepspeed/``; a JSON path as it is."""
    if deepspeed in ('zero2', 'zero3'):
        root = os.path.dirname(os.path.dirname(configs['pretrain']))
        return os.path.join(root, 'deepspeed', f'{deepspeed}_cpu.json')
    if deepspeed and not os.path.isfile(deepspeed):
        raise ValueError(f'--deepspeed takes zero2, zero3 or a JSON file, got {deepspeed!r}')
    return deepspeed


# ------------------------------------------------------------------------------------------ 1. models
def make_models(out_dir: str, recipe: Recipe) -> Dict[str, str]:
    """A random vision encoder of the recipe's type (in its real layout) and a Qwen2 LLM + tokenizer."""
    from xtuner_plugins import tiny
    from xtuner_plugins.tiny import vision as tiny_vision
    if recipe.vision not in VISION_WRITERS:
        raise ValueError(f'unknown vision {recipe.vision!r}; use one of {VISION_TYPES}')
    writer = getattr(tiny_vision, VISION_WRITERS[recipe.vision])
    # CLIP's default layer is the second-to-last: one more layer keeps the same depth of features
    layers = recipe.vit_layers + (1 if recipe.vision == 'clip' else 0)
    vit = writer(os.path.join(out_dir, recipe.vision), image_size=recipe.tile_size, patch_size=14,
                 hidden_size=recipe.vit_hidden, num_layers=layers, num_heads=recipe.vit_heads,
                 intermediate_size=recipe.vit_intermediate, seed=recipe.seed, initializer_range=recipe.vit_init_std)
    llm = tiny.write_tiny_qwen2(os.path.join(out_dir, 'llm'), hidden_size=recipe.llm_hidden,
                                num_layers=recipe.llm_layers, num_heads=recipe.llm_heads,
                                num_kv_heads=recipe.llm_kv_heads, intermediate_size=recipe.llm_intermediate,
                                seed=recipe.seed, initializer_range=recipe.llm_init_std)
    return {'vision': vit, 'llm': llm}


def model_geometry(models: Mapping[str, str], recipe: Recipe) -> Dict[str, object]:
    """The model's geometry (tile size, tokens per tile, image mode, mean), read from the model itself so the
    data set is given exactly what the model expects."""
    from xtuner_plugins.models import VisionLanguageModel
    with quiet_mmengine_info():   # its parameter counts are not the demo's
        model = VisionLanguageModel(vision_encoder=models['vision'], llm=models['llm'], projector=recipe.projector,
                                    image_mode=recipe.mode, torch_dtype='float32')
    return model.geometry


# ------------------------------------------------------------------------------------------ 2. data
def make_data(out_dir: str, recipe: Recipe) -> Dict[str, object]:
    from xtuner_plugins.demo.data import KINDS, make_demo_data
    kinds = tuple(recipe.kinds) if recipe.kinds else KINDS
    # weights of kinds the recipe leaves out do not apply
    weights = {k: w for k, w in (recipe.sft_weights or {}).items() if k in kinds}
    if recipe.video:  # the warm-up's image captions, then video questions for fine-tuning and the answers
        from xtuner_plugins.demo.videos import VIDEO_KINDS, make_video_data
        images = make_demo_data(out_dir, n_pretrain=recipe.n_pretrain, n_sft=0, n_test=0, seed=recipe.seed,
                                tile_size=recipe.tile_size, max_dynamic_patch=recipe.max_dynamic_patch, kinds=kinds)
        videos = make_video_data(out_dir, n_sft=recipe.n_sft, n_test=recipe.n_test, seed=recipe.seed,
                                 tile_size=recipe.tile_size, frames=recipe.video_frames,
                                 kinds=VIDEO_KINDS if recipe.video == 'all' else recipe.video.split(','))
        return dict(images, sft=videos['sft'], test=videos['test'],
                    counts=dict(images['counts'], sft=recipe.n_sft, test=recipe.n_test, videos=recipe.n_sft + recipe.n_test))
    return make_demo_data(out_dir, n_pretrain=recipe.n_pretrain, n_sft=recipe.n_sft, n_test=recipe.n_test,
                          seed=recipe.seed, tile_size=recipe.tile_size, max_dynamic_patch=recipe.max_dynamic_patch,
                          kinds=kinds, sft_weights=weights, sft_extra_questions=recipe.sft_extra_questions,
                          n_preference=recipe.preference_prompts if recipe.preference else 0)


def repeat_for(iters: int, batch: int, n_samples: int) -> float:
    """``repeat_times`` that makes one epoch of ``n_samples`` samples ``iters`` global batches of ``batch``."""
    if n_samples <= 0:
        raise ValueError('a training file without samples')
    return iters * batch / n_samples


# ------------------------------------------------------------------------------------------ 3/4. training
def stage_options(stage: str, recipe: Recipe, models: Mapping[str, str], data_file: str, image_folder: str,
                  cache_dir: str, nproc: int = 1, pretrained_pth: Optional[str] = None,
                  geometry: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """The ``--cfg-options`` that point a stage config at the demo's models and data.

    ``stage``: ``'pretrain'``, ``'full'``, ``'lora'`` or ``'preference'`` (``data_file``: the pairs). The
    per-device batch is the recipe's batch divided by ``nproc``, so that one or several processes take the same
    steps on the same global batches. ``geometry``: the model's (:func:`model_geometry`), given to the data set.
    """
    geometry = geometry or model_geometry(models, recipe)
    if stage == 'pretrain':
        batch, lr = recipe.pretrain_batch, recipe.pretrain_lr
        repeat = repeat_for(recipe.pretrain_iters, batch, recipe.n_pretrain)
    elif stage == 'preference':
        batch, lr = recipe.preference_batch, recipe.preference_rate
        repeat = repeat_for(recipe.preference_iters, batch, recipe.preference_prompts)  # a pair per prompt
    else:
        batch, lr = recipe.finetune_batch, recipe.finetune_lr
        repeat = repeat_for(recipe.finetune_iters, batch, recipe.n_sft)
    if batch % nproc:
        raise ValueError(f'the batch of {batch} samples does not split over {nproc} processes')
    per_device = batch // nproc
    options: Dict[str, object] = {
        'model.vision_encoder': models['vision'],
        'model.projector': recipe.projector,
        'model.image_mode': recipe.mode,
        'model.llm': models['llm'],
        'model.llm_grad_ckpt': False,   # activation checkpointing only costs time at this size
        'train_dataloader.dataset.tokenizer': models['llm'],
        'train_dataloader.dataset.data_files': [data_file],
        'train_dataloader.dataset.image_folders': [image_folder],
        'train_dataloader.dataset.repeat_times': round(repeat, 6),
        'train_dataloader.dataset.image_size': geometry['image_size'],
        'train_dataloader.dataset.num_image_token': geometry['num_image_token'],
        'train_dataloader.dataset.image_mode': geometry['image_mode'],
        'train_dataloader.dataset.image_mean': list(geometry['image_mean']),
        'train_dataloader.dataset.max_dynamic_patch': recipe.max_dynamic_patch,
        'train_dataloader.dataset.min_num_frame': recipe.video_frames,   # videos (the video recipe): N frames
        'train_dataloader.dataset.max_num_frame': recipe.video_frames,
        'train_dataloader.dataset.max_length': 1024,
        'train_dataloader.dataset.seed': recipe.seed,
        'train_dataloader.dataset.cache_dir': cache_dir,
        'train_dataloader.batch_size': per_device,
        'train_dataloader.sampler.per_device_batch_size': per_device,
        'train_dataloader.sampler.seed': recipe.seed,
        # mega-batches of 4 batches sorted by length: less padding (10 % faster steps, the same accuracy after
        # 1500 steps, in-process); XTuner's default of 50 would fill each batch with one question phrasing (one
        # kind), which slows down learning to read the image
        'train_dataloader.sampler.mega_batch_mult': 4,
        'train_dataloader.num_workers': recipe.num_workers,
        'train_dataloader.persistent_workers': recipe.num_workers > 0,
        'train_dataloader.pin_memory': False,
        'optim_wrapper.optimizer.lr': lr,
        'optim_wrapper.optimizer.weight_decay': recipe.weight_decay,
        'optim_wrapper.accumulative_counts': 1,
        'param_scheduler.0.end': recipe.warmup_ratio,
        'param_scheduler.1.begin': recipe.warmup_ratio,
        'default_hooks.logger.interval': recipe.log_interval,
        'log_processor.window_size': recipe.log_interval,
        'default_hooks.checkpoint.interval': 1000000,  # only the last checkpoint (save_last)
        'default_hooks.checkpoint.max_keep_ckpts': 1,
        'randomness.seed': recipe.seed,
    }
    if stage != 'pretrain':
        options['model.pretrained_pth'] = pretrained_pth
    if stage == 'full':
        options['model.freeze_vision'] = not recipe.train_vision
        options['optim_wrapper.optimizer.paramwise_cfg.custom_keys.vision_model.lr_mult'] = recipe.vision_lr / lr
    elif stage == 'lora':
        options['optim_wrapper.optimizer.paramwise_cfg.custom_keys.mlp1.lr_mult'] = 1.0
    elif stage == 'preference':
        if recipe.preference not in PREFERENCE_LOSSES:
            raise ValueError(f'preference={recipe.preference!r}: use one of {", ".join(PREFERENCE_LOSSES)}')
        loss = dict(PREFERENCE_LOSSES[recipe.preference], beta=recipe.preference_beta)
        if recipe.preference_weights:
            weights = [float(w) for w in recipe.preference_weights.split(',')]
            if len(weights) != len(loss['types']):
                raise ValueError(f'preference_weights={recipe.preference_weights!r}: give {len(loss["types"])} '
                                 f'weights, for {", ".join(loss["types"])}')
            loss['weights'] = weights
        for key, value in loss.items():
            options[f'model.preference.{key}'] = value
        if recipe.preference_mode == 'full':
            options['model.freeze_vision'] = not recipe.train_vision
    return options


def _progress_line(stage: str, line: str) -> Optional[str]:
    """The training console's progress line (``iter k/N  loss ...``, engine/progress.py), under the stage's name."""
    if not ITER_LINE.search(line):
        return None
    return f'  [{stage}] ' + line.split(' - INFO - ')[-1].strip()


@dataclass
class StageResult:
    name: str
    work_dir: str
    log_path: str
    checkpoint: str
    iterations: int
    losses: Dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0


def train_stage(name: str, config: str, work_dir: str, options: Mapping[str, object], console: Console,
                nproc: int = 1, deepspeed: Optional[str] = None, cache_root: Optional[str] = None,
                timeout: float = 3600) -> StageResult:
    """Run one stage config through ``xtuner/tools/train.py`` (:func:`xtuner_plugins.launch.run_train`);
    returns its final checkpoint.

    The whole output goes to ``<work_dir>/train_output.log`` (MMEngine also writes its own log and the
    TensorBoard events under ``<work_dir>/<timestamp>/``); the terminal gets one line per logged iteration.

    Raises:
        DemoError: the run failed (exit code, a traceback, iterations missing, or no final checkpoint).
    """
    work_dir = os.path.abspath(work_dir)
    if os.path.isdir(work_dir):
        shutil.rmtree(work_dir)   # a fresh run: no stale checkpoint can pass for this run's
    log_path = os.path.join(work_dir, 'train_output.log')

    def on_line(line: str) -> None:
        progress = _progress_line(name, line)
        if progress:
            console(progress)
        elif line.startswith('$ '):
            cmd = line[2:].split(' ')
            console(f'  $ {" ".join(os.path.relpath(c, REPO_ROOT) if c.startswith(REPO_ROOT) else c for c in cmd[:8])}'
                    f' ... ({len(options)} --cfg-options; full command in {os.path.relpath(log_path, REPO_ROOT)})')
        elif 'Saving checkpoint' in line:
            console(f'  [{name}] ' + line.split(' - INFO - ')[-1].strip())

    # caches not set in this environment go under cache_root
    caches = {k: v for k, v in cache_env(cache_root or os.path.join(os.path.dirname(work_dir), '.cache')).items()
              if k not in os.environ}
    out = run_train(config, work_dir, nproc=nproc, deepspeed=deepspeed, cfg_options=options, timeout=timeout,
                    extra_env=caches, on_line=on_line)
    if out.failed:
        shown = '\n'.join('    | ' + t for t in out.log.splitlines()[-40:])
        raise DemoError(f'stage {name} failed: {"; ".join(out.failure_reasons)}. Log: {log_path}\n'
                        f'  last lines:\n{shown}')
    final = out.final_checkpoint
    console(f'  [{name}] done in {out.wall_s:.0f} s: {out.max_iters} iterations, checkpoint '
            f'{os.path.relpath(final, REPO_ROOT)}')
    return StageResult(name, work_dir, log_path, final, out.max_iters, out.losses, out.wall_s)


# ------------------------------------------------------------------------------------------ 5. conversion
def run_converter(checkpoint: str, out_dir: str, console: Console) -> str:
    """``tools/convert_to_official.py CHECKPOINT OUT_DIR --dtype fp32 --overwrite``: the checkpoint alone, which
    records its config (the tool's own ``main``, in this process; ``--format auto`` picks the layout that fits
    the family)."""
    from xtuner_plugins.cli.convert import main as convert_main
    argv = [checkpoint, out_dir, '--dtype', 'fp32', '--overwrite']
    console(f'  $ python tools/convert_to_official.py {os.path.relpath(checkpoint, REPO_ROOT)} '
            f'{os.path.relpath(out_dir, REPO_ROOT)} --dtype fp32 --overwrite')
    with console.under_step():
        code = convert_main(argv)
    if code:
        raise DemoError(f'tools/convert_to_official.py exited with {code}')
    return out_dir
