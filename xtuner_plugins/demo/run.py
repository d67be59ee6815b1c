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
log, not by the exit code alone. Logs and TensorBoard events stay in each stage's work folder. The configs are
those of the repository checkout the package sits in, or of the folder ``--configs DIR`` names (the
repository's ``configs/``; needed when the package is installed without its checkout).

Its closing lines: ``serving: python tools/serve.py PATH`` (and why vLLM's CPU build cannot serve it, where
it cannot), ``converted: PATH (FORMAT)``, the preference stage's ``preference accuracy: ...`` where it ran, and
last ``demo accuracy: A (N questions); blind control: B``.

This module is the orchestration; its parts: :mod:`~xtuner_plugins.demo.recipe` (the recipe and ``--set``),
:mod:`~xtuner_plugins.demo.stages` (configs, models, data, ``--cfg-options``, training and conversion),
:mod:`~xtuner_plugins.demo.preference_stage` (steps 7 and 8, the recipe's preference stage),
:mod:`~xtuner_plugins.demo.scoring` (answers and their scores), :mod:`~xtuner_plugins.demo.console` (output),
:mod:`~xtuner_plugins.demo.data` (the synthetic data), :mod:`~xtuner_plugins.demo.preference` (pairs),
:mod:`~xtuner_plugins.demo.command_line` (the options).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

from xtuner_plugins.launch import cache_env
from xtuner_plugins.signals import sigterm_as_interrupt

from .command_line import parse_args
from .console import Console, DemoError, fmt_time
from .preference_stage import preference_stage
from .recipe import RECIPES, Recipe, recipe_from_args
from .scoring import (Answer, DemoResult, accuracy, answer_questions, answer_table, kind_changes, per_kind,
                      single_frame_accuracy, summary_line)
from .stages import (DEFAULT_CONFIGS, REPO_ROOT, StageResult, deepspeed_json, demo_configs, make_data, make_models,
                     model_geometry, preference_config, run_converter, stage_options, train_stage)

__all__ = ['Answer', 'CONFIGS', 'REPO_ROOT', 'Recipe', 'RECIPES', 'main', 'per_kind', 'run_demo']

#: The stage configs of the demo (the checkout's by default; a run with ``configs_dir`` puts its own here).
CONFIGS: Dict[str, str] = demo_configs() if DEFAULT_CONFIGS else {}


def not_a_demo_run(work_dir: str) -> Optional[str]:
    """Why the demo may not run into ``work_dir``, or None: a folder holding files that no earlier demo run wrote
    (its ``recipe.json``, written first) would lose them, as a run replaces its stage folders (named as the
    stage configs' own work folders: ``--work-dir work_dirs`` replaced a real ``work_dirs/pretrain_mlp``) and its
    data files."""
    try:
        names = sorted(os.listdir(work_dir))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f'--work-dir {work_dir}: {exc.strerror or exc}'
    if 'recipe.json' in names or not set(names) - {'demo.log', 'run.lock'}:
        return None
    return (f'--work-dir {work_dir} holds {", ".join(names[:4])}{", ..." if len(names) > 4 else ""} and is no '
            'earlier demo run (no recipe.json): the demo replaces its stage folders and data there; give a new or '
            'empty folder, or an earlier demo run\'s')


def run_demo(work_dir: str = os.path.join(REPO_ROOT, 'work_dirs', 'demo'), recipe: Optional[Recipe] = None,
             nproc: int = 1, deepspeed: Optional[str] = None, console: Optional[Console] = None,
             stage_timeout: float = 3600, configs_dir: Optional[str] = None) -> DemoResult:
    """Run the whole demo into ``work_dir``; returns the accuracies (the caller prints the summary line).
    ``configs_dir``: the folder of the demo's stage configs (``--configs``; default the checkout's ``configs/``)."""
    recipe = recipe or RECIPES['default']
    if nproc < 1:
        raise ValueError(f'nproc must be >= 1, got {nproc}')
    CONFIGS.update(demo_configs(configs_dir))   # preference_stage reads them here too
    ds = deepspeed_json(deepspeed, CONFIGS)
    if recipe.preference:
        preference_config(recipe, CONFIGS)   # a wrong preference_train fails now, not after fine-tuning
    work_dir = os.path.abspath(work_dir)
    not_ours = not_a_demo_run(work_dir)
    if not_ours:
        raise DemoError(not_ours)
    os.makedirs(work_dir, exist_ok=True)
    console = console or Console(os.path.join(work_dir, 'demo.log'))
    if os.path.exists(os.path.join(work_dir, 'result.json')):   # an earlier run's: this run's is written at its end
        os.remove(os.path.join(work_dir, 'result.json'))
    with open(os.path.join(work_dir, 'recipe.json'), 'w', encoding='utf-8') as f:
        json.dump(dataclasses.asdict(recipe), f, indent=1)
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
                                     console, nproc, ds, cache_root, stage_timeout)
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
                                     console, nproc, ds, cache_root, stage_timeout)
    timings['finetune'] = time.perf_counter() - t

    t = time.perf_counter()
    console.step(f'5/{steps} conversion: tools/convert_to_official.py --format auto (the layout that fits the '
                 f'family)')
    from xtuner_plugins.models.inference import folder_format
    converted = run_converter(stages['finetune'].checkpoint, os.path.join(work_dir, 'converted'), console)
    converted_format = folder_format(converted)
    console(f'  {converted_format} layout in {os.path.relpath(converted, REPO_ROOT)}')
    timings['convert'] = time.perf_counter() - t

    t = time.perf_counter()
    how = ('LlavaForConditionalGeneration + its processor' if converted_format == 'llava' else
           'AutoModel.from_pretrained(..., trust_remote_code=True) + model.chat')
    console.step(f'6/{steps} answers: {how}, greedy; blind control: the same questions on blank grey images')
    answers = answer_questions(converted, data['test'], data['images'], console, recipe.max_new_tokens,
                               recipe.video_frames)
    timings['answers'] = time.perf_counter() - t
    if recipe.video:
        console(f'  video questions ({recipe.video_frames} frames each): single-frame control (every frame the '
                f'middle one): {single_frame_accuracy(answers):.3f}')
    return _finish(recipe, work_dir, console, models, data, geometry, stages, ft_options, answers, converted,
                   converted_format, chance, timings, nproc, ds, stage_timeout)


def _finish(recipe: Recipe, work_dir: str, console: Console, models, data, geometry, stages, ft_options,
            answers, converted: str, converted_format: str, chance: float, timings: Dict[str, float], nproc: int,
            ds: Optional[str], stage_timeout: float) -> DemoResult:
    """After the fine-tuned model's answers: the preference stage when the recipe has one, then the result,
    ``answers.jsonl`` and the tables."""
    preference = None
    if recipe.preference:
        preference = preference_stage(recipe, CONFIGS, models, data, geometry, stages, ft_options, work_dir, console,
                                      nproc, ds, os.path.join(work_dir, '.cache'), stage_timeout, timings, 8)
        console(f'  after fine-tuning: {summary_line(accuracy(answers), len(answers), accuracy(answers, True))}')
        console('  per kind, questions right before and after the preference stage:')
        console(kind_changes(answers, preference.answers))
        preference.sft_accuracy, preference.sft_answers = accuracy(answers), answers
        answers, converted, converted_format = preference.answers, preference.converted, preference.converted_format
    result = DemoResult(accuracy=accuracy(answers), blind=accuracy(answers, blind=True), chance=chance,
                        n=len(answers), answers=answers, stages=stages, converted_dir=converted,
                        converted_format=converted_format, work_dir=work_dir,
                        wall_s=console.elapsed(), timings=timings, preference=preference,
                        single=single_frame_accuracy(answers) if recipe.video else None)
    with open(os.path.join(work_dir, 'answers.jsonl'), 'w', encoding='utf-8') as f:
        for a in answers:
            f.write(json.dumps(dataclasses.asdict(a)) + '\n')
    console('')
    console(answer_table(answers))
    console('')
    console("  times: " + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) +
            f'; total {fmt_time(result.wall_s)}. Chance: {chance:.3f}. TensorBoard: tensorboard --logdir '
            f'{os.path.relpath(work_dir, REPO_ROOT)}')
    return result


def rerun_preference(work_dir: str, recipe: Recipe, nproc: int = 1, deepspeed: Optional[str] = None,
                     console: Optional[Console] = None, stage_timeout: float = 3600,
                     configs_dir: Optional[str] = None) -> DemoResult:
    """Only the preference stage (and what it needs: the data, the fine-tuned model's answers), from the
    fine-tuned checkpoint and converted folder a run of the same recipe left in ``work_dir``
    (``--preference-only``: to try preference settings without fine-tuning again). The recipe must equal that
    run's but for its ``preference*`` fields (the recipe in its ``result.json``, which only a whole run writes).

    Raises:
        DemoError: no such run in ``work_dir``, or it was made with another recipe.
    """
    CONFIGS.update(demo_configs(configs_dir))
    ds = deepspeed_json(deepspeed, CONFIGS)
    work_dir = os.path.abspath(work_dir)
    console = console or Console(os.path.join(work_dir, 'demo.log'))
    try:   # written at a whole run's end (removed as a run starts): a run stopped halfway has none
        with open(os.path.join(work_dir, 'result.json'), encoding='utf-8') as f:
            recorded = json.load(f)['recipe']
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DemoError(f'--preference-only needs a whole demo run in {work_dir} (its result.json, written at the end '
                        f'of a run: a run stopped before its end leaves none; run the demo again): {exc}') from exc
    differ = [k for k, v in dataclasses.asdict(recipe).items()
              if not k.startswith('preference') and k in recorded and json.loads(json.dumps(v)) != recorded[k]]
    if differ:
        raise DemoError(f'--preference-only: the recipe differs from the run in {work_dir} in '
                        + ', '.join(f'{k} ({recorded[k]!r} there, {getattr(recipe, k)!r} here)' for k in differ))
    ft = recipe.finetune
    checkpoints = sorted(glob.glob(os.path.join(work_dir, f'finetune_{ft}', 'iter_*.pth')),
                         key=lambda p: int(os.path.basename(p)[5:-4]))
    if not checkpoints:
        raise DemoError(f'--preference-only: no fine-tuned checkpoint in {work_dir}/finetune_{ft}')
    for key, value in cache_env(os.path.join(work_dir, '.cache')).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    timings: Dict[str, float] = {}
    console(f'xtuner-plugins demo, the preference stage only, from the fine-tuned model in '
            f'{os.path.relpath(work_dir, REPO_ROOT)}')
    models = {'vision': os.path.join(work_dir, 'models', recipe.vision), 'llm': os.path.join(work_dir, 'models', 'llm')}
    t = time.perf_counter()
    data = make_data(os.path.join(work_dir, 'data'), recipe)   # the same files again, with the preference prompts
    timings['data'] = time.perf_counter() - t
    from xtuner_plugins.demo.data import chance_accuracy
    from xtuner_plugins.models.inference import folder_format
    geometry = model_geometry(models, recipe)
    stages = {'finetune': StageResult('fine-tune', os.path.dirname(checkpoints[-1]), '', checkpoints[-1],
                                      int(os.path.basename(checkpoints[-1])[5:-4]))}
    ft_options = stage_options(ft, recipe, models, data['sft'], data['images'], os.path.join(work_dir, 'cache'),
                               nproc, geometry=geometry)
    converted = os.path.join(work_dir, 'converted')
    t = time.perf_counter()
    answers = answer_questions(converted, data['test'], data['images'], console, recipe.max_new_tokens,
                               recipe.video_frames)
    timings['answers'] = time.perf_counter() - t
    return _finish(recipe, work_dir, console, models, data, geometry, stages, ft_options, answers, converted,
                   folder_format(converted), chance_accuracy(data['test']), timings, nproc, ds, stage_timeout)


# ------------------------------------------------------------------------------------------ command line
# (its options: command_line.py)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    uneven = [f'{name}={getattr(recipe, name)}' for name in ('pretrain_batch', 'finetune_batch', 'preference_batch')
              if getattr(recipe, name) % args.nproc_per_node and (recipe.preference or name != 'preference_batch')]
    if uneven:   # before anything is made (a stage's options found it after the models and data were)
        print(f'demo: refused: {", ".join(uneven)} does not split over {args.nproc_per_node} processes '
              f'(--nproc-per-node): give batches of a multiple of it', file=sys.stderr)
        return 2
    not_ours = None if args.preference_only else not_a_demo_run(os.path.abspath(args.work_dir))
    if not_ours:   # before demo.log is written into it
        print(f'demo: refused: {not_ours}', file=sys.stderr)
        return 2
    from xtuner_plugins.engine.lockfile import RunLock, RunLockError
    lock = RunLock(os.path.abspath(args.work_dir))
    try:   # one demo a folder: a second run deleted the stage folders under the first
        lock.acquire()
    except RunLockError as exc:
        print(f'demo: refused: {exc}', file=sys.stderr)
        return 2
    except OSError as exc:   # a folder this user cannot make or write (a read-only checkout's work_dirs/)
        print(f'demo: refused: --work-dir {args.work_dir} cannot be written: {exc.strerror or exc}'
              + (f' ({exc.filename})' if exc.filename else ''), file=sys.stderr)
        return 2
    try:
        return _main(args, recipe)
    finally:
        lock.release()


def _main(args, recipe: Recipe) -> int:
    from safetensors import SafetensorError
    console = Console(os.path.join(os.path.abspath(args.work_dir), 'demo.log'))
    console(f'recipe: {recipe.describe()}')
    try:
        if args.preference_only and not recipe.preference:
            raise DemoError('--preference-only needs --set preference=mpo (or dpo)')
        run = rerun_preference if args.preference_only else run_demo
        with sigterm_as_interrupt():   # as Ctrl-C: the training under way is stopped with the demo
            result = run(args.work_dir, recipe, nproc=args.nproc_per_node, deepspeed=args.deepspeed,
                         console=console, configs_dir=args.configs)
    except DemoError as exc:
        console(f'demo failed: {exc}')
        return 1
    except (OSError, SafetensorError) as exc:   # a full disk under the models, the data or a stage's files
        console(f'demo failed: what it writes under {args.work_dir} could not be written: '
                f'{getattr(exc, "strerror", 0) or exc}' + (f' ({exc.filename})' if getattr(exc, 'filename', None)
                                                         else ''))
        return 1
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM: the training under way was stopped on the way out
        console(f'demo stopped; what it wrote so far is in {args.work_dir}')
        return 130
    with open(os.path.join(result.work_dir, 'result.json'), 'w', encoding='utf-8') as f:
        json.dump({'accuracy': result.accuracy, 'blind': result.blind, 'chance': result.chance, 'n': result.n,
                   'per_kind': per_kind(result.answers), 'wall_s': result.wall_s, 'timings': result.timings,
                   'preference': None if result.preference is None else {
                       'accuracy': result.preference.accuracy, 'before': result.preference.before,
                       'n': result.preference.n, 'accuracy_after_finetuning': result.preference.sft_accuracy,
                       'per_kind_after_finetuning': per_kind(result.preference.sft_answers),
                       'pairs': result.preference.pairs, 'per_kind': result.preference.by_kind},
                   'single_frame': single_frame_accuracy(result.answers),
                   'nproc': args.nproc_per_node, 'deepspeed': args.deepspeed,
                   'recipe': dataclasses.asdict(recipe)}, f, indent=1)
    console(serving_line(result.converted_dir, result.converted_format))
    console(f'converted: {result.converted_dir} ({result.converted_format})')
    if result.preference:
        console(result.preference.line())
    console(result.summary())
    if args.min_accuracy is not None and result.accuracy < args.min_accuracy:
        return 1
    return 0


def serving_line(folder: str, fmt: str) -> str:
    """How to serve the converted folder with vLLM, or why vLLM's CPU build cannot (docs/serving.md)."""
    from xtuner_plugins.cli.serve_settings import SERVABLE, cpu_head_problem, settings
    if fmt not in SERVABLE:
        return f'serving: vLLM does not read the {fmt} layout (it serves the official, hf and llava layouts)'
    problem = cpu_head_problem(settings(folder)['head_dim'])
    return f'serving: python tools/serve.py {os.path.relpath(folder, REPO_ROOT)}' + (
        f' (on a GPU: {problem})' if problem else '')


if __name__ == '__main__':
    sys.exit(main())
