"""A converted folder checked before transformers reads it: its format (from ``config.json``), its weights and
tokenizer files there and whole. transformers' own errors for a half-written copy are tracebacks from deep inside;
these are one ``ValueError`` naming the folder, the file and what is wrong."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Tuple

FOLDER_FORMATS = {'internvl_chat': 'official', 'xtuner_vlm_chat': 'remote', 'llava': 'llava', 'internvl': 'hf'}


def folder_format(folder: str) -> str:
    """The format of a converted folder, from its ``config.json``; a clear error for anything else."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isdir(folder):
        raise ValueError(f'{folder}: no such folder; give a folder written by tools/convert_to_official.py')
    if not os.path.isfile(path):
        raise ValueError(f'{folder}: no config.json; give a folder written by tools/convert_to_official.py')
    try:
        with open(path, encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (ValueError, AttributeError) as exc:  # not JSON, not UTF-8, not an object
        raise ValueError(f'{path}: not a JSON object ({exc}); {AGAIN}') from None
    if model_type not in FOLDER_FORMATS:
        raise ValueError(f'{path}: model_type {model_type!r} is not a converted vision-language model '
                         f'(expected one of {sorted(FOLDER_FORMATS)}); give a folder written by '
                         f'tools/convert_to_official.py')
    return FOLDER_FORMATS[model_type]


#: Files one of which a folder's tokenizer is read from (fast tokenizers, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'vocab.txt', 'tokenizer.tiktoken')
# A tokenizer class given a missing file's path as None fails anywhere in its __init__ (TypeError, ...).
TOKENIZER_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)
AGAIN = 'convert the model again (tools/convert_to_official.py) or copy the folder whole'


def safetensors_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (the size its header promises, against the file's), or
    ``None``. Reads the header only: 8 bytes of length, then the JSON naming each tensor's byte range."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f'{size} bytes, shorter than its own header: a truncated (half-written) file'
        try:
            header = json.loads(f.read(length))
            end = max([int(t['data_offsets'][1]) for k, t in header.items() if k != '__metadata__'] or [0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f'its header does not read ({type(exc).__name__}: {exc}): a corrupt file'
    if 8 + length + end != size:
        return (f'{size} bytes where its header promises {8 + length + end}: a '
                f'{"truncated (half-written)" if size < 8 + length + end else "corrupt"} file')
    return None


def check_folder(folder: str) -> None:
    """A converted folder's weights and tokenizer files there and whole, before transformers reads them (whose
    errors, for a half-written copy, are tracebacks from deep inside); ``ValueError`` naming what is wrong."""
    def there(name):
        return os.path.isfile(os.path.join(folder, name))

    shards = []
    for index, single in (('model.safetensors.index.json', 'model.safetensors'),
                          ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        if there(index):
            try:
                with open(os.path.join(folder, index), encoding='utf-8') as f:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f'{os.path.join(folder, index)}: not a weight index ({type(exc).__name__}: '
                                 f'{exc}); {AGAIN}') from None
            missing = [s for s in shards if not there(s)]
            if missing:
                raise ValueError(f'{folder}: {len(missing)} of the {len(shards)} weight files {index} lists are '
                                 f'missing ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""}); {AGAIN}')
            break
        if there(single):
            shards = [single]
            break
    if not shards:
        raise ValueError(f'{folder}: no weights (model.safetensors, model.safetensors.index.json with its shards, '
                         f'or pytorch_model.bin); {AGAIN}')
    for shard in shards:
        problem = safetensors_problem(os.path.join(folder, shard)) if shard.endswith('.safetensors') else None
        if problem:
            raise ValueError(f'{os.path.join(folder, shard)}: {problem}; {AGAIN}')
    if not any(there(name) for name in TOKENIZER_FILES):
        raise ValueError(f'{folder}: no tokenizer files (one of {", ".join(TOKENIZER_FILES)}); {AGAIN}')


def from_folder(what: str, folder: str, load: Callable, errors: Tuple[type, ...] = (OSError, ValueError)):
    """``load()``; an error of the folder's files (``errors``, or safetensors' own) as one ``ValueError`` naming
    the folder and what did not load, not transformers' traceback from deep inside."""
    try:
        return load()
    except Exception as exc:
        if not isinstance(exc, errors) and type(exc).__module__.split('.')[0] != 'safetensors':
            raise
        raise ValueError(f'{folder}: the {what} does not load ({type(exc).__name__}: {str(exc).strip()}); '
                         f'{AGAIN}') from None
