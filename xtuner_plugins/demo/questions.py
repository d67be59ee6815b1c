"""The demo's questions: their phrasings, the caption and questions a scene answers, and reading them back.

* :data:`QUESTIONS`: a few phrasings of each question kind; :data:`CAPTION_QUESTIONS` the warm-up's prompts;
* :func:`caption`, :func:`question_text`, :func:`extra_answers`: the text about one scene
  (:class:`~xtuner_plugins.demo.scenes.Canvas`);
* :func:`read_questions` and :func:`chance_accuracy`: a written file's questions and its blind baseline.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

from .scenes import Canvas, SceneObject

#: The phrasings of each kind; ``{shape}`` and ``{colour}`` name the scene's (first) shape, never the answer.
QUESTIONS: Dict[str, Tuple[str, ...]] = {
    'colour': ('What colour is the {shape}?', 'What is the colour of the {shape}?',
               'Which colour does the {shape} have?'),
    'shape': ('What shape is in the image?', 'Which shape is shown?', 'What is the {colour} shape?'),
    'count': ('How many shapes are there?', 'How many shapes are in the image?', 'Count the shapes.'),
    'position': ('Is the {shape} on the left or the right?', 'On which side is the {colour} {shape}?',
                 'Where is the {shape}, left or right?'),
    'digit': ('Which digit is shown?', 'What digit is in the image?', 'What number do you see?'),
    'small_digit': ('What is the small digit?', 'Which small digit is in the image?', 'Read the tiny digit.'),
}
CAPTION_QUESTIONS: Tuple[str, ...] = ('Describe the image.', 'What is in the image?', 'Describe the picture briefly.')


def _side(o: SceneObject, width: int) -> str:
    if o.box[2] <= width / 2:
        return 'on the left'
    if o.box[0] >= width / 2:
        return 'on the right'
    return 'in the middle'


def caption(canvas: Canvas) -> str:
    shapes = [o for o in canvas.objects if o.shape is not None]
    parts = [f'a {o.colour} {o.shape} {_side(o, canvas.width)}' for o in shapes]
    parts += [f'a small digit {o.digit}' if o.small else f'the digit {o.digit}'
              for o in canvas.objects if o.digit is not None]
    text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
    if len(shapes) > 1:
        text = f'{len(shapes)} shapes: {text}'
    return text[0].upper() + text[1:] + '.'


def question_text(rng: random.Random, kind: str, canvas: Canvas) -> str:
    shape = next((o for o in canvas.objects if o.shape is not None), None)
    template = rng.choice(QUESTIONS[kind])
    return template.format(shape=shape.shape if shape else '', colour=shape.colour if shape else '')


def extra_answers(kind: str, canvas: Canvas) -> List[Tuple[str, str]]:
    """``(kind, answer)`` of the other questions the scene's one shape answers: shape, colour, side."""
    if kind not in ('colour', 'shape', 'position', 'small_digit'):
        return []
    shape = next(o for o in canvas.objects if o.shape is not None)
    out = [('shape', shape.shape), ('colour', shape.colour)]
    side = _side(shape, canvas.width)
    if side != 'in the middle':
        out.append(('position', side.split()[-1]))
    return [(k, a) for k, a in out if k != kind]


def read_questions(path: str) -> List[Dict[str, str]]:
    """The questions of a demo file: ``[{'id', 'image', 'kind', 'question', 'answer'}, ...]``.

    ``question`` is the human turn without its ``<image>\\n`` tag; ``answer`` is the gpt turn.

    Raises:
        ValueError: naming ``FILE:LINE`` for a line that is not a single-turn demo sample with a ``kind`` (the
        evaluation's reader, :func:`~xtuner_plugins.eval.data.open_samples`, reads and checks the lines).
    """
    from xtuner_plugins.eval.data import open_samples
    out = []
    for where, _, sample, turns in open_samples(path):
        if [t.get('from') for t in turns] != ['human', 'gpt']:
            raise ValueError(f'{where}: expected one human turn and one gpt turn')
        if not isinstance(sample.get('kind'), str):
            raise ValueError(f'{where}: no question "kind"')
        question = str(turns[0].get('value', ''))
        if question.startswith('<image>\n'):
            question = question[len('<image>\n'):]
        out.append({'id': str(sample.get('id', '')), 'image': sample.get('image'), 'kind': sample['kind'],
                    'question': question, 'answer': str(turns[1].get('value', ''))})
    return out


def chance_accuracy(test_path: str) -> float:
    """Expected accuracy of a blind model: every question answered with the most common answer of its kind.

    ``sum over kinds of (count of that kind's most common answer) / number of questions``; 0.0 for a file
    without questions.

    Raises:
        ValueError: as :func:`read_questions`.
    """
    questions = read_questions(test_path)
    if not questions:
        return 0.0
    per_kind: Dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        per_kind[q['kind']][q['answer']] += 1
    return sum(c.most_common(1)[0][1] for c in per_kind.values()) / len(questions)
