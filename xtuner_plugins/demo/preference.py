"""The demo's preference stage (``--set preference=dpo`` or ``mpo``): pairs from its own data, and the held-out
preference accuracy.

* :func:`make_pairs`: one MMPR-style pair per sample of the demo's data (its first question): ``chosen`` the
  right answer, ``rejected`` a plausible wrong one (another answer of the same question kind, e.g. another
  colour). Pairs for training come from ``sft.jsonl``, the held-out pairs from ``test.jsonl``.
* :func:`preference_accuracy`: over held-out pairs, the fraction where the policy's implicit reward
  ``beta * (log p(answer) - log p_ref(answer))`` is higher for the chosen answer than for the rejected one (a
  tie counts half, so a policy that is still its reference scores 0.5, chance), computed with the training
  model and the same forward as the loss (:meth:`~xtuner_plugins.models.internvl.InternVLModel.forward`).
"""

from __future__ import annotations

import json
import random
from typing import Mapping, Optional, Tuple

import torch

from .data import ANSWERS

__all__ = ['make_pairs', 'preference_accuracy']


def make_pairs(samples_path: str, out_path: str, seed: int = 0) -> int:
    """Write a pair for every sample of ``samples_path`` to ``out_path``; returns how many."""
    rng = random.Random(seed)
    n = 0
    with open(samples_path, encoding='utf-8') as src, open(out_path, 'w', encoding='utf-8') as out:
        for line in src:
            sample = json.loads(line)
            question, answer = (turn['value'] for turn in sample['conversations'][:2])
            wrong = [a for a in ANSWERS[sample['kind']] if a != answer]
            out.write(json.dumps({'id': sample['id'], 'image': sample['image'], 'question': question,
                                  'chosen': answer, 'rejected': rng.choice(wrong), 'kind': sample['kind']}) + '\n')
            n += 1
    return n


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
    model = build_for_export(cfg, checkpoint, torch.float32, log=lambda message: None)
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
