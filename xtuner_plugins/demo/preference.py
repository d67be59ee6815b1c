"""The demo's preference stage (``--set preference=dpo`` or ``mpo``): pairs from its own data, and the held-out
preference accuracy.

* :func:`make_pairs`: one MMPR-style pair per sample of the demo's data (its first question): ``chosen`` the
  right answer, ``rejected`` a plausible wrong one: the model's own wrong answer to that question where it gave
  one (on-policy, as MMPR's rejected answers are the model's own mistakes), else another answer of the same
  question kind (e.g. another colour), drawn at random. Pairs for training come from ``preference.jsonl``
  (new questions on new images, as MMPR's prompts are new to the model) with the fine-tuned model's mistakes
  on them; the held-out pairs from ``test.jsonl``, random wrong answers only.
* :func:`wrong_answers`: those mistakes: a model's greedy answers to the first question of each sample, scored
  by the project's scorer (:mod:`xtuner_plugins.eval`, as the demo's own accuracy), the wrong ones kept.
* :func:`preference_accuracy`: over held-out pairs, the fraction where the policy's implicit reward
  ``beta * (log p(answer) - log p_ref(answer))`` is higher for the chosen answer than for the rejected one (a
  tie counts half, so a policy that is still its reference scores 0.5, chance), computed with the training
  model and the same forward as the loss (:meth:`~xtuner_plugins.models.internvl.VisionLanguageModel.forward`).
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, Mapping, Optional, Tuple

import torch

from .data import ANSWERS

__all__ = ['make_pairs', 'wrong_answers', 'preference_accuracy']


def _first_questions(samples_path: str, limit: Optional[int]):
    """``(line number, sample, question, answer)`` of the first ``limit`` samples (None: all)."""
    with open(samples_path, encoding='utf-8') as src:
        for line_no, line in enumerate(src, 1):
            if limit is not None and line_no > limit:
                return
            sample = json.loads(line)
            question, answer = (turn['value'] for turn in sample['conversations'][:2])
            yield line_no, sample, question, answer


def make_pairs(samples_path: str, out_path: str, seed: int = 0, rejected: Optional[Mapping[str, str]] = None,
               limit: Optional[int] = None) -> int:
    """Write a pair for each of the first ``limit`` samples of ``samples_path`` (None: every one) to
    ``out_path``; returns how many. ``rejected``: sample id -> the model's wrong answer (:func:`wrong_answers`),
    which becomes that pair's rejected answer; the other pairs get a random wrong answer of their kind (drawn
    for every pair, so the pairs without a model's answer are the same with or without ``rejected``)."""
    rejected = rejected or {}
    n = 0
    rng = random.Random(seed)
    with open(out_path, 'w', encoding='utf-8') as out:
        for line_no, sample, question, answer in _first_questions(samples_path, limit):
            wrong = [a for a in ANSWERS[sample['kind']] if a != answer]
            choice = rng.choice(wrong)
            own = rejected.get(sample['id'])
            if own is not None and own.strip() and own != answer:
                choice = own
            out.write(json.dumps({'id': sample['id'], 'image': sample['image'], 'question': question,
                                  'chosen': answer, 'rejected': choice, 'kind': sample['kind']}) + '\n')
            n += 1
    return n


def wrong_answers(model, samples_path: str, image_folder: str, limit: Optional[int] = None,
                  max_new_tokens: int = 8, batch_size: int = 1) -> Tuple[Dict[str, str], int]:
    """``({sample id: wrong answer}, number asked)``: ``model`` (a
    :class:`~xtuner_plugins.models.inference.ConvertedModel`, or anything with its ``ask``/``reset``) answers
    the first question of each of the first ``limit`` samples greedily; the answers the scorer marks wrong
    (and that are not empty) are kept.

    Raises:
        ValueError: naming ``FILE:LINE`` for a sample whose id an earlier sample already has.
    """
    from xtuner_plugins.eval import Question, evaluate
    questions, lines = [], {}
    for line_no, sample, question, answer in _first_questions(samples_path, limit):
        if sample['id'] in lines:
            raise ValueError(f'{samples_path}:{line_no}: id {sample["id"]!r} repeats line {lines[sample["id"]]}')
        lines[sample['id']] = line_no
        images = sample.get('image') or []
        images = [images] if isinstance(images, str) else list(images)
        questions.append(Question(id=sample['id'], category=sample['kind'], prompt=question,
                                  images=[os.path.join(image_folder, p) for p in images], references=[answer]))
    results = evaluate(model, questions, blind=False, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {r.id: r.answer for r in results if r.score < 1.0 and r.answer.strip()}, len(results)


@torch.no_grad()
def preference_accuracy(config: str, options: Mapping[str, object], checkpoint: Optional[str], pairs_path: str,
                        image_folder: str, batch_pairs: int = 16) -> Tuple[float, int]:
    """``(accuracy, number of pairs)`` of the preference config's model (``options`` as trained; ``checkpoint``
    None: before preference training) on the pairs of ``pairs_path``."""
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    cfg = load_config(config, dict(options, **{'train_dataloader.dataset.data_files': [pairs_path],
                                               'train_dataloader.dataset.image_folders': [image_folder],
                                               'train_dataloader.dataset.repeat_times': 1}))
    model = build_for_export(cfg, checkpoint, torch.float32, log=lambda message: None, keep_preference=True)
    dataset_cfg = dict(cfg.train_dataloader.dataset)
    dataset = dataset_cfg.pop('type')(**dataset_cfg)
    collate = dict(cfg.train_dataloader.collate_fn)
    collate_fn = collate.pop('type')
    preferred, n = 0.0, len(dataset)
    for start in range(0, n, batch_pairs):
        items = [dataset[i] for i in range(start, min(n, start + batch_pairs))]
        out = model(collate_fn(items, **collate)['data'], mode='loss')
        preferred += out['rewards_accuracy'].item() * len(items)
    return preferred / max(n, 1), n
