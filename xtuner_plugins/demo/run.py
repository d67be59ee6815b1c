"""The embedded demo: the whole life of a small vision-language model on a CPU, with nothing downloaded.

``make demo`` (or ``python tools/demo.py``) runs, into ``work_dirs/demo/``, for the recipe's model family
(``--set vision=internvit|siglip|clip projector=pixel_shuffle_mlp|mlp|bilinear_mlp``, InternViT + pixel
shuffle by default):

1. **models**: a small vision encoder in its real on-disk layout and a small Qwen2 LLM with its tokenizer,
   randomly initialised (:mod:`xtuner_plugins.tiny`), in ``models/``;
2. **data**: coloured shapes and digits with questions only the pixels answer
   (:func:`xtuner_plugins.demo.data.make_demo_data`) in ``data/`` (``pretrain.jsonl``, ``sft.jsonl``,
   ``test.jsonl``, ``images/``);
3. **MLP warm-up**: ``configs/demo/pretrain_mlp.py`` through XTuner's own ``xtuner/tools/train.py`` (what
   ``xtuner train`` runs), captions, only the projector trained, in ``pretrain_mlp/``;
4. **fine-tuning**: ``configs/demo/finetune_full.py`` (or ``finetune_lora.py``) from the warm-up checkpoint
   (``model.pretrained_pth``), the questions of ``sft.jsonl``; projector and LLM trained (the vision tower
   too with the recipe's ``train_vision``, off by default: see its comment), in ``finetune_full/``;
5. **conversion**: ``tools/convert_to_official.py --format auto`` into the layout that fits the family
   (InternVL's official one, transformers' LLaVA, or the remote-code one), ``converted/``;
6. **answers**: every held-out question of ``test.jsonl`` through the converted folder, loaded as its format
   is meant to be (``AutoModel.from_pretrained(..., trust_remote_code=True)`` + ``model.chat``, or
   ``LlavaForConditionalGeneration`` + its processor), greedy; then the same questions with blank images (the
   scenes' grey background with nothing on it), the blind control, which must stay near chance. The answers
   go to ``answers.jsonl``.

The stage configs are the real ones (``configs/demo/*.py`` inherit ``configs/*.py`` and only set a short
system message), pointed at the demo's models and data with ``--cfg-options``: the demo is what a user runs,
at toy size. Training runs in subprocesses (one process, or ``torch.distributed.run``
with ``--launcher pytorch`` and a DeepSpeed CPU JSON); success is judged by the checkpoint files and the
log, not by the exit code alone. Logs and TensorBoard events stay in each stage's work folder.

The last two lines printed are ``converted: PATH (FORMAT)`` and ``demo accuracy: A (N questions); blind
control: B``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from xtuner_plugins.launch import DS_CPU_CONFIGS, ITER_LINE, cache_env, cfg_options_args, run_train


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {
    'pretrain': os.path.join(REPO_ROOT, 'configs', 'demo', 'pretrain_mlp.py'),
    'full': os.path.join(REPO_ROOT, 'configs', 'demo', 'finetune_full.py'),
    'lora': os.path.join(REPO_ROOT, 'configs', 'demo', 'finetune_lora.py'),
    'preference': os.path.join(REPO_ROOT, 'configs', 'demo', 'dpo_lora.py'),
}
PREFERENCE_LOSSES = {'dpo': dict(types=['sigmoid'], weights=[1.0]),
                     'mpo': dict(types=['sigmoid', 'bco_pair', 'sft'], weights=[0.8, 0.2, 1.0])}
SUMMARY_FORMAT = 'demo accuracy: {accuracy:.3f} ({n} questions); blind control: {blind:.3f}'

_FIELD = re.compile(r'\b(lr|eta|loss|time):\s*(\S+)')


# ------------------------------------------------------------------------------------------ the recipe
@dataclass
class Recipe:
    """Everything the demo's outcome depends on: model sizes, data, stages, learning rates, seed.

    Iterations are set through the data: each stage runs one epoch of its file repeated
    ``iters * batch / n`` times, so the configs' warm-up + cosine schedules span exactly the run.
    """

    seed: int = 0
    # the model family: vision encoder (VISION_TYPES), projector (PROJECTOR_TYPES), image mode ('' = the
    # family's: 'pad' for LLaVA's 'mlp' projector, InternVL's dynamic 'tile' otherwise)
    vision: str = 'internvit'
    projector: str = 'pixel_shuffle_mlp'
    image_mode: str = ''
    # models (random, written in the real layouts by xtuner_plugins.tiny)
    tile_size: int = 56
    vit_hidden: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    vit_intermediate: int = 128
    # std of the vision tower's random linear weights (InternViT's 0.02 is made for its 1024-wide layers; a
    # 64-wide tower starts from near-constant features at 0.02 and learns faster from 0.1)
    vit_init_std: float = 0.1
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    # std of the LLM's random weights (Qwen2's initializer_range is 0.02, made for wide models: a 64-wide
    # LLM initialised at 0.02 is nearly constant and takes thousands of steps to start reading the image)
    llm_init_std: float = 0.1
    # data (xtuner_plugins.demo.data)
    max_dynamic_patch: int = 6
    kinds: Optional[Sequence[str]] = None   # None: all of xtuner_plugins.demo.data.KINDS
    # sft.jsonl only (the test split stays balanced, one question per image): more scenes of the kinds learned
    # slowest, and the other questions a one-shape scene answers as extra turns
    sft_weights: Optional[Mapping[str, int]] = field(default_factory=lambda: {'digit': 2, 'small_digit': 3})
    sft_extra_questions: bool = True
    n_pretrain: int = 2000
    n_sft: int = 20000
    n_test: int = 180
    # stage 1: MLP warm-up (configs/demo/pretrain_mlp.py): captions, only mlp1 trains
    pretrain_iters: int = 200
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    # stage 2: fine-tuning (configs/demo/finetune_full.py or finetune_lora.py)
    finetune: str = 'full'
    finetune_iters: int = 6000
    finetune_batch: int = 16
    finetune_lr: float = 2e-3
    # full fine-tuning only: also train the vision tower (InternVL 2.5's stage 1.5 / 2 with the ViT unfrozen).
    # Off: at these sizes and learning rates the frozen random tower's features serve the tiny LLM better than
    # a tower trained alongside it (lower held-out accuracy with the tower trained)
    train_vision: bool = False
    vision_lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    # stage 3, off unless set: preference training on pairs made from the data (chosen: the right answer;
    # rejected: another answer of the same kind), LoRA on the LLM from the fine-tuned model, which is also the
    # reference (xtuner_plugins.demo.preference): '' (off), 'dpo' (sigmoid DPO) or 'mpo' (InternVL 2.5's
    # sigmoid 0.8 + bco_pair 0.2 + sft 1.0). Off by default: it adds about 90 s, past the 10-minute budget.
    # Measured from the fine-tuned model of `make demo` (0.939 accuracy), mpo, 600 steps (held-out preference
    # accuracy / demo accuracy after): lr 1e-4, beta 0.1: 0.917 / 0.933; 3e-4: 0.933 / 0.922; 3e-4, beta 0.5:
    # 0.922 / 0.922; 1e-3, beta 0.5: 0.928 / 0.900; 3e-3, beta 0.5: 0.911 / 0.911. The pairs' rejected answers
    # are random wrong ones, not the model's own mistakes (as MMPR's are), so they teach little it got wrong.
    preference: str = ''
    preference_iters: int = 600
    preference_batch: int = 8      # pairs per step (twice the rows)
    preference_lr: float = 1e-4
    preference_beta: float = 0.1
    # runtime
    num_workers: int = 1
    log_interval: int = 50
    # answers
    max_new_tokens: int = 8

    def describe(self) -> str:
        return ', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(self))

    @property
    def mode(self) -> str:
        """The image mode: the recipe's, or the family's."""
        return self.image_mode or ('pad' if self.projector == 'mlp' else 'tile')


RECIPES: Dict[str, Recipe] = {
    'default': Recipe(),
    # a shortened run for the test suite: fewer samples and iterations, the same pipeline
    'quick': Recipe(n_pretrain=400, n_sft=3000, n_test=60, pretrain_iters=50, finetune_iters=600,
                    log_interval=20),
}


# ------------------------------------------------------------------------------------------ output
class Console:
    """Prints to the terminal and appends to ``demo.log`` in the work folder."""

    def __init__(self, log_path: Optional[str] = None, quiet: bool = False):
        self.log_path = log_path
        self.quiet = quiet
        self.start = time.perf_counter()
        if log_path:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, 'w', encoding='utf-8'):
                pass

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str = '') -> None:
        if not self.quiet:
            print(message, flush=True)
        if self.log_path:
            with open(self.log_path, 'a', encoding='utf-8') as f:
                f.write(message + '\n')

    def step(self, title: str) -> None:
        self(f'\n== [{_fmt_time(self.elapsed())}] {title}')


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f'{m:d}:{s:02d}'


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""


# ------------------------------------------------------------------------------------------ 1. models
VISION_WRITERS = {'internvit': 'write_tiny_internvit', 'siglip': 'write_tiny_siglip', 'clip': 'write_tiny_clip'}
VISION_TYPES = tuple(VISION_WRITERS)
PROJECTOR_TYPES = ('pixel_shuffle_mlp', 'mlp', 'bilinear_mlp')


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
    from xtuner_plugins.models import InternVLModel
    model = InternVLModel(vision_encoder=models['vision'], llm=models['llm'], projector=recipe.projector,
                          image_mode=recipe.mode, torch_dtype='float32')
    return model.geometry


# ------------------------------------------------------------------------------------------ 2. data
def make_data(out_dir: str, recipe: Recipe) -> Dict[str, object]:
    from xtuner_plugins.demo.data import KINDS, make_demo_data
    kinds = tuple(recipe.kinds) if recipe.kinds else KINDS
    # weights of kinds the recipe leaves out do not apply
    weights = {k: w for k, w in (recipe.sft_weights or {}).items() if k in kinds}
    return make_demo_data(out_dir, n_pretrain=recipe.n_pretrain, n_sft=recipe.n_sft, n_test=recipe.n_test,
                          seed=recipe.seed, tile_size=recipe.tile_size, max_dynamic_patch=recipe.max_dynamic_patch,
                          kinds=kinds, sft_weights=weights, sft_extra_questions=recipe.sft_extra_questions)


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
        batch, lr = recipe.preference_batch, recipe.preference_lr
        repeat = repeat_for(recipe.preference_iters, batch, recipe.n_sft)  # one pair per sft.jsonl sample
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
        for key, value in dict(PREFERENCE_LOSSES[recipe.preference], beta=recipe.preference_beta).items():
            options[f'model.preference.{key}'] = value
    return options


def _progress_line(stage: str, line: str) -> Optional[str]:
    m = ITER_LINE.search(line)
    if not m:
        return None
    fields = dict(_FIELD.findall(line[m.end():]))
    parts = [f'  [{stage}] iter {int(m.group(1)):>4d}/{m.group(2)}']
    if 'loss' in fields:
        parts.append(f'loss {float(fields["loss"]):.4f}')
    if 'lr' in fields:
        parts.append(f'lr {float(fields["lr"]):.2e}')
    if 'time' in fields:
        parts.append(f'{float(fields["time"]):.2f} s/iter')
    if 'eta' in fields:
        parts.append(f'eta {fields["eta"]}')
    return '  '.join(parts)


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
        elif 'Saving checkpoint' in line or 'Checkpoints will be saved' in line:
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
def run_converter(config: str, checkpoint: str, options: Mapping[str, object], out_dir: str,
                  console: Console) -> str:
    """``tools/convert_to_official.py CONFIG CHECKPOINT OUT_DIR --dtype fp32 --overwrite --cfg-options ...``
    (the tool's own ``main``, in this process; ``--format auto`` picks the layout that fits the family)."""
    from xtuner_plugins.cli.convert import main as convert_main
    argv = [config, checkpoint, out_dir, '--dtype', 'fp32', '--overwrite', *cfg_options_args(options)]
    console(f'  $ python tools/convert_to_official.py {os.path.relpath(config, REPO_ROOT)} '
            f'{os.path.relpath(checkpoint, REPO_ROOT)} {os.path.relpath(out_dir, REPO_ROOT)} --dtype fp32 '
            f'--overwrite --cfg-options ...')
    code = convert_main(argv)
    if code:
        raise DemoError(f'tools/convert_to_official.py exited with {code}')
    return out_dir


# ------------------------------------------------------------------------------------------ 6. answers
@dataclass
class Answer:
    id: str
    kind: str
    question: str
    expected: str
    given: str
    blind: str = ''
    score: float = 0.0        # by the project's scorer (xtuner_plugins.eval): exact match after normalisation
    blind_score: float = 0.0

    @property
    def correct(self) -> bool:
        return self.score == 1.0

    @property
    def blind_correct(self) -> bool:
        return self.blind_score == 1.0


def answer_questions(folder: str, test_path: str, image_folder: str, console: Console,
                     max_new_tokens: int = 8) -> List[Answer]:
    """Every question of ``test_path`` through the converted folder, loaded the way its format is meant to be
    (:class:`~xtuner_plugins.models.inference.ConvertedModel`: ``chat`` of the remote code, or transformers'
    LLaVA with its processor), and scored, by ``xtuner_plugins.eval`` (what ``tools/eval.py`` runs): once with
    its image, once with a blank grey image of the same size (the blind control; the scenes' background)."""
    import torch

    from xtuner_plugins.eval import evaluate, read_open_questions
    from xtuner_plugins.models.inference import ConvertedModel
    torch.manual_seed(0)
    model = ConvertedModel(folder)
    questions = read_open_questions(test_path, image_folder)
    step = max(1, len(questions) // 10)

    def progress(i, n, results):
        if i % step == 0 or i == n:
            console(f'  answered {i}/{n} ({sum(r.score == 1.0 for r in results)} right so far)')

    results = evaluate(model, questions, blind=True, max_new_tokens=max_new_tokens, progress=progress)
    return [Answer(r.id, r.category, r.prompt.replace('<image>\n', ''), r.reference, r.answer, r.blind_answer,
                   r.score, r.blind_score) for r in results]


def accuracy(answers: Sequence[Answer], blind: bool = False) -> float:
    if not answers:
        return 0.0
    return sum(a.blind_correct if blind else a.correct for a in answers) / len(answers)


def per_kind(answers: Sequence[Answer]) -> Dict[str, Dict[str, float]]:
    groups: Dict[str, List[Answer]] = defaultdict(list)
    for a in answers:
        groups[a.kind].append(a)
    return {k: {'n': len(v), 'accuracy': accuracy(v), 'blind': accuracy(v, blind=True)}
            for k, v in groups.items()}


def answer_table(answers: Sequence[Answer], max_rows: Optional[int] = 24) -> str:
    """A short table: a few questions of every kind with expected, given and blind answers, then per kind."""
    rows = []
    if max_rows is None:
        chosen = list(answers)
    else:
        by_kind: Dict[str, List[Answer]] = defaultdict(list)
        for a in answers:
            by_kind[a.kind].append(a)
        per = max(1, max_rows // max(1, len(by_kind)))
        chosen = [a for kind in by_kind for a in by_kind[kind][:per]]
    wq = max([len('question')] + [len(a.question) for a in chosen])
    header = f'  {"kind":<12} {"question":<{wq}}  {"expected":<9} {"given":<9} {"blind":<9}'
    rows.append(header)
    rows.append('  ' + '-' * (len(header) - 2))
    for a in chosen:
        mark = 'ok' if a.correct else 'WRONG'
        rows.append(f'  {a.kind:<12} {a.question:<{wq}}  {a.expected:<9} {a.given[:9]:<9} {a.blind[:9]:<9} {mark}')
    rows.append('')
    rows.append(f'  {"kind":<12} {"questions":>9} {"accuracy":>9} {"blind":>9}')
    for kind, s in per_kind(answers).items():
        rows.append(f'  {kind:<12} {s["n"]:>9d} {s["accuracy"]:>9.3f} {s["blind"]:>9.3f}')
    return '\n'.join(rows)


def summary_line(accuracy_value: float, n: int, blind_value: float) -> str:
    return SUMMARY_FORMAT.format(accuracy=accuracy_value, n=n, blind=blind_value)


# ------------------------------------------------------------------------------------------ the whole demo
@dataclass
class DemoResult:
    accuracy: float
    blind: float
    chance: float
    n: int
    answers: List[Answer]
    stages: Dict[str, StageResult]
    converted_dir: str
    converted_format: str
    work_dir: str
    wall_s: float
    timings: Dict[str, float]
    preference: Optional['PreferenceResult'] = None

    def summary(self) -> str:
        return summary_line(self.accuracy, self.n, self.blind)


@dataclass
class PreferenceResult:
    accuracy: float          # held-out pairs whose chosen answer the policy's implicit reward prefers
    before: float            # the same before preference training
    n: int
    answers: List[Answer]    # the demo's questions, answered by the preference-trained model
    converted: str
    converted_format: str
    sft_accuracy: float = 0.0

    def line(self) -> str:
        return (f'preference accuracy: {self.accuracy:.3f} ({self.n} held-out pairs); '
                f'before preference training: {self.before:.3f}')


def preference_stage(recipe: Recipe, models, data, geometry, stages, ft_options, work_dir: str, console: Console,
                     nproc: int, deepspeed: Optional[str], cache_root: str, stage_timeout: float,
                     timings: Dict[str, float], steps: int) -> PreferenceResult:
    """Steps 7 and 8: pairs, LoRA DPO/MPO from the fine-tuned checkpoint, held-out preference accuracy before
    and after, conversion and the demo's questions again."""
    from xtuner_plugins.demo.preference import make_pairs, preference_accuracy, wrong_answers
    from xtuner_plugins.models.inference import ConvertedModel, folder_format
    t = time.perf_counter()
    losses = ' + '.join(f'{w} {k}' for k, w in zip(PREFERENCE_LOSSES[recipe.preference]['types'],
                                                   PREFERENCE_LOSSES[recipe.preference]['weights']))
    console.step(f'7/{steps} preference training ({recipe.preference}: {losses}, beta {recipe.preference_beta}): '
                 f'configs/demo/dpo_lora.py, LoRA from the fine-tuned model, which is the reference')
    folder = os.path.join(work_dir, 'data')
    pairs = {split: os.path.join(folder, f'{split}_pairs.jsonl') for split in ('sft', 'test')}
    limit = recipe.preference_iters * recipe.preference_batch  # the first samples, each once
    asking = time.perf_counter()
    own, asked = wrong_answers(ConvertedModel(os.path.join(work_dir, 'converted')), data['sft'], data['images'],
                               limit, recipe.max_new_tokens, batch_size=16)
    asking = time.perf_counter() - asking
    counts = {'sft': make_pairs(data['sft'], pairs['sft'], recipe.seed, own, limit),
              'test': make_pairs(data['test'], pairs['test'], recipe.seed)}
    console(f'  pairs (chosen: the right answer, rejected: the fine-tuned model\'s own wrong answer ({len(own)} of '
            f'{asked} training questions, asked in {asking:.0f} s), else another answer of its kind): '
            f'{counts["sft"]} for training in {os.path.relpath(pairs["sft"], REPO_ROOT)}, {counts["test"]} held '
            f'out (random wrong answers)')
    options = stage_options('preference', recipe, models, pairs['sft'], data['images'],
                            ft_options['train_dataloader.dataset.cache_dir'], nproc,
                            pretrained_pth=stages['finetune'].checkpoint, geometry=geometry)
    options['train_dataloader.dataset.repeat_times'] = round(
        repeat_for(recipe.preference_iters, recipe.preference_batch, counts['sft']), 6)
    stages['preference'] = train_stage('preference', CONFIGS['preference'], os.path.join(work_dir, 'preference'),
                                       options, console, nproc, deepspeed, cache_root, stage_timeout)
    before, n = preference_accuracy(CONFIGS['preference'], options, None, pairs['test'], data['images'])
    after, _ = preference_accuracy(CONFIGS['preference'], options, stages['preference'].checkpoint, pairs['test'],
                                   data['images'])
    timings['preference'] = time.perf_counter() - t
    t = time.perf_counter()
    console.step(f'8/{steps} the preference-trained model: conversion (adapters merged) and the same questions')
    converted = run_converter(CONFIGS['preference'], stages['preference'].checkpoint, options,
                              os.path.join(work_dir, 'converted_preference'), console)
    answers = answer_questions(converted, data['test'], data['images'], console, recipe.max_new_tokens)
    timings['answers_preference'] = time.perf_counter() - t
    return PreferenceResult(accuracy=after, before=before, n=n, answers=answers, converted=converted,
                            converted_format=folder_format(converted))


def run_demo(work_dir: str = os.path.join(REPO_ROOT, 'work_dirs', 'demo'), recipe: Optional[Recipe] = None,
             nproc: int = 1, deepspeed: Optional[str] = None, console: Optional[Console] = None,
             stage_timeout: float = 3600) -> DemoResult:
    """Run the whole demo into ``work_dir``; returns the accuracies (the caller prints the summary line)."""
    recipe = recipe or RECIPES['default']
    if nproc < 1:
        raise ValueError(f'nproc must be >= 1, got {nproc}')
    if deepspeed and deepspeed not in DS_CPU_CONFIGS and not os.path.isfile(deepspeed):
        raise ValueError(f'--deepspeed takes {", ".join(DS_CPU_CONFIGS)} or a JSON file, got {deepspeed!r}')
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    console = console or Console(os.path.join(work_dir, 'demo.log'))
    cache_root = os.path.join(work_dir, '.cache')
    for key, value in cache_env(cache_root).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    timings: Dict[str, float] = {}
    steps = 8 if recipe.preference else 6
    mode = f'{nproc} process{"es" if nproc > 1 else ""}' + (f', DeepSpeed {deepspeed}' if deepspeed else '')
    console(f'xtuner-plugins demo: tiny InternVL-style model, CPU, {mode}; output in '
            f'{os.path.relpath(work_dir, REPO_ROOT)}')

    t = time.perf_counter()
    console.step(f'1/{steps} models: random {recipe.vision} (its real layout) + Qwen2 LLM with tokenizer; '
                 f'{recipe.projector} projector, image mode {recipe.mode}')
    models = make_models(os.path.join(work_dir, 'models'), recipe)
    from xtuner_plugins.models.checkpoint import read_hf_weights
    sizes = {name: sum(t.numel() for t in read_hf_weights(folder).values()) for name, folder in models.items()}
    geometry = model_geometry(models, recipe)
    console(f'  vision {recipe.vision} x {recipe.vit_hidden} ({sizes["vision"] / 1e6:.2f} M in its folder), '
            f'{recipe.tile_size} px tiles, {geometry["num_image_token"]} LLM tokens per tile; LLM '
            f'{recipe.llm_layers} layers x {recipe.llm_hidden} ({sizes["llm"] / 1e6:.2f} M)')
    timings['models'] = time.perf_counter() - t

    t = time.perf_counter()
    console.step(f'2/{steps} data: shapes and digits with questions only the pixels answer')
    from xtuner_plugins.demo.data import chance_accuracy
    data = make_data(os.path.join(work_dir, 'data'), recipe)
    chance = chance_accuracy(data['test']) if recipe.n_test else 0.0
    console(f'  {json.dumps(data["counts"])} in {os.path.relpath(os.path.dirname(data["test"]), REPO_ROOT)}; '
            f'chance (most common answer per kind): {chance:.3f}')
    timings['data'] = time.perf_counter() - t
    cache_dir = os.path.join(work_dir, 'cache')

    stages: Dict[str, StageResult] = {}
    t = time.perf_counter()
    console.step(f'3/{steps} MLP warm-up: configs/demo/pretrain_mlp.py (captions; only the projector mlp1 trains)')
    options = stage_options('pretrain', recipe, models, data['pretrain'], data['images'], cache_dir, nproc,
                            geometry=geometry)
    stages['pretrain'] = train_stage('warm-up', CONFIGS['pretrain'], os.path.join(work_dir, 'pretrain_mlp'), options,
                                     console, nproc, deepspeed, cache_root, stage_timeout)
    timings['pretrain'] = time.perf_counter() - t

    t = time.perf_counter()
    ft = recipe.finetune
    what = ('projector + LLM' + (' + vision tower' if recipe.train_vision else '')) if ft == 'full' else \
        'projector + LoRA adapters'
    console.step(f'4/{steps} fine-tuning: configs/demo/finetune_{ft}.py (questions; {what} train), '
                 f'from the warm-up checkpoint')
    ft_options = stage_options(ft, recipe, models, data['sft'], data['images'], cache_dir, nproc,
                               pretrained_pth=stages['pretrain'].checkpoint, geometry=geometry)
    stages['finetune'] = train_stage('fine-tune', CONFIGS[ft], os.path.join(work_dir, f'finetune_{ft}'), ft_options,
                                     console, nproc, deepspeed, cache_root, stage_timeout)
    timings['finetune'] = time.perf_counter() - t

    t = time.perf_counter()
    console.step(f'5/{steps} conversion: tools/convert_to_official.py --format auto (the layout that fits the '
                 f'family)')
    from xtuner_plugins.models.inference import folder_format
    converted = run_converter(CONFIGS[ft], stages['finetune'].checkpoint, ft_options,
                              os.path.join(work_dir, 'converted'), console)
    converted_format = folder_format(converted)
    console(f'  {converted_format} layout in {os.path.relpath(converted, REPO_ROOT)}')
    timings['convert'] = time.perf_counter() - t

    t = time.perf_counter()
    how = ('LlavaForConditionalGeneration + its processor' if converted_format == 'llava' else
           'AutoModel.from_pretrained(..., trust_remote_code=True) + model.chat')
    console.step(f'6/{steps} answers: {how}, greedy; blind control: the same questions on blank grey images')
    answers = answer_questions(converted, data['test'], data['images'], console, recipe.max_new_tokens)
    timings['answers'] = time.perf_counter() - t
    preference = None
    if recipe.preference:
        preference = preference_stage(recipe, models, data, geometry, stages, ft_options, work_dir, console, nproc,
                                      deepspeed, cache_root, stage_timeout, timings, steps)
        console(f'  after fine-tuning: {summary_line(accuracy(answers), len(answers), accuracy(answers, True))}')
        preference.sft_accuracy = accuracy(answers)
        answers, converted, converted_format = preference.answers, preference.converted, preference.converted_format
    result = DemoResult(accuracy=accuracy(answers), blind=accuracy(answers, blind=True), chance=chance,
                        n=len(answers), answers=answers, stages=stages, converted_dir=converted,
                        converted_format=converted_format, work_dir=work_dir,
                        wall_s=console.elapsed(), timings=timings, preference=preference)
    with open(os.path.join(work_dir, 'answers.jsonl'), 'w', encoding='utf-8') as f:
        for a in answers:
            f.write(json.dumps(dataclasses.asdict(a)) + '\n')
    console('')
    console(answer_table(answers))
    console('')
    console("  times: " + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) +
            f'; total {_fmt_time(result.wall_s)}. Chance: {chance:.3f}. TensorBoard: tensorboard --logdir '
            f'{os.path.relpath(work_dir, REPO_ROOT)}')
    return result


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='tools/demo.py',
        description='The embedded demo: tiny models and data made here, MLP warm-up, fine-tuning, conversion to '
                    'the official InternVL layout, and answers to held-out questions, on a CPU, offline.')
    parser.add_argument('--work-dir', default=os.path.join(REPO_ROOT, 'work_dirs', 'demo'),
                        help='output folder (default work_dirs/demo)')
    parser.add_argument('--nproc-per-node', type=int, default=int(os.environ.get('NPROC_PER_NODE') or 1),
                        help='training processes (default $NPROC_PER_NODE or 1; >1 runs torch.distributed on gloo)')
    parser.add_argument('--deepspeed', default=os.environ.get('DEEPSPEED') or None,
                        help='zero2, zero3 (configs/deepspeed/*_cpu.json) or a DeepSpeed JSON (default $DEEPSPEED '
                             'or none)')
    parser.add_argument('--recipe', choices=sorted(RECIPES), default='default',
                        help='default: the full demo; quick: a shortened run (fewer samples and iterations)')
    parser.add_argument('--set', nargs='+', default=[], metavar='FIELD=VALUE',
                        help='override recipe fields, e.g. --set finetune_iters=2000 finetune=lora; the model '
                             f'family: vision={"|".join(VISION_TYPES)} projector={"|".join(PROJECTOR_TYPES)} '
                             '[image_mode=tile|resize|pad]')
    parser.add_argument('--seed', type=int, default=None, help='random seed (default: the recipe\'s, 0)')
    parser.add_argument('--min-accuracy', type=float, default=None,
                        help='exit 1 when the accuracy is below this (default: no check)')
    args = parser.parse_args(argv)
    if args.deepspeed in ('', 'none', 'None', '0', 'no'):
        args.deepspeed = None
    return args


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = dataclasses.replace(RECIPES[args.recipe])
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for item in args.set:
        key, sep, value = item.partition('=')
        if not sep or key not in types:
            raise SystemExit(f'--set {item}: expected FIELD=VALUE with FIELD among {", ".join(types)}')
        current = getattr(recipe, key)
        if isinstance(current, bool):
            parsed = value.lower() in ('1', 'true', 'yes', 'on')
        elif isinstance(current, int):
            parsed = int(value)
        elif isinstance(current, float):
            parsed = float(value)
        elif key == 'kinds':
            parsed = tuple(v for v in value.split(',') if v) or None
        elif key == 'sft_weights':  # digit:2,small_digit:2 (empty: balanced)
            try:
                parsed = {k: int(w) for k, w in (pair.split(':') for pair in value.split(',') if pair)}
            except ValueError:
                raise SystemExit(f'--set {item}: expected sft_weights=KIND:N,KIND:N,...') from None
        else:
            parsed = value
        setattr(recipe, key, parsed)
    if args.seed is not None:
        recipe.seed = args.seed
    return recipe


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    console = Console(os.path.join(os.path.abspath(args.work_dir), 'demo.log'))
    console(f'recipe: {recipe.describe()}')
    try:
        result = run_demo(args.work_dir, recipe, nproc=args.nproc_per_node, deepspeed=args.deepspeed,
                          console=console)
    except DemoError as exc:
        console(f'demo failed: {exc}')
        return 1
    with open(os.path.join(result.work_dir, 'result.json'), 'w', encoding='utf-8') as f:
        json.dump({'accuracy': result.accuracy, 'blind': result.blind, 'chance': result.chance, 'n': result.n,
                   'per_kind': per_kind(result.answers), 'wall_s': result.wall_s, 'timings': result.timings,
                   'preference': None if result.preference is None else {
                       'accuracy': result.preference.accuracy, 'before': result.preference.before,
                       'n': result.preference.n, 'accuracy_after_finetuning': result.preference.sft_accuracy},
                   'nproc': args.nproc_per_node, 'deepspeed': args.deepspeed,
                   'recipe': dataclasses.asdict(recipe)}, f, indent=1)
    console(f'converted: {result.converted_dir} ({result.converted_format})')
    if result.preference:
        console(result.preference.line())
    console(result.summary())
    if args.min_accuracy is not None and result.accuracy < args.min_accuracy:
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
