"""Evaluation questions: open questions from a training-format jsonl, or multiple choice in MMBench's TSV.

Every question becomes a :class:`Question`: an id, a category, the prompt, its images (paths or PIL images),
the references, and for multiple choice the options and the right letter. Bad input stops with the file and
the line (or row) named.

* **jsonl** (the training format): the last turn must be ``gpt``: it is the reference; the last ``human``
  turn is the question (its ``<image>`` tags, or ``<image>\\n`` in front for the sample's images). The
  category is the sample's ``category`` or ``kind`` (the demo's), else ``all``.
* **MMBench TSV** (``index, question, hint, A, B, C, D[, E...], answer, category, image``; ``image`` base64,
  or the ``index`` of an earlier row with the same image, as MMBench's files do): the prompt is VLMEvalKit's
  (hint, question, ``Options:`` one per line, then the instruction to answer with the letter).
  ``circular=True`` also asks every rotation of the options (MMBench's CircularEval): a question counts as
  right only when all its rotations are right.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from PIL import Image

__all__ = ['Question', 'read_questions', 'read_open_questions', 'open_samples', 'read_mmbench_tsv', 'MC_INSTRUCTION']

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_MMBENCH_COLUMNS = ('index', 'question', 'A', 'B', 'answer')
_LETTERS = 'ABCDEFGHI'


@dataclass
class Question:
    id: str
    category: str
    prompt: str
    images: List[Union[str, Image.Image]]
    references: List[str]
    options: Dict[str, str] = field(default_factory=dict)  # multiple choice: letter -> text
    group: str = ''  # circular evaluation: the rotations of one question share it

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def read_questions(path: str, image_folder: Optional[str] = None, circular: bool = False) -> List[Question]:
    """By extension: ``.tsv`` is MMBench's layout, anything else a training-format jsonl."""
    if path.endswith('.tsv'):
        return read_mmbench_tsv(path, circular=circular)
    return read_open_questions(path, image_folder)


def open_samples(path: str) -> Iterator[Tuple[str, int, dict, List[dict]]]:
    """The samples of a training-format jsonl that ask a question: ``(where, line_no, sample, turns)`` for
    each non-blank line, ``where`` being ``FILE:LINE``.

    Raises:
        ValueError: naming ``FILE:LINE`` for a line that is not JSON, has no list of turns, does not end with
        a ``gpt`` turn (the reference answer) or has no ``human`` turn.
    """
    with open(path, encoding='utf-8-sig') as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f'{path}:{line_no}'
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f'{where}: not JSON: {err}') from None
            turns = sample.get('conversations') if isinstance(sample, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
                raise ValueError(f'{where}: no "conversations" list of turns')
            if turns[-1].get('from') != 'gpt':
                raise ValueError(f'{where}: the last turn is {turns[-1].get("from")!r}, not "gpt" (the reference '
                                 f'answer)')
            if not any(t.get('from') == 'human' for t in turns):
                raise ValueError(f'{where}: no "human" turn to ask')
            yield where, line_no, sample, turns


def read_open_questions(path: str, image_folder: Optional[str] = None) -> List[Question]:
    folder = image_folder if image_folder is not None else os.path.dirname(path)
    out = []
    for where, line_no, sample, turns in open_samples(path):
        images = sample.get('image') or []
        images = [images] if isinstance(images, str) else list(images)
        paths = [os.path.join(folder, p) for p in images]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f'{where}: image not found: {missing[0]} (set --image-folder)')
        human = [t for t in turns if t.get('from') == 'human'][-1]
        prompt = str(human.get('value', ''))  # without <image> tags, the images go in front of it
        out.append(Question(id=str(sample.get('id', line_no)),
                            category=str(sample.get('category', sample.get('kind', 'all'))),
                            prompt=prompt, images=paths, references=[str(turns[-1].get('value', ''))]))
    if not out:
        raise ValueError(f'{path}: no questions')
    return out


def _decode_image(data: str, where: str) -> Image.Image:
    from xtuner_plugins.data.image_io import load_image
    try:  # the package's one image loader (and pixel rule), on the file's bytes
        return load_image(base64.b64decode(data, validate=False), name='the image')
    except Exception as err:  # noqa: BLE001 (any decoding failure is the row's)
        raise ValueError(f'{where}: the image does not decode ({type(err).__name__}: {err})') from None


def read_mmbench_tsv(path: str, circular: bool = False) -> List[Question]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with open(path, encoding='utf-8-sig', newline='') as f:
        rows = list(csv.DictReader(f, delimiter='\t'))
        columns = rows[0].keys() if rows else []
    missing = [c for c in _MMBENCH_COLUMNS + ('image',) if c not in columns]
    if missing:
        raise ValueError(f'{path}: missing column(s) {", ".join(missing)} (MMBench\'s layout: index, question, hint, '
                         f'A, B, C, D, answer, category, image)')
    images: Dict[str, str] = {}
    out = []
    for row_no, row in enumerate(rows, 2):  # line 1 is the header
        where = f'{path}:{row_no} (index {row["index"]})'
        data = (row.get('image') or '').strip()
        if len(data) < 64 and data in images:  # a reference to an earlier row's image
            data = images[data]
        images[row['index']] = data
        image = _decode_image(data, where)
        options = {k: row[k].strip() for k in _LETTERS if row.get(k) not in (None, '') and row[k].strip().lower()
                   != 'nan'}
        answer = (row.get('answer') or '').strip()
        if answer not in options:
            raise ValueError(f'{where}: answer {answer!r} is not one of its options {sorted(options)}')
        rotations = len(options) if circular else 1
        for shift in range(rotations):
            texts = list(options.values())
            letters = list(options)
            rotated = {letters[i]: texts[(i + shift) % len(texts)] for i in range(len(texts))}
            right = letters[(letters.index(answer) - shift) % len(letters)]
            hint = (row.get('hint') or '').strip()
            prompt = ((hint + '\n') if hint and hint.lower() != 'nan' else '') + row['question'].strip()
            prompt += '\nOptions:\n' + ''.join(f'{k}. {v}\n' for k, v in rotated.items()) + MC_INSTRUCTION
            out.append(Question(id=f'{row["index"]}' + (f'-{shift}' if circular else ''),
                                category=(row.get('category') or 'all').strip() or 'all', prompt=prompt,
                                images=[image], references=[right], options=rotated, group=str(row['index'])))
    if not out:
        raise ValueError(f'{path}: no questions')
    return out
