"""Batching InternVL samples.

Configs use it as ``collate_fn=dict(type=internvl_collate_fn, pad_token_id=...)`` (MMEngine wraps it in
``functools.partial``). The batch follows XTuner's convention ``{'data': {...}, 'data_samples': None}``:

===================  ==========================  ==============================================
key                  shape / dtype               meaning
===================  ==========================  ==============================================
``input_ids``        ``[B, L]`` long             right-padded with ``pad_token_id``
``labels``           ``[B, L]`` long             ``-100`` on padding and unsupervised tokens
``attention_mask``   ``[B, L]`` bool             ``True`` on real tokens
``pixel_values``     ``[T, 3, S, S]`` uint8      all tiles of the batch, sample after sample
``image_flags``      ``[T]`` long                1 for real tiles, 0 for text-only dummies
``num_tiles``        ``[B]`` long                tiles per item (``sum == T``)
``position_ids``     ``[B, L]`` long             packed items only: restart at 0 per sample
``seq_lens``         list of ``[k_b]`` long      packed items only: tokens of each sample of row b
``samples``          list of str                 ``FILE:LINE`` of every sample (for error messages)
``skipped``          list of (str, str)          ``(FILE:LINE, reason)`` of bad samples skipped for the batch
``reduced``          list of (str, int)          ``(FILE:LINE, tiles per image)`` of samples cut to fit
``truncated``        list of (str, int, str)     ``(FILE:LINE, tokens lost, what)`` of samples whose answer was cut
===================  ==========================  ==============================================
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from xtuner_plugins.errors import Refused

from .template import IGNORE_INDEX


def check_collate_settings(settings: Dict, vocab_size: Optional[int] = None) -> None:
    """:class:`Refused` naming a setting of the collate function (``train_dataloader.collate_fn``'s ``settings``)
    that cannot work: ``pad_to_multiple_of`` not a whole number >= 1 (or None / 0: none), which gave a raw
    RuntimeError (-8) or TypeError (1.5) at the first batch; ``pad_token_id`` not a whole number below the LLM's
    ``vocab_size`` (its embedding rows), an IndexError ('index out of range in self') in the first forward."""
    multiple, pad = settings.get('pad_to_multiple_of'), settings.get('pad_token_id', 0)
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 0):
        raise Refused(f'train_dataloader.collate_fn.pad_to_multiple_of={multiple!r}: the padded length is a multiple '
                      'of a whole number >= 1 (None or 0: no rounding)')
    top = f' below {vocab_size}, the LLM\'s vocabulary (embedding rows)' if vocab_size else ''
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0 or (vocab_size and pad >= vocab_size):
        raise Refused(f'train_dataloader.collate_fn.pad_token_id={pad!r}: padding is a token id, a whole number '
                      f'>= 0{top}; padded positions are masked out, so any id of the vocabulary will do (0, the '
                      'default, or the tokenizer\'s pad_token_id)')


def internvl_collate_fn(instances: Sequence[Dict], pad_token_id: int = 0,
                        pad_to_multiple_of: Optional[int] = None) -> Dict:
    """Pad token sequences and concatenate tiles; see the module docstring for the keys."""
    if not instances:
        raise ValueError('internvl_collate_fn got an empty batch')
    lengths = [int(x['input_ids'].shape[0]) for x in instances]
    for i, x in enumerate(instances):
        if x['labels'].shape != x['input_ids'].shape:
            raise ValueError(f'sample {i} of the batch has {x["input_ids"].shape[0]} input ids but '
                             f'{x["labels"].shape[0]} labels')
        if x['pixel_values'].shape[0] != x['image_flags'].shape[0]:
            raise ValueError(f'sample {i} of the batch has {x["pixel_values"].shape[0]} tiles but '
                             f'{x["image_flags"].shape[0]} image flags')
    max_len = max(lengths)
    if pad_to_multiple_of:
        max_len = -(-max_len // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(instances)
    input_ids = torch.full((batch, max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.bool)
    for i, (x, n) in enumerate(zip(instances, lengths)):
        input_ids[i, :n] = x['input_ids']
        labels[i, :n] = x['labels']
        attention_mask[i, :n] = True
    if all('position_ids' in x for x in instances):  # packed items (see packing.py)
        position_ids = torch.zeros((batch, max_len), dtype=torch.long)
        for i, (x, n) in enumerate(zip(instances, lengths)):
            position_ids[i, :n] = x['position_ids']
        packed = dict(position_ids=position_ids, seq_lens=[x['seq_lens'] for x in instances])
    else:
        packed = {}
    data = dict(
        **packed,
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        pixel_values=torch.cat([x['pixel_values'] for x in instances]),
        image_flags=torch.cat([x['image_flags'] for x in instances]),
        num_tiles=torch.tensor([x['pixel_values'].shape[0] for x in instances], dtype=torch.long),
        samples=[s for x in instances for s in x.get('samples', ())],
        skipped=[s for x in instances for s in x.get('skipped', ())],
        reduced=[r for x in instances for r in x.get('reduced', ())],
        truncated=[t for x in instances for t in x.get('truncated', ())])
    return {'data': data, 'data_samples': None}
