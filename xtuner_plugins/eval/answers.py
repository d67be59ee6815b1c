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
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Dict, List, Sequence, Tuple, Union

from .data import Question
from .evaluate import Failure, Result

__all__ = ['AnswersFile']

_RESULT_FIELDS = {f.name for f in fields(Result)}


class AnswersFile:
    """Open ``path`` for appending (module docstring); ``done`` maps each id already answered to its result."""

    def __init__(self, path: str, settings: dict, resume: bool = False):
        self.path, self.settings = path, json.loads(json.dumps(settings))  # as read back (tuples as lists)
        self.done: Dict[str, Result] = {}
        self.written = 0  # answers appended by this run (failures are written too, and asked again)
        self._lines: Dict[str, int] = {}
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
                    if not _RESULT_FIELDS >= set(record) or not {'id', 'answer', 'score'} <= set(record):
                        raise ValueError(f'{path}:{line_no}: not an answer of tools/eval.py')
                    self.done[str(record['id'])] = Result(**record)
                    self._lines[str(record['id'])] = line_no
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
                raise ValueError(f'{self.path}:{line_no}: not JSON ({err}); remove the file to start again') from None
        return records, len(lines[-1])

    def _check_settings(self, theirs: dict) -> None:
        differ = [f'{k}: {self.settings.get(k)!r} now, {theirs.get(k)!r} there'
                  for k in sorted(set(self.settings) | set(theirs)) if self.settings.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f'{self.path}: written with other settings ({"; ".join(differ)}); resume with the '
                             f'same ones, or remove the file to start again')

    def check(self, questions: Sequence[Question]) -> None:
        """Every answer read back was to the question that has its id now."""
        by_id = {q.id: q for q in questions}
        for id_, r in self.done.items():
            q = by_id.get(id_)
            if q is None or q.prompt != r.prompt or q.references[0] != r.reference:
                change = 'is not in the data any more' if q is None else 'was to another question (prompt or ' \
                                                                           'reference differ)'
                raise ValueError(f'{self.path}:{self._lines[id_]}: the answer to id {id_!r} {change}: the data '
                                 f'changed since; remove the file to start again')

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + '\n')
        self._file.flush()

    def append(self, item: Union[Result, Failure]) -> None:
        self.written += isinstance(item, Result)
        self._write(asdict(item) if isinstance(item, Result) else dict(failure=asdict(item)))

    def results(self, questions: Sequence[Question], new: List[Result]) -> List[Result]:
        """The results of ``questions`` in their order: read back, or among ``new``."""
        by_id = dict(self.done, **{r.id: r for r in new})
        return [by_id[q.id] for q in questions if q.id in by_id]

    def close(self) -> None:
        self._file.close()
