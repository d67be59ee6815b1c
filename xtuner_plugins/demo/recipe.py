"""The demo's recipe: everything its outcome depends on (:class:`Recipe`), the named recipes (:data:`RECIPES`)
and the command line's ``--set FIELD=VALUE`` overrides (:func:`recipe_from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

__all__ = ['PROJECTOR_TYPES', 'RECIPES', 'Recipe', 'VISION_TYPES', 'recipe_from_args', 'recipe_problem']

VISION_TYPES = ('internvit', 'siglip', 'clip')
PROJECTOR_TYPES = ('pixel_shuffle_mlp', 'mlp', 'bilinear_mlp')


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
    # stage 3, off unless set: preference training on pairs (chosen: the right answer; rejected: the fine-tuned
    # model's own wrong answers to new questions, greedy and sampled, and random answers of the same kind) from
    # the fine-tuned model (xtuner_plugins.demo.preference): '' (off), 'dpo' (sigmoid DPO) or 'mpo' (InternVL 2.5's
    # sigmoid 0.8 + bco_pair 0.2 + sft 1.0). Off by default: it adds about 1.5 minutes (77 s measured, 2026-11-24).
    # Measured (benchmarks/RESULTS.md, "the demo's preference stage"): with LoRA on the LLM, every setting at beta
    # 0.1 lost the demo 2-6 questions; beta 2.0 kept seed 0 but lost one question on seeds 1 and 2; training the
    # projector and LLM (preference_train='full', as InternVL 2.5's MPO) at lr 1e-4, beta 2.0 kept or raised all
    # three: seeds 0 / 1 / 2 held out 0.950 / 0.917 / 0.922, demo 0.939 -> 0.944, 0.861 -> 0.867, 0.861 -> 0.861.
    preference: str = ''
    # prompts for the training pairs: new questions (data/preference.jsonl, on images no other split has) that
    # the fine-tuned model answers first; its wrong answers become rejected answers
    preference_prompts: int = 4800
    # rejected answers as MMPR draws them: each prompt answered greedily and preference_samples times sampled
    # at preference_temperature; a pair per distinct wrong answer (at most preference_pairs_per_prompt); a
    # prompt never answered wrong gets a random wrong answer of its kind when preference_fallback, else no pair
    preference_samples: int = 8
    preference_temperature: float = 1.0
    preference_pairs_per_prompt: int = 3
    preference_fallback: bool = True
    # every prompt also gets this many pairs with random wrong answers of its kind (a prompt the model erred on,
    # too): the held-out pairs' kind of rejected answer
    preference_random_pairs: int = 1
    # the loss's weights, comma-separated ('' = PREFERENCE_LOSSES's: mpo 0.8,0.2,1.0 for sigmoid, bco_pair, sft)
    preference_weights: str = ''
    preference_iters: int = 600
    preference_batch: int = 8      # pairs per step (twice the rows)
    preference_lr: float = 0.0     # 0: 1e-4 when preference_train is full, 1e-3 with LoRA
    preference_beta: float = 2.0   # see above; DPO's usual 0.1 lowered the demo's accuracy
    # what the stage trains: 'full' (projector and LLM, configs/demo/mpo_full.py, as InternVL 2.5's MPO; the
    # reference a frozen copy; after finetune='full'), 'lora' (adapters on the LLM, configs/demo/dpo_lora.py; the
    # reference the model with them off; after either fine-tune) or '' (what the fine-tune trained)
    preference_train: str = ''
    # videos instead of the image questions (xtuner_plugins.demo.videos): '' (off), 'all' or kinds among motion_x,
    # motion_y, first_colour; n_sft / n_test then count videos (the warm-up stays on image captions), each of
    # video_frames frames (one tile each), and the answers add the single-frame control (every frame the middle one)
    video: str = ''
    video_frames: int = 8
    # runtime
    num_workers: int = 1
    log_interval: int = 50
    # answers
    max_new_tokens: int = 8

    def describe(self) -> str:
        return ', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(self))

    @property
    def preference_mode(self) -> str:
        """What the preference stage trains: ``preference_train``, or else the fine-tune's ``'full'``/``'lora'``."""
        return self.preference_train or self.finetune

    @property
    def preference_rate(self) -> float:
        """The preference stage's learning rate: ``preference_lr``, or else its mode's (measured) default."""
        return self.preference_lr or (1e-4 if self.preference_mode == 'full' else 1e-3)

    @property
    def mode(self) -> str:
        """The image mode: the recipe's, or the family's."""
        return self.image_mode or ('pad' if self.projector == 'mlp' else 'tile')


RECIPES: Dict[str, Recipe] = {
    'default': Recipe(),
    # a shortened run for the test suite: fewer samples and iterations, the same pipeline
    'quick': Recipe(n_pretrain=400, n_sft=3000, n_test=60, pretrain_iters=50, finetune_iters=600,
                    log_interval=20),
    # videos whose answers need more than one frame (docs/demo.md)
    'video': Recipe(video='all', n_sft=3000, n_test=120, finetune_iters=2000),
}


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
        elif isinstance(current, (int, float)):
            try:
                parsed = type(current)(value)
            except ValueError:
                raise SystemExit(f'--set {item}: expected {"an integer" if isinstance(current, int) else "a number"}'
                                 ) from None
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
    problem = recipe_problem(recipe)
    if problem:
        raise SystemExit(f'--set: {problem}')
    return recipe


#: fields of at least 1 (sizes, counts, iterations, batches), and of at least 0
AT_LEAST_ONE = ('tile_size', 'vit_hidden', 'vit_layers', 'vit_heads', 'vit_intermediate', 'llm_hidden', 'llm_layers',
                'llm_heads', 'llm_kv_heads', 'llm_intermediate', 'max_dynamic_patch', 'n_pretrain', 'n_sft', 'n_test',
                'pretrain_iters', 'pretrain_batch', 'finetune_iters', 'finetune_batch', 'preference_prompts',
                'preference_pairs_per_prompt', 'preference_iters', 'preference_batch', 'video_frames', 'log_interval',
                'max_new_tokens')
AT_LEAST_ZERO = ('preference_samples', 'preference_random_pairs', 'num_workers', 'weight_decay', 'preference_lr')
POSITIVE = ('vit_init_std', 'llm_init_std', 'pretrain_lr', 'finetune_lr', 'vision_lr', 'preference_temperature',
            'preference_beta')
CHOICES = {'vision': VISION_TYPES, 'projector': PROJECTOR_TYPES, 'image_mode': ('', 'tile', 'resize', 'pad'),
           'finetune': ('full', 'lora'), 'preference': ('', 'dpo', 'mpo'), 'preference_train': ('', 'full', 'lora')}


def recipe_problem(recipe: Recipe) -> Optional[str]:
    """What in ``recipe`` cannot run, named with the value and what it takes, or None: checked before anything is
    written (a value used only by a later stage, such as ``n_test=0`` or ``preference=xyz``, failed after the
    training it follows)."""
    from .scenes import KINDS
    from .videos import VIDEO_KINDS
    for name in AT_LEAST_ONE:
        if getattr(recipe, name) < 1:
            return f'{name}={getattr(recipe, name)!r}: needs 1 or more'
    for name in AT_LEAST_ZERO:
        if getattr(recipe, name) < 0:
            return f'{name}={getattr(recipe, name)!r}: needs 0 or more'
    for name in POSITIVE:
        if not getattr(recipe, name) > 0:
            return f'{name}={getattr(recipe, name)!r}: needs a number over 0'
    if not 0 <= recipe.warmup_ratio < 1:
        return f'warmup_ratio={recipe.warmup_ratio!r}: needs 0 <= warmup_ratio < 1'
    for name, choices in CHOICES.items():
        if getattr(recipe, name) not in choices:
            return f'{name}={getattr(recipe, name)!r}: use one of {", ".join(repr(c) for c in choices)}'
    unknown = [k for k in recipe.kinds or () if k not in KINDS]
    if unknown:
        return f'kinds={",".join(recipe.kinds)}: {", ".join(unknown)} not among {", ".join(KINDS)}'
    unknown = [k for k in recipe.video.split(',') if k not in VIDEO_KINDS] if recipe.video not in ('', 'all') else []
    if unknown:
        return f'video={recipe.video}: use all, or kinds among {", ".join(VIDEO_KINDS)} ({", ".join(unknown)} is not)'
    unknown = [k for k in recipe.sft_weights or {} if k not in KINDS]
    if unknown:
        return f'sft_weights: {", ".join(unknown)} not among {", ".join(KINDS)}'
    return None
