"""Evaluation questions: open questions from a training-format jsonl, or multiple choice in MMBench's TSV.

Every question becomes a :class:`Question`: an id, a category, the prompt, its images (paths or PIL images),
the references, for multiple choice the options and the right letter, and its ``source`` (``FILE:LINE``). Bad
input stops before any question is asked (:class:`QuestionsError`), every problem listed at once with its
``FILE:LINE`` and reason: a line that is not a sample, an id (TSV: ``index``) that an earlier line already has
(``duplicate_id``), and for every image what training refuses (the same functions and reasons,
``xtuner_plugins.data.image_io``): a path leaving the image folder (``unsafe_image_path``), a missing file, a
header that does not decode (``corrupt_image``), as many ``<image>`` tags as images (``image_tag_mismatch``).

* **jsonl** or a **json** list (the training format, read by training's reader): the last turn must be ``gpt``:
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
* **MMBench TSV** (``index, question, hint, A, B, C, D[, E...], answer, category, image``; ``image`` base64,
  or the ``index`` of an earlier row with the same image, as MMBench's files do; UTF-8, every row as many fields
  as the header, ``bad_row`` otherwise; an empty ``image`` is ``missing_image``): the prompt is VLMEvalKit's
  (hint, question, ``Options:`` one per line, then the instruction to answer with the letter).
  The question without its options (``stem``: hint and question) is what ``--mc likelihood`` asks.
  ``circular=True`` also asks every rotation of the options (MMBench's CircularEval): a question counts as
  right only when all its rotations are right.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import string
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image

from xtuner_plugins.data.conversation import parse_conversation, refuse_control_text
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import load_image, read_image_size, resolve_image_path
from xtuner_plugins.data.entries import parse_record, read_records, sample_images
from xtuner_plugins.data.sources import DataSource
from xtuner_plugins.data.template import GROUNDING_TOKENS, RESERVED_IN_TEXT, TEMPLATES, control_markers
from xtuner_plugins.data.video import probe_video, video_field, video_turns

__all__ = ['Question', 'QuestionsError', 'read_questions', 'read_open_questions', 'open_samples', 'read_mmbench_tsv',
           'MC_INSTRUCTION', 'CONTROL_MARKERS', 'context_note', 'folder_markers', 'rotations_note']

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_MMBENCH_COLUMNS = ('index', 'question', 'A', 'B', 'answer')
_LETTERS = string.ascii_uppercase   # every letter column, as VLMEvalKit reads options (I was the last)
#: VLMEvalKit's circular MMBench files hold each question's rotations as rows of index N + k * 1,000,000
ROTATION_STRIDE = 1_000_000
_SHOWN = 50  # problems listed in full; the rest counted


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
    """The first ``n`` questions (all with ``None``), a circular question's rotations (one ``group``) counted as one
    and kept whole: a limit that cut a group scored its first rotations as the whole question."""
    if n is None:
        return questions
    out: List[Question] = []
    seen: set = set()
    for q in questions:
        key = q.group or id(q)
        if key not in seen:
            if len(seen) == n:
                break
            seen.add(key)
        out.append(q)
    return out


def read_questions(path: str, image_folder: Optional[str] = None, circular: bool = False,
                   markers: Sequence[str] = ()) -> List[Question]:
    """By extension: ``.tsv`` is MMBench's layout, anything else a training-format jsonl. ``markers``: control text
    besides :data:`CONTROL_MARKERS` (the model's tokenizer's special tokens, :func:`folder_markers`). Each reader
    refuses what :func:`data_problem` names before it reads."""
    if path.endswith('.tsv'):
        return read_mmbench_tsv(path, circular=circular, markers=markers)
    return read_open_questions(path, image_folder, markers=markers)


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


# Text only the pipeline writes: InternVL's image tokens and every template's turn markers (a question holding
# <IMG_CONTEXT> once failed after other questions were asked; training refuses it as control_text)
CONTROL_MARKERS = tuple(sorted(set().union(*(control_markers(None, t) for t in TEMPLATES)), key=lambda m: (-len(m), m)))


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


def _decode_image(data: str) -> bytes:
    """A row's base64 image: its file's bytes, checked to decode whole by the package's one image loader (and pixel
    rule), then kept as bytes (decoded when asked: a 3 MB TSV of 8000 x 8000 images held 3.4 GB decoded for the
    whole run, past any --limit); a :class:`SampleError` that names what did not decode (a short value that could be
    an index: that no earlier row has it)."""
    try:
        raw = base64.b64decode(data, validate=False)
        load_image(raw, name='its base64')
        return raw
    except Exception as err:  # noqa: BLE001 (any decoding failure is the row's)
        reason = err.reason if isinstance(err, SampleError) else 'corrupt_image'
        if isinstance(err, SampleError):   # (the loader names the bytes by their size)
            detail = err.message
        else:
            detail = f'not base64: {err}' if isinstance(err, binascii.Error) else f'{type(err).__name__}: {err}'
        index = f', and {data!r} is not the index of an earlier row either' if len(data) < 64 else ''
        raise SampleError(reason, f'the image does not decode ({detail}){index}') from None


def _tsv_rows(path: str) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """The header and ``(line, fields)`` of each row of a UTF-8 TSV (a row's line: where it starts; a quoted
    field may hold newlines); a ``ValueError`` naming the file, and the line and byte of a non-UTF-8 one. A path
    that is no regular file (a FIFO waited for a writer for ever, ``/dev/zero`` was read until memory ran out) is
    refused as the annotation reader refuses it."""
    problem = data_problem(path)
    if problem:
        raise ValueError(problem)
    with open(path, 'rb') as f:
        data = f.read()
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as err:
        line = data.count(b'\n', 0, err.start) + 1
        raise ValueError(f'{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at byte offset {err.start}); '
                         f'MMBench TSVs are UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)') from None
    reader = csv.reader(io.StringIO(text, newline=''), delimiter='\t')
    header, rows, line = None, [], 1
    for fields in reader:
        if header is None:
            header = fields
        elif fields:  # a blank line is no row
            rows.append((line, fields))
        line = reader.line_num + 1
    if not header:
        raise ValueError(f'{path}: empty (no header line); {_LAYOUT}')
    return header, rows


_LAYOUT = "MMBench's layout: index, question, hint, A, B, C, D, answer, category, image"


def _row_index(fields: List[str], header: List[str]) -> int:
    """A row's index as a whole number; -1 for one that is not."""
    try:
        return int(fields[header.index('index')].strip())
    except (ValueError, IndexError):
        return -1


def rotations_note(questions: Sequence[Question]) -> str:
    """A line when the data holds its own rotations (VLMEvalKit's circular MMBench files), or ''."""
    groups = {q.group for q in questions if q.group and q.id != q.group and not q.id.startswith(q.group + '-')}
    if not groups:
        return ''
    return (f'the data holds its own rotations of {len(groups)} questions ({len(questions)} rows; VLMEvalKit\'s '
            f'circular MMBench, a rotation of question N at index N + k x {ROTATION_STRIDE:,}): a question counts '
            f'right when every one of its rows is, and --circular rotates nothing more')


def read_mmbench_tsv(path: str, circular: bool = False, markers: Sequence[str] = ()) -> List[Question]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    markers = _with(markers)   # once, not per row and column
    header, table = _tsv_rows(path)
    missing = [c for c in _MMBENCH_COLUMNS + ('image',) if c not in header]
    if missing:
        raise ValueError(f'{path}: missing column(s) {", ".join(missing)} ({_LAYOUT})')
    if not table:
        raise ValueError(f'{path}: holds no rows (only its header line): no questions')
    images: Dict[str, str] = {}
    out, problems, ids = [], [], _Ids(path, 'index')
    # a file of VLMEvalKit's circular MMBench (MMBench_DEV_EN.tsv: 4329 rows, 1164 questions) holds the rotations
    # itself: rows of index N + k * 1,000,000 are question N's, scored together and not rotated again
    own = any(_row_index(fields, header) >= ROTATION_STRIDE for _, fields in table)
    for row_no, fields in table:
        extra = [v for v in fields[len(header):] if v.strip()]
        if len(fields) < len(header) or extra:  # its values would be read as other columns'
            spans = sum(v.rstrip('\r\n').count('\n') for v in fields)  # a quote that opened a field, not closed
            why = (f'a field opened with a quote (") runs over {spans + 1} lines: a quote at a field\'s start must '
                   f'close it (a quote in the text: the field in quotes, each quote in it written "")' if spans else
                   'a tab missing, or one too many')
            problems.append(str(SampleError('bad_row', f'{len(fields)} fields where the header has {len(header)} '
                                                       f'({why})', f'{path}:{row_no}')))
            continue
        row = dict(zip(header, fields))
        where = f'{path}:{row_no} (index {row["index"]})'
        if not row['index'].strip():   # its rotations (--circular) and --limit group questions by it
            problems.append(str(SampleError('bad_row', 'its index is empty: give every row its own', where)))
            continue
        ids.check(row['index'], row_no, problems)
        data = (row.get('image') or '').strip()
        if len(data) < 64 and data in images:  # a reference to an earlier row's image
            data = images[data]
        images[row['index']] = data
        options = {k: row[k].strip() for k in _LETTERS   # a blank cell (' ') is no option: its empty text matched
                   if row.get(k) is not None and row[k].strip().lower() not in ('', 'nan')}   # every answer
        answer = (row.get('answer') or '').strip()
        try:
            # as a jsonl question is checked: no control text, at most one <image> tag for the row's one image
            # (a second one reached the model after it loaded: a traceback, or literal text in a batch)
            texts = {column: row.get(column) or '' for column in ('question', 'hint', *options)}
            for column, text in texts.items():
                refuse_control_text(f'its {column} column', text, markers)
            tags = sum(text.count('<image>') for text in texts.values())
            if tags > 1:
                raise SampleError('image_tag_mismatch', f'{tags} <image> tags (question, hint and options) for the '
                                                        'row\'s one image; give it one, or none (the image then '
                                                        'goes in front of the question)')
            if not data:
                raise SampleError('missing_image', 'no image: its image column is empty')
            image = _decode_image(data)
            if answer not in options:
                raise SampleError('bad_answer', f'answer {answer!r} is not one of its options {sorted(options)}')
            if len(options) < 2:   # right whatever the model says (--mc likelihood), blind or not
                raise SampleError('bad_row', f'one option ({sorted(options)[0]}): a question needs two or more')
            same = [k for k, v in options.items() if k != answer and v == options[answer]]
            if same:   # the likelihoods tie and the first letter won; a text answer was read as the first letter
                raise SampleError('bad_row', f'options {answer} (the answer) and {", ".join(same)} have the same text '
                                             f'{options[answer]!r}: no answer can tell them apart')
        except SampleError as err:
            problems.append(str(err.with_source(where)))
            continue
        rotations = len(options) if circular and not own else 1
        group = str(_row_index(fields, header) % ROTATION_STRIDE) if own else str(row['index'])
        for shift in range(rotations):
            texts = list(options.values())
            letters = list(options)
            rotated = {letters[i]: texts[(i + shift) % len(texts)] for i in range(len(texts))}
            right = letters[(letters.index(answer) - shift) % len(letters)]
            hint = (row.get('hint') or '').strip()
            stem = ((hint + '\n') if hint and hint.lower() != 'nan' else '') + row['question'].strip()
            prompt = stem + '\nOptions:\n' + ''.join(f'{k}. {v}\n' for k, v in rotated.items()) + MC_INSTRUCTION
            out.append(Question(id=f'{row["index"]}' + (f'-{shift}' if circular and not own else ''),
                                category=(row.get('category') or 'all').strip() or 'all', prompt=prompt,
                                images=[image], references=[right], options=rotated, group=group,
                                source=where, stem=stem))
    if problems:
        raise QuestionsError(path, problems)
    if not out:
        raise ValueError(f'{path}: no questions')
    return out
