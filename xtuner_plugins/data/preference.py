"""Preference pairs: InternVL's MMPR jsonl and the conversation form, as pairs of training samples.

A line is either MMPR's ``{"image": ..., "question": ..., "chosen": ..., "rejected": ...}`` (``image`` a path, a
list, or absent) or the conversation form: earlier ``conversations`` turns as context, ending with the
``human`` turn to answer, plus ``chosen`` and ``rejected`` answers. Both answers share the prompt: the same
tokens and the same image tiles (when one answer makes the pair too long, both get fewer tiles; nothing is cut
inside an image, and truncation after the last image cuts both alike). Several files, meta files and
``repeat_time`` work as for SFT (:class:`~xtuner_plugins.data.dataset.InternVLDataset`, which this extends).

Bad pairs are named ``FILE:LINE`` and counted like any bad sample: a missing or empty ``chosen``/``rejected``
(``bad_pair``), identical answers (``bad_pair``), and everything the SFT data set refuses.

Truncation (``max_length``, see ``fitting.py``) of a pair: answers that become identical once cut, which is also
what a pair whose differing part is cut away entirely becomes, carry no preference and are dropped as
``bad_pair``. Any other pair whose answer was cut is ``truncated`` like an SFT sample: dropped with
``truncation='drop'``, else kept and counted with both answers' numbers, named *unbalanced* when one answer is
cut and the other is whole (e.g. 369 of 20000 chosen tokens against 4 whole rejected ones). Such a pair is
counted, not dropped: its kept answers still differ (a real, if weaker, preference on what the model sees within
``max_length``, as TRL's DPO truncation keeps it), and dropping every long-answer pair by default would lose most
of some data sets; ``truncation='drop'`` drops them all.

An item holds ``chosen`` and ``rejected`` (each ``input_ids`` and ``labels``), the shared ``pixel_values`` and
``image_flags``. :func:`preference_collate_fn` makes one batch of twice the rows, the chosen answers first,
padded alike, each row with its copy of the tiles (the model runs them in one forward pass).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import torch

from .collate import internvl_collate_fn
from .dataset import InternVLDataset
from .errors import SampleError
from .fitting import Fit, final_answer, keep_or_drop, note_fit
from .conversation import check_turn
from .entries import parse_record, with_system
from .sources import Record
from .template import IGNORE_INDEX

__all__ = ['InternVLPreferenceDataset', 'preference_collate_fn']


class InternVLPreferenceDataset(InternVLDataset):
    """Preference pairs (see the module docstring); the same arguments as ``InternVLDataset``."""

    def parse(self, record: Record) -> dict:
        """The sample with ``conversations`` = prompt + chosen answer and ``rejected_conversations`` = prompt +
        rejected answer (lengths, checks and the image paths use the first)."""
        sample = dict(parse_record(record))
        answers = {k: sample.get(k) for k in ('chosen', 'rejected')}
        shaped = next((k for k, v in answers.items() if isinstance(v, (dict, list))), None)
        if shaped:   # LLaMA-Factory's {"from": "gpt", "value": ...}, a list of turns: said to be missing
            raise SampleError('bad_pair', f'"{shaped}" is a {type(answers[shaped]).__name__} '
                                          f'({json.dumps(answers[shaped], ensure_ascii=False):.60}): a pair\'s chosen '
                                          'and rejected are the answers\' text (InternVL\'s MMPR layout)')
        kinds = {bool: 'true or false', int: 'a number', float: 'a number'}
        typed = next((k for k, v in answers.items() if type(v) in kinds), None)
        if typed:   # (said to be missing: 'no chosen answer' for "chosen": 5)
            raise SampleError('bad_pair', f'"{typed}" is {kinds[type(answers[typed])]} '
                                          f'({json.dumps(answers[typed]):.60}), not text: a pair\'s chosen and '
                                          'rejected are the answers\' text')
        missing = [k for k, v in answers.items() if not isinstance(v, str) or not v.strip()]
        if missing:
            cased = [k for k in sample if isinstance(k, str) and k.lower() in missing and k not in answers]
            raise SampleError('bad_pair', f'no {" and no ".join(missing)} answer (a pair needs both, as text)' +
                              (f'; the keys are lower case, "chosen" and "rejected", not '
                               f'{" and ".join(json.dumps(k) for k in cased)}' if cased else ''))
        if answers['chosen'].strip() == answers['rejected'].strip():
            raise SampleError('bad_pair', 'chosen and rejected are the same answer')
        prompt = list(sample.get('conversations') or [])
        for i, turn in enumerate(prompt):
            check_turn(i, turn)
        prompt = with_system(sample, prompt)   # (a top-level "system": the first turn)
        if 'question' in sample:
            prompt.append({'from': 'human', 'value': sample['question']})
        if not prompt and 'prompt' in sample:   # TRL's key, which is not read
            raise SampleError('bad_pair', 'no "question": "prompt" (TRL\'s key) is not read; a pair\'s prompt is its '
                                          '"question" (InternVL\'s MMPR layout), or "conversations" ending with a '
                                          '"human" turn')
        if not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get('from') != 'human':
            raise SampleError('bad_pair', 'the prompt must end with a human turn (a "question", or "conversations" '
                                          'ending with "human")')
        sample['conversations'] = prompt + [{'from': 'gpt', 'value': answers['chosen']}]
        sample['rejected_conversations'] = prompt + [{'from': 'gpt', 'value': answers['rejected']}]
        return sample

    def conversations_of(self, sample: dict) -> List[Any]:
        return [sample['conversations'], sample['rejected_conversations']]

    def load_sample(self, record: Record) -> Dict[str, object]:
        fit, tiles = self.load_fit(record)
        chosen, rejected = fit.encoded
        pixel_values, image_flags = self.pixels(tiles)
        return dict(chosen=self._ids(chosen), rejected=self._ids(rejected), pixel_values=pixel_values,
                    image_flags=image_flags, samples=[self.where(record)], **note_fit(self, record, fit))

    def judge_cut(self, fit: Fit) -> Optional[str]:
        """A pair's cut (see the module docstring): ``bad_pair`` when the kept answers are the same, else as SFT
        with both answers named."""
        answers = []
        for e in fit.encoded:
            start, end = final_answer(e['labels'])
            answers.append(e['input_ids'][start:end])
        same = answers[0] == answers[1] or fit.encoded[0]['input_ids'] == fit.encoded[1]['input_ids']
        if same and not any(fit.cuts):   # texts that differ only where the tokenizer normalises ('café' as
            # 'cafe' + a combining accent, NFC): a margin of 0 always, no gradient
            raise SampleError('bad_pair', 'chosen and rejected are the same tokens (their texts differ only in what '
                                          'the tokenizer normalises, such as Unicode composition): nothing to prefer')
        if not any(fit.cuts):
            return None
        if same:
            cut = max((c for c in fit.cuts if c), key=lambda c: c.lost)
            raise SampleError('bad_pair', f'chosen and rejected are the same once cut to max_length={self.max_length} '
                                          f'(a {cut.length}-token side lost {cut.lost} tokens): nothing to prefer')
        if not any(c is not None and c.answer_cut for c in fit.cuts):
            return None

        def side(name, cut, answer):
            return (f'{name} keeps {cut.answer_kept} of {cut.answer} answer tokens' if cut and cut.answer_cut else
                    f'{name} whole ({len(answer)} answer tokens)')
        cut = [c is not None and c.answer_cut for c in fit.cuts]
        sides = f'{side("chosen", fit.cuts[0], answers[0])}, {side("rejected", fit.cuts[1], answers[1])}'
        return keep_or_drop(self, f'pair cut to max_length={self.max_length}: {sides}' +
                            ('; unbalanced: a cut answer against a whole one' if cut[0] != cut[1] else ''))

    @staticmethod
    def _ids(encoded) -> Dict[str, torch.Tensor]:
        """Ids and labels with only the final answer supervised (the last run of supervised labels): the
        context's answers are the same in both and are not what is compared."""
        labels = torch.tensor(encoded['labels'], dtype=torch.long)
        labels[:final_answer(encoded['labels'])[0]] = IGNORE_INDEX
        return dict(input_ids=torch.tensor(encoded['input_ids'], dtype=torch.long), labels=labels)


def preference_collate_fn(instances: Sequence[Dict], pad_token_id: int = 0, pad_to_multiple_of=None) -> Dict:
    """One batch of ``2 B`` rows: the ``B`` chosen answers, then the ``B`` rejected ones (``data['num_pairs']``
    is ``B``); rows padded alike; each row with its copy of the pair's tiles."""
    rows = []
    for side in ('chosen', 'rejected'):
        for x in instances:
            rows.append(dict(x[side], pixel_values=x['pixel_values'], image_flags=x['image_flags'],
                             samples=x.get('samples', ()), **{k: x.get(k, ()) if side == 'chosen' else ()
                                                              for k in ('skipped', 'reduced', 'truncated')}))
    batch = internvl_collate_fn(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch['data']['num_pairs'] = len(instances)
    return batch
