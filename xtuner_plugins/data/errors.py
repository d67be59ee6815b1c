"""Errors raised for bad samples.

Every problem with one sample is a :class:`SampleError`. It carries a short ``reason`` (a stable key used
to count skips of the same kind, e.g. ``"missing_image"``) and a message that names the file, the line
and the numbers involved. The dataset catches it, counts it, logs the first one of each reason, and stops
training only past a configurable fraction of failures.
"""

from __future__ import annotations

from typing import Optional

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


class TooManyBadSamplesError(Stated, RuntimeError):
    """Raised when the fraction of bad samples passes the configured limit."""


def check_model_path(path: str, key: str) -> None:
    """A model path the run was given that cannot be what ``key`` needs, refused in one line before anything
    reads it: a file given for the folder (:class:`NotFound`), or a folder this user cannot read whole
    (:class:`Refused`; transformers and safetensors call a weight file without read permission, and a broken
    link, "No such file or directory"). A path that is no folder may be a Hugging Face cache name: left to
    :func:`from_pretrained_named`."""
    import os

    from xtuner_plugins.errors import NotFound
    from xtuner_plugins.filemodes import unreadable
    if os.path.isfile(path):
        parent = os.path.dirname(os.path.abspath(path))
        hint = (f' ({parent} holds one)' if os.path.isfile(os.path.join(parent, 'config.json')) else '')
        raise NotFound(f'{key}: {path} is a file, not a model folder: set {key} to the folder that holds its '
                       f'config.json and weights{hint}')
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
