"""Evaluation questions: open questions from a training-format jsonl (:func:`read_open_questions`), and any
questions file by its extension (:func:`read_questions`; ``.tsv``: MMBench's, ``mmbench.py``).

What a question is, its errors (every problem of a file listed at once, with its ``FILE:LINE`` and reason) and
the checks both readers share: ``questions.py``.

A **jsonl** or a **json** list (the training format, read by training's reader): the last turn must be ``gpt``:
it is the reference; the last ``human`` turn is the question (its ``<image>`` tags, or ``<image>\\n`` in front for
the sample's images), asked alone with the model's own system message (a sample's system turn and earlier turns
are not asked: :func:`context_note` says which). The turns are checked by training's own check
(``parse_conversation``, as ``tools/check_dataset.py`` checks them): a value that is not text (a ``null`` or list
reference, a number for a question) or is empty, roles out of turn, ``<image>`` tags that do not match the images,
InternVL's image tokens or a template's turn markers in any turn (``control_text``) are refused. The
category is the sample's ``category`` or ``kind`` (the demo's), else ``all``; the id its ``id``, else its
line number. Image paths are resolved as training resolves them: inside ``image_folder`` when given, else
relative to the file's folder. A sample with a ``video`` (and ``clip``) is a video question: its video is
checked from its headers here (``missing_video``, ``corrupt_video``, ``bad_clip``, ... as training names them)
and its frames are read when it is asked.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

from xtuner_plugins.data.conversation import parse_conversation
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import read_image_size, resolve_image_path
from xtuner_plugins.data.entries import parse_record, read_records, sample_images
from xtuner_plugins.data.sources import DataSource
from xtuner_plugins.data.video import probe_video, video_field, video_turns

from .mmbench import read_mmbench_tsv
from .questions import Question, QuestionsError, _Ids, _with, data_problem

__all__ = ['read_questions', 'read_open_questions', 'open_samples', 'context_note']


def read_questions(path: str, image_folder: Optional[str] = None, circular: bool = False,
                   markers: Sequence[str] = ()) -> List[Question]:
    """By extension: ``.tsv`` is MMBench's layout, anything else a training-format jsonl. ``markers``: control text
    besides :data:`CONTROL_MARKERS` (the model's tokenizer's special tokens, :func:`folder_markers`). Each reader
    refuses what :func:`data_problem` names before it reads."""
    if path.endswith('.tsv'):
        return read_mmbench_tsv(path, circular=circular, markers=markers)
    return read_open_questions(path, image_folder, markers=markers)

def open_samples(path: str, problems: Optional[List[str]] = None) -> Iterator[Tuple[str, int, dict, List[dict]]]:
    """The samples of a training-format file (``.jsonl``, or a ``.json`` list, read by training's reader) that ask a
    question: ``(where, line_no, sample, turns)`` each, ``where`` being ``FILE:LINE``. A line that is not a sample,
    has no list of turns, does not end with a ``gpt`` turn (the reference answer) or has no ``human`` turn is a
    problem naming ``FILE:LINE``: appended to ``problems`` (and the line left out) when a list is given, else
    raised as a ``ValueError``."""
    def refuse(message: str) -> None:
        if problems is None:
            raise ValueError(message)
        problems.append(message)

    records, bad = read_records(0, DataSource(name=path, annotation=path, image_folder=None))
    for err in bad:
        refuse(str(err))
    for record in records:
        where = f'{path}:{record.line}'
        sample = parse_record(record)
        turns = sample.get('conversations')
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            refuse(f'{where}: no "conversations" list of turns')
        elif turns[-1].get('from') != 'gpt':
            refuse(f'{where}: the last turn is {turns[-1].get("from")!r}, not "gpt" (the reference answer; turns are '
                   f'{{"from": "human" | "gpt", "value": ...}})')
        elif not any(t.get('from') == 'human' for t in turns):
            refuse(f'{where}: no "human" turn to ask')
        else:
            yield where, record.line, sample, turns

def _image_paths(sample: dict, prompt: str, folder: Optional[str], base_dir: str) -> List[str]:
    """The sample's images resolved and their headers read, as training does; raises :class:`SampleError`."""
    paths = [resolve_image_path(p, folder, base_dir) for p in sample_images(sample)]
    tags = prompt.count('<image>')
    if tags not in (0, len(paths)):
        raise SampleError('image_tag_mismatch', f'the question (the sample\'s last human turn, asked alone) has '
                                                f'{tags} <image> tags for the sample\'s {len(paths)} images; give it '
                                                f'one for every image, or none (the images then go in front of it)')
    for path in paths:
        read_image_size(path)  # exists, and its header decodes
    return paths

def read_open_questions(path: str, image_folder: Optional[str] = None, markers: Sequence[str] = ()) -> List[Question]:
    """The questions of a training-format jsonl; raises :class:`QuestionsError` listing every bad line (a
    ``ValueError`` for a file that is none: :func:`data_problem`)."""
    problem = data_problem(path)
    if problem:
        raise ValueError(problem)
    out, problems, ids = [], [], _Ids(path, 'id')
    markers = _with(markers)   # once, not per sample
    for where, line_no, sample, turns in open_samples(path, problems):
        human = [t for t in turns if t.get('from') == 'human'][-1]
        prompt = str(human.get('value', ''))  # without <image> tags, the images go in front of it
        id_ = str(sample.get('id', line_no))
        ids.check(id_, line_no, problems)
        try:
            video = video_field(sample)
            if video is not None and sample_images(sample):
                raise SampleError('image_and_video', 'the question has images and a video; one or the other')
            # training's checks of the turns (check_dataset's too): roles, str values (a null or list reference,
            # an int question, were scored as 'None' / "['x']"), empty turns, tags, control text
            parse_conversation(video_turns(turns, video is not None), 0 if video else len(sample_images(sample)),
                               markers=markers)
            if video is not None:
                video = (resolve_image_path(video[0], image_folder, os.path.dirname(path)), video[1])
                probe_video(*video)  # exists, and its headers read
                paths = []
            else:
                paths = _image_paths(sample, prompt, image_folder, os.path.dirname(path))
        except SampleError as err:
            problems.append(str(err.with_source(where)))
            continue
        earlier = len(turns) - 2 - (turns[0].get('from') == 'system')
        context = ', '.join(x for x in ('a system turn' if turns[0].get('from') == 'system' else '',
                                        f'{earlier} earlier turns' if earlier > 0 else '') if x)
        out.append(Question(id=id_, category=str(sample.get('category', sample.get('kind', 'all'))),
                            prompt=prompt, images=paths, references=[str(turns[-1].get('value', ''))], source=where,
                            video=video[0] if video else None, clip=video[1] if video else None, context=context))
    if problems:
        raise QuestionsError(path, problems)
    if not out:
        raise ValueError(f'{path}: no questions')
    return out

def context_note(questions: Sequence[Question]) -> Optional[str]:
    """One line on the questions asked without part of their sample (a system turn, earlier turns), or None:
    each question is its sample's last human turn, asked alone with the model's own system message."""
    partial = [q for q in questions if q.context]
    if not partial:
        return None
    shown = '; '.join(f'{q.source} ({q.context})' for q in partial[:3])
    more = f'; and {len(partial) - 3} more' if len(partial) > 3 else ''
    return (f'note: {len(partial)} of {len(questions)} questions come from samples with a system turn or earlier '
            f'turns; each is asked as its last human turn alone, with the model\'s own system message: {shown}{more}')
