"""JSON read as the data's author meant it: an object that names one key twice is refused, not read last-wins.

``json.loads('{"image": "a.jpg", "image": "b.jpg"}')`` gives ``{"image": "b.jpg"}`` without a word (RFC 8259 leaves
duplicate names to the reader: other readers keep the first, or fail), so a sample written with two ``image`` or two
``conversations`` keys would train on one of them silently. :func:`loads` is ``json.loads`` with a check of each
object's keys in the parser's own hook: 0.5 us more a sample line (2.0 -> 2.5 us on LLaVA-Pretrain's lines; the
decoder is built once: ``json.loads`` with a hook builds one per call). :func:`line_hint` says what a line that is
not one JSON object most likely is (UTF-16 text, old Mac line ends, a JSON list in a ``.jsonl`` file).
"""

from __future__ import annotations

import json
import math
from typing import Any, List, Tuple

__all__ = ['DEEP', 'DuplicateKey', 'finite_number', 'line_hint', 'loads']


class DuplicateKey(ValueError):
    """An object names ``key`` twice; ``first`` and ``last`` are its values (the last would win silently)."""

    def __init__(self, key: str, first: Any, last: Any):
        self.key, self.first, self.last = key, first, last
        super().__init__(self.describe())

    def describe(self) -> str:
        def short(value: Any) -> str:
            text = json.dumps(value, ensure_ascii=False)
            return text if len(text) <= 40 else text[:37] + '...'
        return (f'key {json.dumps(self.key, ensure_ascii=False)} appears twice in one object ({short(self.first)}, '
                f'then {short(self.last)}): JSON readers keep one of them without a word; keep the one you mean')


def _unique(pairs: List[Tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise DuplicateKey(key, seen[key], value)
            seen[key] = value
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def loads(text: str) -> Any:
    """``json.loads(text)`` (a ``str``), raising :class:`DuplicateKey` for an object that names a key twice."""
    return _DECODER.decode(text)


def finite_number(value: Any) -> bool:
    """Whether a parsed JSON value is a number (not a bool) that is finite as a float: JSON's integers have no
    bound, and ``math.isfinite`` raised OverflowError on one past float's range (a 309-digit ``repeat_time``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_UTF16_BOMS = (b'\xff\xfe', b'\xfe\xff')
DEEP = 'nested deeper than the JSON reader follows (Python\'s recursion limit)'


def line_hint(raw: bytes, body: str, msg: str) -> str:
    """What a line that is not one JSON object most likely is, for its message ('' when nothing is likely)."""
    nuls = body.count('\0')
    if raw.startswith(_UTF16_BOMS) or 0.3 <= nuls / max(1, len(body)) <= 0.7:  # UTF-16: a NUL by each ASCII letter
        return ('; the file is UTF-16 text (a UTF-16 byte-order mark or NUL bytes between the letters): save it as '
                'UTF-8 (iconv -f UTF-16 -t UTF-8 FILE > NEW)')
    if nuls:
        return ('; the line holds NUL bytes (a file cut short by a crash keeps zeros past what was written; a '
                'preallocated file is zeros): not a sample')
    if msg == 'Extra data' and '\r' in body:
        return ('; its samples are separated by a carriage return alone (\\r, old Mac line ends), so the file '
                'is one line to a JSON-lines reader: end the lines with \\n (tr "\\r" "\\n" < FILE > NEW)')
    if body.strip() == '[' or (body.lstrip().startswith('[') and msg in ('list', 'Extra data')):
        return '; one JSON list of samples ([...]) is a .json file, not .jsonl (one object a line): name it .json'
    if body.strip() == '{':
        return ('; an object spread over several lines (pretty-printed JSON, json.dump(..., indent=...)): a .jsonl '
                'holds each sample on one line (json.dumps(sample) per line; jq -c . FILE > NEW), and each of its '
                'lines is counted as a bad sample here')
    return ''
