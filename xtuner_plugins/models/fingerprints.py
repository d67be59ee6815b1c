"""Fingerprints of model folders and checkpoints: what lineage (``lineage.py``) records of each source and stage,
and compares to tell another tower or another warm-up from the right one wherever a checkpoint is used.

:func:`fingerprint` gives each file's size and a digest (files up to :data:`WHOLE_HASH_BYTES` hashed whole, larger
ones by their head and evenly spaced samples; a process hashes a file once while its size and modification time
stay); :func:`fingerprint_differences` names what differs, file by file.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional

#: files up to this size are hashed whole; larger ones by their head (a safetensors header names every tensor,
#: its dtype, shape and offsets) and evenly spaced samples
WHOLE_HASH_BYTES = 64 << 20
HEAD_BYTES = 1 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 32
#: the files of a model folder that make its weights and tokens (README, images, generation settings are not)
MODEL_FILE_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.model', '.tiktoken', '.index.json')
MODEL_FILE_NAMES = ('config.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                    'special_tokens_map.json', 'added_tokens.json', 'preprocessor_config.json')

#: digests this process computed, by (real path, size, modification time): a conversion checks the same sources
#: and checkpoints more than once (the chain, then the stage's own lineage)
_DIGESTS: Dict[tuple, str] = {}


def _file_digest(path: str, size: int) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(path, size)
    return _DIGESTS[key]


def _hash_file(path: str, size: int) -> str:
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
        if size <= WHOLE_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                sha.update(chunk)
        else:
            sha.update(f.read(HEAD_BYTES))
            for i in range(SAMPLES + 1):
                f.seek((size - SAMPLE_BYTES) * i // SAMPLES)
                sha.update(f.read(SAMPLE_BYTES))
    return sha.hexdigest()[:16]


def fingerprint(path: str, model_files_only: bool = True) -> Optional[dict]:
    """``{'path', 'abspath', 'files': {name: [size, digest]}}`` of a file or of a folder's top-level files
    (``model_files_only``: those that make a model's weights and tokens; else all of them, as in a DeepSpeed
    checkpoint folder). None when ``path`` is not on disk (a hub id)."""
    if not isinstance(path, str) or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and (
            not model_files_only or n in MODEL_FILE_NAMES or n.endswith(MODEL_FILE_SUFFIXES)))
        files = {n: os.path.join(path, n) for n in names}
    else:  # a checkpoint file may be moved or renamed: its content is what counts
        files = {'': path}
    entries = {}
    for name, full in files.items():
        size = os.path.getsize(full)
        entries[name] = [size, _file_digest(full, size)]
    return dict(path=path, abspath=os.path.abspath(path), files=entries)


def fingerprint_differences(recorded: dict, now: dict) -> List[str]:
    """What differs between two fingerprints, file by file (empty when they are the same)."""
    a, b = recorded.get('files', {}), now.get('files', {})
    out = []
    for name in sorted(set(a) | set(b)):
        label = name or 'the file'
        if name not in b:
            out.append(f'{label} missing')
        elif name not in a:
            out.append(f'{label} not in the recorded one')
        elif a[name][0] != b[name][0]:
            out.append(f'{label}: {b[name][0]} bytes, recorded {a[name][0]}')
        elif a[name][1] != b[name][1]:
            out.append(f'{label}: other content (same size, {b[name][0]} bytes)')
    return out
