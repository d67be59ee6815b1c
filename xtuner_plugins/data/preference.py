"""Preference pairs: InternVL's MMPR jsonl and the conversation form, as pairs of training samples.

A line is either MMPR's ``{"image": ..., "question": ..., "chosen": ..., "rejected": ...}`` (``image`` a path, a
list, or absent) or the conversation form: earlier ``conversations`` turns as context, ending with the
``human`` turn to answer, plus ``chosen`` and ``rejected`` answers. Both answers share the prompt: the same
tokens and the same image tiles (when one answer makes the pair too long, both get fewer tiles; nothing is cut
inside an image, and truncation after the last image cuts both alike). Several files, meta files and
``repeat_time`` work as for SFT (:class:`~xtuner_plugins.data.dataset.InternVLDataset`, which this extends).

Bad pairs are named ``FILE:LINE`` and counted like any bad sample: a missing or empty ``chosen``/``rejected``
(``bad_pair``), identical answers (``bad_pair``), and everything the SFT data set refuses.

An item holds ``chosen`` and ``rejected`` (each ``input_ids`` and ``labels``), the shared ``pixel_values`` and
``image_flags``. :func:`preference_collate_fn` makes one batch of twice the rows, the chosen answers first,
padded alike, each row with its copy of the tiles (the model runs them in one forward pass).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .collate import internvl_collate_fn
from .dataset import InternVLDataset
from .errors import SampleError
from .sources import Record, parse_record
from .template import IGNORE_INDEX

__all__ = ['InternVLPreferenceDataset', 'preference_collate_fn']


class InternVLPreferenceDataset(InternVLDataset):
    """Preference pairs (see the module docstring); the same arguments as ``InternVLDataset``."""

    def parse(self, record: Record) -> dict:
        """The sample with ``conversations`` = prompt + chosen answer and ``rejected_conversations`` = prompt +
        rejected answer (lengths, checks and the image paths use the first)."""
        sample = dict(parse_record(record))
        answers = {k: sample.get(k) for k in ('chosen', 'rejected')}
        missing = [k for k, v in answers.items() if not isinstance(v, str) or not v.strip()]
        if missing:
            raise SampleError('bad_pair', f'no {" and no ".join(missing)} answer (a pair needs both, as text)')
        if answers['chosen'].strip() == answers['rejected'].strip():
            raise SampleError('bad_pair', 'chosen and rejected are the same answer')
        prompt = list(sample.get('conversations') or [])
        if 'question' in sample:
            prompt.append({'from': 'human', 'value': sample['question']})
        if not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get('from') != 'human':
            raise SampleError('bad_pair', 'the prompt must end with a human turn (a "question", or "conversations" '
                                          'ending with "human")')
        sample['conversations'] = prompt + [{'from': 'gpt', 'value': answers['chosen']}]
        sample['rejected_conversations'] = prompt + [{'from': 'gpt', 'value': answers['rejected']}]
        return sample

    def conversations_of(self, sample: dict) -> List[Any]:
        return [sample['conversations'], sample['rejected_conversations']]

    def load_sample(self, record: Record) -> Dict[str, object]:
        if self.tokenizer is None:
            raise ValueError('InternVLPreferenceDataset needs a tokenizer to load samples for training')
        (chosen, rejected), tiles, max_num = self._fit(record, self.check_record(record))
        pixel_values, image_flags = self.pixels(tiles)
        item = dict(chosen=self._ids(chosen), rejected=self._ids(rejected), pixel_values=pixel_values,
                    image_flags=image_flags, samples=[self.where(record)])
        if self.where(record) in self.reduced:
            item['reduced'] = [(self.where(record), max_num)]
        return item

    @staticmethod
    def _ids(encoded) -> Dict[str, torch.Tensor]:
        """Ids and labels with only the final answer supervised (the last run of supervised labels): the
        context's answers are the same in both and are not what is compared."""
        labels = torch.tensor(encoded['labels'], dtype=torch.long)
        supervised = set(labels.ne(IGNORE_INDEX).nonzero().flatten().tolist())
        start = max(supervised) if supervised else 0
        while start - 1 in supervised:
            start -= 1
        labels[:start] = IGNORE_INDEX
        return dict(input_ids=torch.tensor(encoded['input_ids'], dtype=torch.long), labels=labels)


def preference_collate_fn(instances: Sequence[Dict], pad_token_id: int = 0, pad_to_multiple_of=None) -> Dict:
    """One batch of ``2 B`` rows: the ``B`` chosen answers, then the ``B`` rejected ones (``data['num_pairs']``
    is ``B``); rows padded alike; each row with its copy of the pair's tiles."""
    rows = []
    for side in ('chosen', 'rejected'):
        for x in instances:
            rows.append(dict(x[side], pixel_values=x['pixel_values'], image_flags=x['image_flags'],
                             samples=x.get('samples', ()), skipped=x.get('skipped', ()) if side == 'chosen' else (),
                             reduced=x.get('reduced', ()) if side == 'chosen' else ()))
    batch = internvl_collate_fn(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch['data']['num_pairs'] = len(instances)
    return batch
