"""The demo's preference stage (``--set preference=dpo`` or ``mpo``): pairs from its own data, and the held-out
preference accuracy.

* :func:`wrong_answers`: the fine-tuned model's mistakes, drawn the way MMPR draws its rejected answers: the
  model answers the first question of each sample greedily and, with ``samples=K``, K more times sampled at a
  ``temperature``; the answers the project's scorer (:mod:`xtuner_plugins.eval`, as the demo's own accuracy)
  marks wrong (and that are not empty) are kept, distinct after the scorer's normalisation, the greedy one
  first, then the most often drawn.
* :func:`make_pairs`: MMPR-style pairs for the samples of the demo's data (their first question): ``chosen``
  the right answer, ``rejected`` a wrong one: one pair for each of the model's distinct wrong answers to that
  question (on-policy, as MMPR's rejected answers are the model's own mistakes; at most ``per_prompt``), and a
  prompt the model never got wrong one pair with another answer of its kind (e.g. another colour), drawn at
  random (the fallback; ``fallback=False`` leaves such prompts out). Each pair records its ``source``
  (``model`` or ``random``): :func:`pair_counts` counts them per kind. Pairs for training come from
  ``preference.jsonl`` (new questions on new images, as MMPR's prompts are new to the model); the held-out pairs
  from ``test.jsonl``, random wrong answers only (the measure stays the same whatever the training pairs are).
* :func:`preference_accuracy`: over held-out pairs, the fraction where the policy's implicit reward
  ``beta * (log p(answer) - log p_ref(answer))`` is higher for the chosen answer than for the rejected one (a
  tie counts half, so a policy that is still its reference scores 0.5, chance), computed with the training
  model and the same forward as the loss (:meth:`~xtuner_plugins.models.internvl.VisionLanguageModel.forward`).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .data import ANSWERS

__all__ = ['make_pairs', 'pair_counts', 'wrong_answers', 'preference_accuracy']


def _first_questions(samples_path: str, limit: Optional[int]):
    """``(line number, sample, question, answer)`` of the first ``limit`` samples (None: all)."""
    with open(samples_path, encoding='utf-8') as src:
        for line_no, line in enumerate(src, 1):
            if limit is not None and line_no > limit:
                return
            sample = json.loads(line)
            question, answer = (turn['value'] for turn in sample['conversations'][:2])
            yield line_no, sample, question, answer


def make_pairs(samples_path: str, out_path: str, seed: int = 0,
               rejected: Optional[Mapping[str, Union[str, Sequence[str]]]] = None, limit: Optional[int] = None,
               per_prompt: int = 1, fallback: bool = True, random_pairs: int = 0) -> int:
    """Write the pairs of the first ``limit`` samples of ``samples_path`` (None: every one) to ``out_path``;
    returns how many. ``rejected``: sample id -> the model's wrong answer, or its wrong answers best first
    (:func:`wrong_answers`): a pair for each of the first ``per_prompt`` (blank ones and the right answer
    skipped); a sample without one gets a random wrong answer of its kind (drawn for every sample, so those
    pairs are the same with or without ``rejected``), or no pair when not ``fallback``. ``random_pairs``: every
    sample also gets that many pairs with random wrong answers of its kind that are not the model's (the first
    the draw above; a sample without the model's answers gets at least the one)."""
    if per_prompt < 1:
        raise ValueError(f'per_prompt must be >= 1, got {per_prompt}')
    rejected = rejected or {}
    n = 0
    rng = random.Random(seed)
    with open(out_path, 'w', encoding='utf-8') as out:
        for line_no, sample, question, answer in _first_questions(samples_path, limit):
            choice = rng.choice([a for a in ANSWERS[sample['kind']] if a != answer])
            own = rejected.get(sample['id']) or []
            own = [own] if isinstance(own, str) else own
            own = [a for a in own if a.strip() and a != answer][:per_prompt]
            if not own and not fallback:
                continue
            others = [a for a in ANSWERS[sample['kind']] if a != answer and a != choice and a not in own]
            random.Random(f'{seed}:{sample["id"]}').shuffle(others)   # its own stream: the draws above stay
            randoms = ([] if choice in own else [choice]) + others
            chosen = [(a, 'model') for a in own] + [(a, 'random') for a in randoms[:max(random_pairs, int(not own))]]
            for wrong, source in chosen:
                out.write(json.dumps({'id': sample['id'], 'image': sample['image'], 'question': question,
                                      'chosen': answer, 'rejected': wrong, 'kind': sample['kind'],
                                      'source': source}) + '\n')
                n += 1
    return n


def pair_counts(pairs_path: str) -> Dict[str, Dict[str, int]]:
    """``{kind: {'model': pairs with the model's own wrong answer, 'random': fallback pairs, 'prompts': prompts
    with a pair}}`` of a pairs file :func:`make_pairs` wrote."""
    counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {'model': 0, 'random': 0, 'prompts': 0})
    seen = set()
    with open(pairs_path, encoding='utf-8') as f:
        for line in f:
            pair = json.loads(line)
            kind = counts[pair['kind']]
            kind[pair.get('source', 'random')] += 1
            if pair['id'] not in seen:
                seen.add(pair['id'])
                kind['prompts'] += 1
    return dict(counts)


def _questions(samples_path: str, image_folder: str, limit: Optional[int]):
    from xtuner_plugins.eval import Question
    questions, lines = [], {}
    for line_no, sample, question, answer in _first_questions(samples_path, limit):
        if sample['id'] in lines:
            raise ValueError(f'{samples_path}:{line_no}: id {sample["id"]!r} repeats line {lines[sample["id"]]}')
        lines[sample['id']] = line_no
        images = sample.get('image') or []
        images = [images] if isinstance(images, str) else list(images)
        questions.append(Question(id=sample['id'], category=sample['kind'], prompt=question,
                                  images=[os.path.join(image_folder, p) for p in images], references=[answer]))
    return questions


def _sampled(model, questions, samples: int, temperature: float, max_new_tokens: int,
             batch_size: int) -> Dict[str, List[str]]:
    """``{id: samples answers}``: ``batch_size`` questions a batch, each ``samples`` times, sampled at
    ``temperature`` (no top-k / top-p cut)."""
    generation = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                      num_beams=1)
    pad = getattr(getattr(model, 'tokenizer', None), 'pad_token_id', None)
    if pad is not None:
        generation['pad_token_id'] = pad
    drawn: Dict[str, List[str]] = {}
    for start in range(0, len(questions), max(1, batch_size)):
        batch = [q for q in questions[start:start + max(1, batch_size)] for _ in range(samples)]
        if hasattr(model, 'ask_batch'):
            answers = model.ask_batch([q.prompt for q in batch], [list(q.images) for q in batch], generation)
        else:
            answers = []
            for q in batch:
                model.reset()
                answers.append(model.ask(q.prompt, list(q.images), generation))
        for q, a in zip(batch, answers):
            drawn.setdefault(q.id, []).append(a)
    model.reset()
    return drawn


def wrong_answers(model, samples_path: str, image_folder: str, limit: Optional[int] = None,
                  max_new_tokens: int = 8, batch_size: int = 1, samples: int = 0, temperature: float = 1.0,
                  seed: int = 0) -> Tuple[Dict[str, List[str]], int]:
    """``({sample id: the model's distinct wrong answers}, number asked)``: ``model`` (a
    :class:`~xtuner_plugins.models.inference.ConvertedModel`, or anything with its ``ask``/``reset``, and
    ``ask_batch`` for batches) answers the first question of each of the first ``limit`` samples greedily,
    then ``samples`` times more at ``temperature`` (torch seeded with ``seed``); the answers the scorer marks
    wrong and that are not empty are kept, once each (after the scorer's normalisation): the greedy one first,
    then the most often drawn (ties: the first drawn). Samples the model never got wrong are not in the dict.

    Raises:
        ValueError: naming ``FILE:LINE`` for a sample whose id an earlier sample already has.
    """
    from xtuner_plugins.eval import evaluate, score
    from xtuner_plugins.eval.scoring import normalize_answer
    questions = _questions(samples_path, image_folder, limit)
    greedy = {r.id: r.answer for r in evaluate(model, questions, blind=False, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size)}
    drawn: Dict[str, List[str]] = {}
    if samples > 0:
        torch.manual_seed(seed)
        drawn = _sampled(model, questions, samples, temperature, max_new_tokens, batch_size)
    out: Dict[str, List[str]] = {}
    for q in questions:
        counts = Counter(drawn.get(q.id, []))
        # greedy first, then by count (Counter.most_common keeps first-drawn order among ties)
        answers = [greedy[q.id]] + [a for a, _ in counts.most_common()]
        wrong, seen = [], set()
        for a in answers:
            key = normalize_answer(a)
            if a.strip() and key not in seen and score(q, a) < 1.0:
                seen.add(key)
                wrong.append(a)
        if wrong:
            out[q.id] = wrong
    return out, len(questions)


@torch.no_grad()
def preference_accuracy(config: str, options: Mapping[str, object], checkpoint: Optional[str], pairs_path: str,
                        image_folder: str, batch_pairs: int = 16,
                        by_kind: Optional[Dict[str, float]] = None) -> Tuple[float, int]:
    """``(accuracy, number of pairs)`` of the preference config's model (``options`` as trained; ``checkpoint``
    None: before preference training) on the pairs of ``pairs_path``; ``by_kind``, a dict, gets the accuracy of
    each kind of question (the pairs' ``kind``)."""
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
    with open(pairs_path, encoding='utf-8') as f:   # the data set keeps the file's order (repeat_times 1)
        kinds = [json.loads(line).get('kind', '') for line in f]
    if len(kinds) != len(dataset):   # a pair the data set dropped would shift every kind after it
        raise ValueError(f'{pairs_path}: {len(kinds)} pairs in the file, {len(dataset)} in the data set')
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
    preferred: Dict[str, float] = {}
    for kind, idx in groups.items():   # batches of one kind: each kind's accuracy
        preferred[kind] = 0.0
        for start in range(0, len(idx), batch_pairs):
            items = [dataset[i] for i in idx[start:start + batch_pairs]]
            out = model(collate_fn(items, **collate)['data'], mode='loss')
            preferred[kind] += out['rewards_accuracy'].item() * len(items)
    if by_kind is not None:
        by_kind.update({k: preferred[k] / len(groups[k]) for k in groups})
    n = len(dataset)
    return sum(preferred.values()) / max(n, 1), n
