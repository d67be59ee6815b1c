"""What an evaluation question is, and what the two readers of questions share.

Every question becomes a :class:`Question`: an id, a category, the prompt, its images (paths or PIL images),
the references, for multiple choice the options and the right letter, and its ``source`` (``FILE:LINE``). Bad
input stops before any question is asked (:class:`QuestionsError`), every problem listed at once with its
``FILE:LINE`` and reason: a line that is not a sample, an id (TSV: ``index``) that an earlier line already has
(``duplicate_id``), and for every image what training refuses (the same functions and reasons,
``xtuner_plugins.data.image_io``): a path leaving the image folder (``unsafe_image_path``), a missing file, a
header that does not decode (``corrupt_image``), as many ``<image>`` tags as images (``image_tag_mismatch``).

Here too: the file checked before it is read (:func:`data_problem`), the control text refused in questions
(:data:`CONTROL_MARKERS`, a model folder's own: :func:`folder_markers`), a repeated id, and a limit that keeps a
circular question's rotations whole (:func:`first_questions`). The readers: ``data.py`` (a training-format jsonl,
and :func:`~xtuner_plugins.eval.data.read_questions` by extension), ``mmbench.py`` (MMBench's TSV).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.template import GROUNDING_TOKENS, RESERVED_IN_TEXT, TEMPLATES, control_markers

__all__ = ['Question', 'QuestionsError', 'CONTROL_MARKERS', 'data_problem', 'first_questions', 'folder_markers']

_SHOWN = 50  # problems listed in full; the rest counted
_LAYOUT = "MMBench's layout: index, question, hint, A, B, C, D, answer, category, image"


@dataclass
class Question:
    id: str
    category: str
    prompt: str
    images: List[Union[str, bytes, Image.Image]]   # files' paths, or bytes (a TSV's), read when asked
    references: List[str]
    options: Dict[str, str] = field(default_factory=dict)  # multiple choice: letter -> text
    group: str = ''  # circular evaluation: the rotations of one question share it
    source: str = ''  # FILE:LINE (a TSV: FILE:LINE (index N))
    video: Optional[str] = None  # a video question: its video (file, GIF or frame folder) and clip
    clip: Optional[Tuple[float, float]] = None
    stem: str = ''  # multiple choice: the question without its options and instruction (``--mc likelihood``)
    context: str = ''  # what of the sample is not asked (its system turn, its earlier turns): see context_note

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)

class QuestionsError(ValueError):
    """Every problem of a questions file (``problems``: ``FILE:LINE: message [reason]`` each), raised before any
    question is asked; one problem reads as itself."""

    def __init__(self, path: str, problems: List[str]):
        self.path, self.problems = path, list(problems)
        if len(problems) == 1:
            message = problems[0]
        else:
            shown = ''.join(f'\n  {p}' for p in problems[:_SHOWN])
            more = f'\n  ... and {len(problems) - _SHOWN} more' if len(problems) > _SHOWN else ''
            message = f'{path}: {len(problems)} problems, no question asked:{shown}{more}'
        if any('[missing_image]' in p for p in problems) and not path.endswith('.tsv'):
            message += '\n(image paths are read inside --image-folder, by default the data file\'s folder)'
        super().__init__(message)

class _Ids:
    """First line of each id: a repeated id is a problem naming both lines."""

    def __init__(self, path: str, what: str):
        self.path, self.what, self.first = path, what, {}

    def check(self, id_: str, line_no: int, problems: List[str]) -> None:
        if id_ in self.first:
            problems.append(str(SampleError('duplicate_id', f'{self.what} {id_!r} is also the {self.what} of line '
                                            f'{self.first[id_]}; give every question its own',
                                            f'{self.path}:{line_no}')))
        else:
            self.first[id_] = line_no

def first_questions(questions: List[Question], n: Optional[int]) -> List[Question]:
    """The questions of the first ``n`` groups (all with ``None``), a circular question's rotations (one ``group``)
    counted as one and kept whole wherever they stand: a limit that cut a group scored its first rotations as the
    whole question, and VLMEvalKit's circular files hold every rotation after all the questions (index N, then
    N + 1,000,000), which a limit left out."""
    if n is None:
        return questions
    kept: set = set()   # the first n groups, wherever their rotations stand
    for q in questions:
        if len(kept) == n:
            break
        kept.add(q.group or id(q))
    return [q for q in questions if (q.group or id(q)) in kept]

def data_problem(path: str) -> Optional[str]:
    """Why ``path`` is no questions file, before it is read: what training's reader refuses in an annotation file
    (a folder, not there, a FIFO or device, compressed, an image or another binary format), a name that is not
    ``.jsonl``, ``.json`` or ``.tsv`` (a ``.txt`` was read as a ``.json`` list), and an InternVL meta file (an
    object naming data sources: 'not valid JSON'). None for a file to read."""
    from xtuner_plugins.data.sources import is_meta_file, annotation_problem
    if os.path.isdir(path):
        return f'{path} is a folder, not a data file: give --data a .jsonl, a .json list of samples or a .tsv'
    problem = annotation_problem(path, 'data file')
    if problem:
        return problem
    if not path.endswith(('.jsonl', '.json', '.tsv')):
        return (f'{path}: unknown data format: give a training-format .jsonl (or a .json list of samples), or a '
                f'.tsv in {_LAYOUT}')
    if is_meta_file(path):
        from xtuner_plugins.data.sources import meta_sources
        from xtuner_plugins.errors import NotFound, Refused
        try:   # an object, but maybe none naming data sources: JSON lines named .json, one sample (training's words)
            meta_sources(path)
        except NotFound:   # a meta file whose annotation files are not there: a meta file still
            pass
        except Refused as exc:   # (a meta file's own entries' problems: a meta file, said below)
            if not str(exc).startswith(f'{path}: entry '):
                return str(exc)
        return (f'{path} is an InternVL meta file (an object naming data sources), not a list of samples: give one '
                f'of its "annotation" files as --data, with its "root" as --image-folder')
    return None

def folder_markers(folder: Optional[str]) -> Tuple[str, ...]:
    """The special tokens a model folder's tokenizer files name (``tokenizer_config.json``'s special
    ``added_tokens_decoder`` entries, and a template's markers added as plain tokens; ``special_tokens_map.json``),
    read without loading anything: a question holding one is refused before the model loads, as the chat tools
    refuse it. Empty when there are none to read."""
    found = set()
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
        try:
            with open(os.path.join(folder or '', name), encoding='utf-8') as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        decoder = data.get('added_tokens_decoder')
        for token in (decoder.values() if isinstance(decoder, dict) else ()):
            if isinstance(token, dict) and isinstance(token.get('content'), str) and (
                    token.get('special') or token['content'] in CONTROL_MARKERS):   # a template's, added plainly
                found.add(token['content'])
        if name == 'special_tokens_map.json':
            for value in data.values():
                for token in value if isinstance(value, list) else [value]:
                    token = token.get('content') if isinstance(token, dict) else token
                    if isinstance(token, str):
                        found.add(token)
    return tuple(sorted(found - set(GROUNDING_TOKENS) - {'', '<image>', '<video>'}))

def _with(markers: Sequence[str]) -> Tuple[str, ...]:
    """The control text refused in questions: InternVL's image tokens and the model's tokens (``markers``, from its
    folder: :func:`folder_markers`), where a template's marker that is no token of the model is plain text to it
    (Llama 3's ``<|eot_id|>`` to a Phi-3 model), as training reads it; without them, every template's markers."""
    base = set(RESERVED_IN_TEXT) if markers else set(CONTROL_MARKERS)
    return tuple(sorted(base | set(markers), key=lambda m: (-len(m), m)))

# Text only the pipeline writes: InternVL's image tokens and every template's turn markers (a question holding
# <IMG_CONTEXT> once failed after other questions were asked; training refuses it as control_text)
CONTROL_MARKERS = tuple(sorted(set().union(*(control_markers(None, t) for t in TEMPLATES)), key=lambda m: (-len(m), m)))
