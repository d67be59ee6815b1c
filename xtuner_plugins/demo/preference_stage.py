"""Steps 7 and 8 of the demo (:mod:`~xtuner_plugins.demo.run`), for a recipe with ``preference``: preference pairs
(the fine-tuned model's own wrong answers, as MMPR draws them), DPO/MPO training from the fine-tuned checkpoint,
held-out preference accuracy before and after, then conversion and the demo's questions again.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Mapping, Optional

from .console import Console, quiet_mmengine_info
from .recipe import Recipe
from .scoring import PreferenceResult, answer_questions
from .stages import (PREFERENCE_LOSSES, REPO_ROOT, preference_config, repeat_for, run_converter, stage_options,
                     train_stage)


def preference_stage(recipe: Recipe, configs: Mapping[str, str], models, data, geometry, stages, ft_options,
                     work_dir: str, console: Console, nproc: int, deepspeed: Optional[str], cache_root: str,
                     stage_timeout: float, timings: Dict[str, float], steps: int) -> PreferenceResult:
    """Steps 7 and 8: pairs, LoRA DPO/MPO from the fine-tuned checkpoint, held-out preference accuracy before
    and after, conversion and the demo's questions again. ``configs``: the demo's stage configs."""
    from xtuner_plugins.demo.preference import make_pairs, pair_counts, preference_accuracy, wrong_answers
    from xtuner_plugins.models.inference import ConvertedModel, folder_format
    t = time.perf_counter()
    weights = ([float(w) for w in recipe.preference_weights.split(',')] if recipe.preference_weights else
               PREFERENCE_LOSSES[recipe.preference]['weights'])
    losses = ' + '.join(f'{w} {k}' for k, w in zip(PREFERENCE_LOSSES[recipe.preference]['types'], weights))
    config = preference_config(recipe, configs)
    trained = ('LoRA from the fine-tuned model, which is the reference' if recipe.preference_mode == 'lora' else
               'projector and LLM from the fine-tuned model, a frozen copy of it the reference')
    console.step(f'7/{steps} preference training ({recipe.preference}: {losses}, beta {recipe.preference_beta}): '
                 f'{os.path.relpath(config, os.path.dirname(os.path.dirname(config)))}, {trained}')
    folder = os.path.join(work_dir, 'data')
    pairs = {split: os.path.join(folder, f'{split}_pairs.jsonl') for split in ('preference', 'test')}
    asking = time.perf_counter()
    own, asked = wrong_answers(ConvertedModel(os.path.join(work_dir, 'converted')), data['preference'],
                               data['images'], None, recipe.max_new_tokens, batch_size=16,
                               samples=recipe.preference_samples, temperature=recipe.preference_temperature,
                               seed=recipe.seed)
    asking = time.perf_counter() - asking
    counts = {'preference': make_pairs(data['preference'], pairs['preference'], recipe.seed, own,
                                       per_prompt=recipe.preference_pairs_per_prompt,
                                       fallback=recipe.preference_fallback,
                                       random_pairs=recipe.preference_random_pairs),
              'test': make_pairs(data['test'], pairs['test'], recipe.seed)}
    console(f'  rejected answers as MMPR draws them: the fine-tuned model answered {asked} new questions greedily '
            f'and {recipe.preference_samples} times at temperature {recipe.preference_temperature} '
            f'({asking:.0f} s); wrong on {len(own)} of them')
    console(pairs_report(pair_counts(pairs['preference']), counts, pairs, recipe))
    options = stage_options('preference', recipe, models, pairs['preference'], data['images'],
                            ft_options['train_dataloader.dataset.cache_dir'], nproc,
                            pretrained_pth=stages['finetune'].checkpoint, geometry=geometry)
    options['train_dataloader.dataset.repeat_times'] = round(
        repeat_for(recipe.preference_iters, recipe.preference_batch, counts['preference']), 6)
    stages['preference'] = train_stage('preference', config, os.path.join(work_dir, 'preference'),
                                       options, console, nproc, deepspeed, cache_root, stage_timeout)
    kinds: Dict[str, Dict[str, float]] = {'before': {}, 'after': {}}
    with quiet_mmengine_info():   # the model's build (tensors loaded, parameter counts) is not the demo's to print
        before, n = preference_accuracy(config, options, None, pairs['test'], data['images'],
                                        by_kind=kinds['before'])
        after, _ = preference_accuracy(config, options, stages['preference'].checkpoint, pairs['test'],
                                       data['images'], by_kind=kinds['after'])
    console(f'  held-out preference accuracy {before:.3f} -> {after:.3f}; per kind: '
            + ', '.join(f'{k} {kinds["before"][k]:.2f} -> {v:.2f}' for k, v in kinds['after'].items()))
    timings['preference'] = time.perf_counter() - t
    t = time.perf_counter()
    console.step(f'8/{steps} the preference-trained model: conversion and the same questions')
    converted = run_converter(stages['preference'].checkpoint, os.path.join(work_dir, 'converted_preference'),
                              console)
    answers = answer_questions(converted, data['test'], data['images'], console, recipe.max_new_tokens,
                               recipe.video_frames)
    timings['answers_preference'] = time.perf_counter() - t
    return PreferenceResult(accuracy=after, before=before, n=n, answers=answers, converted=converted,
                            converted_format=folder_format(converted), pairs=pair_counts(pairs['preference']),
                            by_kind=kinds['after'])


def pairs_report(by_kind: Mapping[str, Mapping[str, int]], counts: Mapping[str, int], pairs: Mapping[str, str],
                 recipe: Recipe) -> str:
    """The training pairs in a few lines: how many, on-policy (the model's own wrong answers) or random, per
    kind."""
    model, fallback = (sum(c[key] for c in by_kind.values()) for key in ('model', 'random'))
    lines = [f'  pairs (chosen: the right answer): {counts["preference"]} for training in '
             f'{os.path.relpath(pairs["preference"], REPO_ROOT)}: {model} on-policy (the model\'s own wrong '
             f'answers, at most {recipe.preference_pairs_per_prompt} a question), {fallback} random (another answer '
             f'of its kind: {recipe.preference_random_pairs} a question, and one for a question the model never got '
             f'wrong{"" if recipe.preference_fallback else ": off"}); {counts["test"]} held out (random wrong answers)',
             f'  {"kind":<12} {"questions":>9} {"on-policy":>9} {"random":>7}  (questions: those with a pair)']
    for kind, c in by_kind.items():
        lines.append(f'  {kind:<12} {c["prompts"]:>9d} {c["model"]:>9d} {c["random"]:>7d}')
    return '\n'.join(lines)
