"""Errors raised for bad samples.

Every problem with one sample is a :class:`SampleError`. It carries a short ``reason`` (a stable key used
to count skips of the same kind, e.g. ``"missing_image"``) and a message that names the file, the line
and the numbers involved. The dataset catches it, counts it, logs the first one of each reason, and stops
training only past a configurable fraction of failures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Iterable, List, Optional

from xtuner_plugins.errors import Refused, Stated


class SampleError(Exception):
    """A sample that cannot be used, with a countable reason.

    Args:
        reason: short stable key for counting (``"missing_image"``, ``"image_tag_mismatch"``, ...).
        message: human-readable explanation with the numbers involved.
        source: where the sample comes from, ``"FILE:LINE"``; filled in by the dataset when known.
    """

    def __init__(self, reason: str, message: str, source: Optional[str] = None):
        self.reason = reason
        self.message = message
        self.source = source
        super().__init__(self.__str__())

    def with_source(self, source: str) -> "SampleError":
        self.source = source
        self.args = (self.__str__(),)
        return self

    def __str__(self) -> str:
        # (a message that starts with the file's name already is not given it twice: 'a.png: a.png: 30000x30000')
        prefix = f'{self.source}: ' if self.source and not self.message.startswith(f'{self.source}:') else ''
        return f'{prefix}{self.message} [{self.reason}]'


class ProblemList(Sequence):
    """Samples refused at start-up, kept as three columns of the start-up check's ``[reason, message, FILE:LINE]``
    rows (as read from its cache; a reason's text shared), each a :class:`SampleError` when it is read: every rank
    and DataLoader worker holds them, and the errors themselves took three times the memory (a data set of 20,000
    refused samples held 772 bytes a problem, 224 now: tests/data/test_startcheck.py)."""

    def __init__(self, rows: Iterable[list] = ()):
        self._reasons: List[str] = []
        self._messages: List[str] = []
        self._wheres: List[Optional[str]] = []
        self._add(rows)

    def _add(self, rows: Iterable) -> None:
        shared: dict = {}
        for reason, message, where in rows:
            self._reasons.append(shared.setdefault(reason, reason))
            self._messages.append(message)
            self._wheres.append(where)

    def __len__(self) -> int:
        return len(self._reasons)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ProblemList(zip(self._reasons[i], self._messages[i], self._wheres[i]))
        return SampleError(self._reasons[i], self._messages[i], self._wheres[i])

    def __eq__(self, other) -> bool:
        """Alike problems, in order, with another :class:`ProblemList` or a list of :class:`SampleError` s."""
        if not isinstance(other, (ProblemList, list)) or len(other) != len(self):
            return False
        return all((a.reason, a.message, a.source) == (b.reason, b.message, b.source) for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f'ProblemList({len(self)} problems: {dict(self.reasons())})'

    def index(self, problem, start: int = 0, stop: Optional[int] = None) -> int:
        """The first place of a problem alike (reason, message, source): each read is a new SampleError."""
        row = (problem.reason, problem.message, problem.source)
        for i in range(start, len(self) if stop is None else min(stop, len(self))):
            if (self._reasons[i], self._messages[i], self._wheres[i]) == row:
                return i
        raise ValueError(f'{problem} is not in this list')

    def __contains__(self, problem) -> bool:
        try:
            self.index(problem)
        except (ValueError, AttributeError):
            return False
        return True

    def extend(self, problems: Iterable) -> None:
        """Add a :class:`ProblemList`'s problems, or :class:`SampleError` s."""
        self._add(zip(problems._reasons, problems._messages, problems._wheres) if isinstance(problems, ProblemList)
                  else ((p.reason, p.message, p.source) for p in problems))

    def reasons(self) -> Counter:
        """How many problems of each reason."""
        return Counter(self._reasons)

    def firsts(self) -> List[SampleError]:
        """The first problem of each reason, in order."""
        seen: dict = {}
        for i, reason in enumerate(self._reasons):
            seen.setdefault(reason, i)
        return [self[i] for i in seen.values()]


class TooManyBadSamplesError(Stated, RuntimeError):
    """Raised when the fraction of bad samples passes the configured limit."""


def check_model_path(path: str, key: str, folder_only: bool = False) -> None:
    """A model path the run was given that cannot be what ``key`` needs, refused in one line before anything
    reads it: a file given for the folder (:class:`NotFound`), or a folder this user cannot read whole
    (:class:`Refused`; transformers and safetensors call a weight file without read permission, and a broken
    link, "No such file or directory"). A path that is no folder may be a Hugging Face cache name: left to
    :func:`from_pretrained_named`; with ``folder_only`` (a key read from a folder only), :class:`NotFound`."""
    import os

    from xtuner_plugins.errors import NotFound
    from xtuner_plugins.filemodes import unreadable
    if os.path.isfile(path):
        parent = os.path.dirname(os.path.abspath(path))
        hint = (f' ({parent} holds one)' if os.path.isfile(os.path.join(parent, 'config.json')) else '')
        raise NotFound(f'{key}: {path} is a file, not a model folder: set {key} to the folder that holds its '
                       f'config.json and weights{hint}')
    if folder_only and not os.path.isdir(path):
        raise NotFound(f'{key}: {path}: no such folder; set {key} to the folder that holds its config.json and '
                       'weights')
    problem = unreadable(path) if os.path.isdir(path) else None
    if problem:
        raise Refused(f'{key}: {problem}')


def from_pretrained_named(load, path: str, key: str):
    """``load(path)`` (a ``from_pretrained``) after :func:`check_model_path`; a path that is neither a folder nor
    in the local Hugging Face cache is reported with the config key that set it, where transformers would speak
    of an internet connection (nothing is downloaded at run time here)."""
    import os

    from xtuner_plugins.errors import NotFound
    check_model_path(path, key)
    try:
        return load(path)
    except ValueError as exc:   # transformers' refusal of a model only its own code loads (its auto_map)
        if 'contains custom code which must be executed' not in str(exc):
            if os.path.isdir(path):
                raise
            raise NotFound(_not_cached(path, key)) from exc
        raise Refused(f'{key}: {path} is loaded only by its own code (the auto_map of its config.json or '
                      'tokenizer_config.json), and this project runs none (trust_remote_code=False): use a '
                      'model transformers implements, or the folder converted to such a layout '
                      '(docs/families.md)') from None
    except OSError as exc:
        if os.path.isdir(path):
            raise
        raise NotFound(_not_cached(path, key)) from exc


def _not_cached(path: str, key: str) -> str:
    """The line for a model path that is neither a folder nor in the local Hugging Face cache (not cached, or not
    a repo id: huggingface_hub's HFValidationError, a ValueError)."""
    return (f'{key}: {path!r} is neither a folder nor in the local Hugging Face cache (nothing is downloaded at run '
            f'time); download it first (huggingface-cli download REPO --local-dir FOLDER) and set {key} to its '
            'folder')


#: files a tokenizer's vocabulary is read from, one of which a tokenizer folder holds (besides its settings)
VOCABULARY_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'merges.txt', 'vocab.txt', 'spiece.model',
                    'sentencepiece.bpe.model')


def load_tokenizer_named(path: str, key: str):
    """``AutoTokenizer.from_pretrained(path)`` without remote code (:func:`from_pretrained_named`), once a folder is
    checked to hold the files its tokenizer reads (:func:`tokenizer_files_problem`)."""
    import os

    from transformers import AutoTokenizer
    problem = tokenizer_files_problem(path) if os.path.isdir(path) else None
    if problem:
        raise Refused(f'{key}: {path} {problem}; give the LLM\'s folder as downloaded (huggingface-cli download '
                      'REPO --local-dir FOLDER), or copy the missing files into it')
    return from_pretrained_named(lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=False), path, key)


def tokenizer_files_problem(folder: str) -> Optional[str]:
    """What a tokenizer folder lacks, or None: without ``tokenizer.json``, the files of the slow tokenizer its
    ``tokenizer_config.json`` names (transformers builds the fast one from them), or any vocabulary file at all.
    transformers failed on such a folder with a raw ``TypeError: expected str, bytes or os.PathLike object, not
    NoneType`` or ``AttributeError: 'NoneType' object has no attribute 'endswith'``."""
    import json
    import os
    names = set(os.listdir(folder))
    if 'tokenizer.json' in names:
        return None
    settings = {}
    if 'tokenizer_config.json' in names:
        try:
            with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
                settings = json.load(f)
        except (OSError, ValueError):   # transformers names what it cannot read
            return None
    name = settings.get('tokenizer_class') if isinstance(settings, dict) else None
    if isinstance(name, str):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
        try:   # (a class whose library is missing is a placeholder that raises ImportError on use: transformers says)
            slow = tokenizer_class_from_name(name[:-len('Fast')] if name.endswith('Fast') else name)
            files = dict(getattr(slow, 'vocab_files_names', None) or {})
        except (ImportError, AttributeError, TypeError):
            return None
        missing = sorted(set(files.values()) - names)
        if missing:
            return (f'has no tokenizer.json, nor {" and ".join(missing)}, which its {name} (tokenizer_config.json) '
                    'reads its vocabulary from')
        return None
    if not names & set(VOCABULARY_FILES) and not any(n.endswith('.tiktoken') for n in names):
        return f'holds no tokenizer: none of {", ".join(VOCABULARY_FILES)} is there'
    return None
