"""Multiple-choice questions from MMBench's TSV (:func:`read_mmbench_tsv`), each a
:class:`~xtuner_plugins.eval.questions.Question` (``questions.py``).

The layout (``index, question, hint, A, B, C, D[, E...], answer, category, image``; ``image`` base64,
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
import string
import sys
from typing import Dict, List, Sequence, Tuple

from xtuner_plugins.data.conversation import refuse_control_text
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import load_image

from .questions import _LAYOUT, Question, QuestionsError, _Ids, _with, data_problem

__all__ = ['read_mmbench_tsv', 'MC_INSTRUCTION', 'ROTATION_STRIDE', 'rotations_note']

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_MMBENCH_COLUMNS = ('index', 'question', 'A', 'B', 'answer')
_LETTERS = string.ascii_uppercase   # every letter column, as VLMEvalKit reads options (I was the last)
#: VLMEvalKit's circular MMBench files hold each question's rotations as rows of index N + k * 1,000,000
ROTATION_STRIDE = 1_000_000


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

def _row_index(fields: List[str], header: List[str]) -> int:
    """A row's index as a whole number; -1 for one that is not."""
    try:
        return int(fields[header.index('index')].strip())
    except (ValueError, IndexError):
        return -1

def _stem(row: Dict[str, str]) -> str:
    """A row's question without its options: its hint (unless empty or ``nan``) and question."""
    hint = (row.get('hint') or '').strip()
    return ((hint + '\n') if hint and hint.lower() != 'nan' else '') + row['question'].strip()

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
    # (a row of index N + k * 1,000,000 whose question N is in the file too: large ids of other questions, such as
    # 1000000 and 2000000, were all one question's rotations, scored as one, and --circular was ignored)
    indices = {_row_index(fields, header) for _, fields in table}
    own = any(i >= ROTATION_STRIDE and i % ROTATION_STRIDE in indices for i in indices)
    seen: Dict[str, Tuple[int, str, List[str]]] = {}   # each group's first row: its line, stem and option texts
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
            number = _row_index(fields, header)   # (-1 for an index that is no whole number: its own group)
            group = str(number % ROTATION_STRIDE) if own and number >= 0 else str(row['index'])
            first = seen.setdefault(group, (row_no, _stem(row), sorted(options.values())))
            if own and first[1:] != (_stem(row), sorted(options.values())):
                raise SampleError('bad_row', f'read as a rotation of index {group} (line {first[0]}: VLMEvalKit\'s '
                                             f'circular layout, index N + k x {ROTATION_STRIDE:,}), but its question '
                                             f'or options differ from that row\'s; give it an index of its own')
        except SampleError as err:
            problems.append(str(err.with_source(where)))
            continue
        rotations = len(options) if circular and not own else 1
        stem = _stem(row)
        for shift in range(rotations):
            texts = list(options.values())
            letters = list(options)
            rotated = {letters[i]: texts[(i + shift) % len(texts)] for i in range(len(texts))}
            right = letters[(letters.index(answer) - shift) % len(letters)]
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
