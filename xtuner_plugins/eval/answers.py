"""The answers file of ``tools/eval.py``: every answer appended as it comes, so an interrupted evaluation resumes.

One JSON object a line: the first holds the evaluation's settings (model, data, metric, ...); each next one a
:class:`~xtuner_plugins.eval.evaluate.Result` (or ``{"failure": ...}`` for a question that could not be asked),
written and flushed as soon as the question is answered. :class:`AnswersFile` with ``resume=True`` reads an
existing file back: the questions it answered are not asked again (failures are, the image may have been
fixed), and the report counts them all. It refuses, naming the file, to

* start over a file that holds answers without ``resume`` (they would be lost; a file with the settings line
  alone is started over);
* resume a file written with other settings (the settings that differ named), or whose answer to an id was to
  another question (the data file changed since: prompt or reference differ);
* read a line that is not JSON, except a last line cut short by the interruption (dropped, and cut off the
  file before anything is appended).

Each answer also records the identity of the files it was answered on (``image_files``, :func:`file_identity`; by
their absolute paths, so that a resume from another folder finds them):
each image's (or the video's, with its clip) size and modification time in nanoseconds, not a hash of its content, so that
resuming does not read every image again (a data set of many images on a network disk); any write of a file
(a new image copied, saved or unpacked over the old one) changes its modification time. An in-memory image (a
TSV's, which has no file) is identified by a hash of its pixels. A kept answer whose images are not those any
more (replaced in place since, or another clip of the video) is dropped and its question asked again;
:attr:`AnswersFile.changed` names them. A kept answer is scored under its question's category now, and scored
again (its answer against its reference now: an answer edited in the file kept the score of the one before it);
:attr:`AnswersFile.rescored` names those whose score changed.
What this misses: a replacement of the same size that keeps the old file's modification time (``cp -p``,
``rsync -t`` of a file stamped with the same time).

The model is identified the same way (:func:`model_identity`, in the settings): its path, and the number, total
size and newest modification time of its files with a hash of their names, sizes and times. A model converted
again into the same folder (or a checkpoint saved again under its name) is another model: resuming is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from xtuner_plugins.data.image_io import load_image

from .questions import Question
from .evaluate import Failure, Ranked, Result, judge, score

__all__ = ['AnswersFile', 'file_identity', 'model_identity']

_RESULT_FIELDS = {f.name for f in fields(Result)}
_IDENTITY = 'image_files'  # the key of an answer's file identities in the answers file


def _stat(path: str) -> Optional[list]:
    """``[path, size, mtime_ns]`` of a file; a folder (a video's frames): its files' names, sizes and times hashed;
    None for a path that cannot be read (asked again, when it fails as it should)."""
    path = os.path.abspath(path)   # a resume from another folder names the same file
    try:
        if not os.path.isdir(path):
            st = os.stat(path)
            return [path, st.st_size, st.st_mtime_ns]
        listing = sorted((name, st.st_size, st.st_mtime_ns) for name, st in
                         ((n, os.stat(os.path.join(path, n))) for n in os.listdir(path)))
        return [path, hashlib.blake2b(json.dumps(listing).encode(), digest_size=16).hexdigest()]
    except OSError:
        return None


def _absolute(identity: list) -> list:
    """A recorded identity with its files' paths absolute (recorded as given before: relative to the folder eval
    ran in, so a resume from another folder dropped every answer as 'their images changed')."""
    return [[os.path.abspath(e[0]), *e[1:]] if isinstance(e, list) and e and isinstance(e[0], str)
            and e[0] != 'pixels' else e for e in identity]


def model_identity(path: str) -> str:
    """``N files, B bytes, newest TIME (HASH)`` of a model folder's (or checkpoint's) files at any depth, from their
    sizes and modification times (module docstring)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        return 'not found'   # loading it says so
    listing = []
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                st = os.stat(full)
                listing.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    else:
        st = os.stat(path)
        listing.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    newest = max((t for _, _, t in listing), default=0)
    stamp = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(newest / 1e9))
    digest = hashlib.blake2b(json.dumps(listing).encode(), digest_size=8).hexdigest()
    return f'{len(listing)} files, {sum(n for _, n, _ in listing)} bytes, newest {stamp} ({digest})'


def _pixels(image: Image.Image) -> list:
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f'{image.mode} {image.size}'.encode())
    return ['pixels', digest.hexdigest()]


def file_identity(question: Question, hashed: Optional[Dict[int, list]] = None) -> list:
    """What a question's answer depends on besides its text (module docstring): each image file's path, size
    and modification time (ns), an in-memory image's pixel hash (kept in ``hashed``: a TSV's rotations share
    their image), the video's file (or frame folder); JSON."""
    hashed = {} if hashed is None else hashed
    out = []
    for image in question.images:
        if isinstance(image, str):
            out.append(_stat(image))
        else:   # an image, or a TSV's bytes (their pixels: the identity answers files recorded for them before)
            if id(image) not in hashed:
                hashed[id(image)] = _pixels(image if isinstance(image, Image.Image) else load_image(image))
            out.append(hashed[id(image)])
    return out + ([_stat(question.video)] if question.video else []) + (
        [list(question.clip)] if question.video and question.clip else [])   # another clip: other frames


def _score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _value_problem(record: dict, blind: bool) -> str:
    """What in a read-back answer is not of the kind eval writes ('' when nothing): a score of text or null summed
    into a traceback once the model had answered the rest, and a blind score missing from one answer took the
    blind columns out of the whole report."""
    if not isinstance(record['answer'], str):
        return f'answer {record["answer"]!r:.40}, not text'
    for key in ('score', 'blind_score', 'single_score'):
        value = record.get(key)
        if (key == 'score' or value is not None or (key == 'blind_score' and blind)) and not _score(value):
            return f'{key} {value!r:.40}, not a number from 0 to 1'
    return ''


def _rescored(r: Result, q: Question, metric: str) -> Result:
    """A kept answer scored again against its question now: an answer edited in the file (``yes`` for the reference
    ``yes``) kept the score recorded for the one before it (0.0), and the report showed both."""
    value, how = judge(q, Ranked(r.answer, r.option_scores or {}) if r.read_by == 'likelihood' else r.answer, metric)
    again = {key: score(q, getattr(r, f'{kind}_answer'), metric) for kind, key in
             (('blind', 'blind_score'), ('single', 'single_score')) if getattr(r, f'{kind}_answer') is not None}
    return replace(r, score=value, read_by=how, **again)


def _held(path: str):
    """``path`` opened (made if new, nothing cut) and locked for this process (``flock``, released as the
    process ends however it ends). Two evaluations with one ``--out`` both appended to its answers: the second,
    told by the first's answers to ``--resume``, asked the same questions, wrote over the first's report and
    ended in a traceback removing an answers file the first had removed."""
    held = open(path, 'a')
    try:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise ValueError(f'{path}: another evaluation is writing its answers there now; wait for it to end, or give '
                         f'this one another --out (or --answers)') from None
    except OSError:   # a file system without locks: as before
        pass
    return held


class AnswersUnwritten(ValueError):
    """An answer could not be appended (a full disk): the evaluation stops in one line, the answers before it kept
    for ``--resume``."""


class AnswersFile:
    """Open ``path`` for appending (module docstring); ``done`` maps each id already answered to its result."""

    def __init__(self, path: str, settings: dict, resume: bool = False):
        self.path, self.settings = path, json.loads(json.dumps(settings))  # as read back (tuples as lists)
        self.done: Dict[str, Result] = {}
        self.written = 0  # answers appended by this run (failures are written too, and asked again)
        self.changed: List[str] = []  # the sources of kept answers dropped by check(): their images changed
        self.rescored: List[str] = []  # those of kept answers whose recorded scores were not their answers'
        self._lines: Dict[str, int] = {}
        self._files: Dict[str, object] = {}  # the file identities each kept answer recorded
        self._identity: Dict[str, list] = {}  # each question's, now (check)
        self._lock = _held(path)
        records, cut = self._read() if os.path.isfile(path) and os.path.getsize(path) else ([], 0)
        if records or cut:
            first = records[0][1] if records else None
            if not isinstance(first, dict) or not isinstance(first.get('settings'), dict):
                raise ValueError(f'{path}:1: not an answers file of tools/eval.py (no settings line); give another '
                                 f'--answers file')
        if len(records) > 1 and not resume:
            raise ValueError(f'{path}: holds {len(records) - 1} answers of an earlier evaluation; --resume continues '
                             f'it (with the same settings), or remove the file to start again')
        if len(records) > 1:
            self._check_settings(records[0][1]['settings'])
            for line_no, record in records[1:]:
                if isinstance(record, dict) and 'failure' not in record:
                    files = record.pop(_IDENTITY, None)
                    if not _RESULT_FIELDS >= set(record) or not {'id', 'answer', 'score'} <= set(record):
                        raise ValueError(f'{path}:{line_no}: not an answer of tools/eval.py')
                    problem = _value_problem(record, bool(self.settings.get('blind')))
                    if problem:
                        raise ValueError(f'{path}:{line_no}: not an answer of tools/eval.py ({problem}): edited '
                                         f'since; remove the line (its question is asked again), or the file')
                    self.done[str(record['id'])] = Result(**record)
                    self._lines[str(record['id'])] = line_no
                    self._files[str(record['id'])] = files
            if cut:  # the last line cut short by the interruption: dropped, cut off before appending
                with open(path, 'r+b') as f:
                    f.truncate(os.path.getsize(path) - cut)
            self._file = open(path, 'a', encoding='utf-8')
        else:  # new, or the settings line alone
            self._file = open(path, 'w', encoding='utf-8')
            self._write(dict(settings=self.settings))

    def _read(self) -> Tuple[List[tuple], int]:
        """``(line number, record)`` of each complete line; and the length of a last line without its newline
        (an interrupted write)."""
        with open(self.path, 'rb') as f:
            lines = f.read().split(b'\n')
        records = []
        for line_no, line in enumerate(lines[:-1], 1):
            try:
                records.append((line_no, json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                if line_no == 1:   # no answers file of eval's (a report, notes): not eval's to remove
                    raise ValueError(f'{self.path}:1: not an answers file of tools/eval.py (not JSON lines); give '
                                     f'another --answers file') from None
                raise ValueError(f'{self.path}:{line_no}: not JSON ({err}); remove the file to start again') from None
        return records, len(lines[-1])

    def _check_settings(self, theirs: dict) -> None:
        differ = [f'{k}: {self.settings.get(k)!r} now, {theirs.get(k)!r} there'
                  for k in sorted(set(self.settings) | set(theirs)) if self.settings.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f'{self.path}: written with other settings ({"; ".join(differ)}); resume with the '
                             f'same ones, or remove the file to start again')

    def check(self, questions: Sequence[Question]) -> None:
        """Every answer read back was to the question that has its id now; one whose images changed since it was
        answered (module docstring) is dropped, to be asked again, and its source kept in :attr:`changed`."""
        by_id = {q.id: q for q in questions}
        hashed: Dict[int, list] = {}
        self._identity = {q.id: file_identity(q, hashed) for q in questions}
        for id_, r in list(self.done.items()):
            q = by_id.get(id_)
            if q is None or q.prompt != r.prompt or q.references[0] != r.reference:
                change = 'is not in the data any more' if q is None else 'was to another question (prompt or ' \
                                                                           'reference differ)'
                raise ValueError(f'{self.path}:{self._lines[id_]}: the answer to id {id_!r} {change}: the data '
                                 f'changed since; remove the file to start again')
            if _absolute(self._files.get(id_) or []) != self._identity[id_]:  # none recorded: no files (or older)
                del self.done[id_]
                self.changed.append(q.source or id_)
            else:   # scored under the data's category and named by its line now (a category renamed was kept)
                kept = replace(r, category=q.category, source=q.source or r.source)
                self.done[id_] = _rescored(kept, q, self.settings.get('metric') or 'exact')
                if self.done[id_] != kept:
                    self.rescored.append(q.source or id_)

    def _write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + '\n')
            self._file.flush()
        except OSError as exc:   # a full disk, a file-size limit: the answers before it are whole lines
            kept = len(self.done) + self.written - (isinstance(record, dict) and 'answer' in record)
            raise AnswersUnwritten(f'the answers file {self.path} could not be written ({exc.strerror or exc}); '
                                   f'{kept} answers are kept in it: make room and run the same command with '
                                   f'--resume to ask the rest') from None

    def append(self, item: Union[Result, Failure]) -> None:
        self.written += isinstance(item, Result)
        self._write(dict(asdict(item), **{_IDENTITY: self._identity.get(item.id)}) if isinstance(item, Result)
                    else dict(failure=asdict(item)))

    def results(self, questions: Sequence[Question], new: List[Result]) -> List[Result]:
        """The results of ``questions`` in their order: read back, or among ``new``."""
        by_id = dict(self.done, **{r.id: r for r in new})
        return [by_id[q.id] for q in questions if q.id in by_id]

    def beyond(self, questions: Sequence[Question]) -> int:
        """How many of the answers read back are to none of ``questions`` (a ``--limit`` that asks fewer)."""
        asked = {q.id for q in questions}
        return sum(1 for id_ in self.done if id_ not in asked)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:   # what a failed write left in the buffer (said by AnswersUnwritten); a resume drops it
            pass
        self._lock.close()
