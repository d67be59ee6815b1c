"""One entry of an annotation file: :func:`parse_entry` parses one (a jsonl line or a json list's element), naming its
``FILE:LINE`` in every problem (entries that are not JSON objects are problems, not silently dropped);
:func:`read_records` reads a small file whole; :func:`sample_images` and :func:`sample_conversations` read a sample's
fields.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, List, Optional, Tuple

from .errors import SampleError
from .sources import DataSource, Record
from .strictjson import DEEP, DuplicateKey, line_hint, loads

_SURROGATE_ESCAPE = re.compile(r'\\u[dD][89a-fA-F]')  # a UTF-16 surrogate written as a JSON escape


def _lone_surrogate(obj) -> Optional[str]:
    """The first string in ``obj`` holding a lone UTF-16 surrogate (valid JSON, invalid text), or None."""
    if isinstance(obj, str):
        try:
            obj.encode('utf-8')
        except UnicodeEncodeError as exc:
            return f'{obj[max(0, exc.start - 10):exc.start + 10]!r}'
        return None
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for value in list(values) + (list(obj.keys()) if isinstance(obj, dict) else []):
        found = _lone_surrogate(value)
        if found:
            return found
    return None


def _loads(text: str, noun: str, where: str) -> Any:
    """``text`` parsed strictly (``strictjson.loads``); a duplicate key, nesting too deep or a number past Python's
    4300 digits is a ``bad_json`` SampleError about the ``noun`` (``line``, ``item``) at ``where``; invalid JSON is
    left to the caller (``json.JSONDecodeError``), which names it its own way."""
    try:
        return loads(text)
    except DuplicateKey as exc:
        raise SampleError('bad_json', exc.describe(), where) from None
    except RecursionError:
        raise SampleError('bad_json', f'{noun} is {DEEP}: not a sample', where) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # a number past Python's 4300 digits
        raise SampleError('bad_json', f'{noun} cannot be read: {exc}', where) from None


def _parse_line(raw: bytes, where: str) -> Tuple[Optional[str], Any]:
    """``(text, object)`` of one jsonl line, or raise a ``bad_json`` SampleError naming what is wrong. A UTF-8
    byte-order mark opening the line is read over (files joined with ``cat`` each bring theirs)."""
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as exc:
        raise SampleError('bad_json', f'line is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column '
                                      f'{exc.start + 1}){line_hint(raw, "", "")}', where) from None
    if text.startswith('\ufeff'):
        text = text[1:]
    try:
        obj = _loads(text, 'line', where)
    except json.JSONDecodeError as exc:  # its own "line 2 column 1" counts a newline inside the text: the line's
        body = text.rstrip('\r\n')        # column instead, and where it is
        pos = min(exc.pos, len(body))
        at = 'the end of the line' if pos == len(body) else f'at {body[pos:pos + 20]!r}'
        raise SampleError('bad_json', f'invalid JSON at column {pos + 1}, {at}: {exc.msg}'
                                      f'{line_hint(raw, body, exc.msg)}', where) from None
    if not isinstance(obj, dict):
        raise SampleError('bad_json', f'line is JSON {type(obj).__name__}, not an object'
                                      f'{line_hint(raw, text, type(obj).__name__)}', where)
    if _SURROGATE_ESCAPE.search(text):
        found = _lone_surrogate(obj)
        if found:
            raise SampleError('bad_json', f'line holds a lone UTF-16 surrogate, not text: {found}', where)
    return text, obj


def parse_entry(raw: bytes, is_jsonl: bool, where: str) -> Tuple[str, dict]:
    """``(text, sample)`` of one entry of an annotation file (a jsonl line or an element of a json list), or raise
    a ``bad_json`` SampleError naming what is wrong; an element of a list that is not JSON makes the whole file
    invalid (``ValueError``), as a ``json.load`` of it would."""
    if is_jsonl:
        return _parse_line(raw, where)
    try:
        text, bad_bytes = raw.decode('utf-8'), False
    except UnicodeDecodeError:  # kept as lone surrogates: the item is refused below
        text, bad_bytes = raw.decode('utf-8', errors='surrogateescape'), True
    try:
        obj = _loads(text, 'item', where)
    except json.JSONDecodeError as exc:
        path, item = where.rsplit(':', 1)
        raise ValueError(f'{path}: not valid JSON (item {item}: {exc}); a .json annotation file must hold a list of '
                         f'samples, use .jsonl for one sample per line') from None
    if not isinstance(obj, dict):
        raise SampleError('bad_json', f'item is JSON {type(obj).__name__}, not an object', where)
    found = _lone_surrogate(obj) if bad_bytes or _SURROGATE_ESCAPE.search(text) else None
    if found:
        raise SampleError('bad_json', f'item holds bytes that are not UTF-8 text or a lone UTF-16 surrogate: '
                                      f'{found}', where)
    return text, obj


def read_records(source_idx: int, source: DataSource,
                 cache_dir: Optional[str] = None) -> Tuple[List[Record], List[SampleError]]:
    """Read one annotation file whole (for small files: evaluation sets, a first sample). Returns the records and
    the problems (entries that are not JSON objects, not UTF-8, or with invalid text), each a ``bad_json`` naming
    ``FILE:LINE``. A UTF-8 byte-order mark is read over. Training reads samples one at a time instead
    (:class:`~xtuner_plugins.data.index.SourceIndex`)."""
    from .index import source_index
    path = source.annotation
    if not os.path.isfile(path):
        raise FileNotFoundError(f'annotation file not found: {path} (source {source.name!r})')
    index = source_index(path, cache_dir)
    records: List[Record] = []
    problems: List[SampleError] = []
    for i in range(len(index)):
        line = index.line(i)
        try:
            text, obj = parse_entry(index.read(i), path.endswith('.jsonl'), f'{path}:{line}')
        except SampleError as err:
            problems.append(err)
            continue
        records.append(Record(source_idx, line, text if path.endswith('.jsonl') else obj))
    return records, problems


def parse_record(record: Record) -> dict:
    """The sample dict of a record (jsonl lines are parsed here, on use: a line that is no longer a JSON object, the
    file changed since start-up, is ``bad_json`` like any other)."""
    if not isinstance(record.raw, str):
        return record.raw
    return _parse_line(record.raw.encode('utf-8', errors='surrogateescape'), None)[1]


# Fields other tools name a sample's images or video with (ms-swift's and LLaMA-Factory's ``images``/``videos``, ...):
# a sample holding one of them and not ``image``/``video`` is refused, not trained on as text-only.
OTHER_MEDIA_FIELDS = {'images': 'image', 'image_path': 'image', 'image_paths': 'image', 'image_file': 'image',
                      'img': 'image', 'imgs': 'image', 'videos': 'video', 'video_path': 'video'}


def sample_images(sample: dict) -> List[str]:
    """The image paths of a sample (``image`` may be absent, a string or a list of strings). A sample with neither
    ``image`` nor ``video`` but another tool's name for them (:data:`OTHER_MEDIA_FIELDS`) is ``unknown_media_field``:
    its images would otherwise be left out without a word."""
    image = sample.get('image')
    if image is None:
        other = [k for k in OTHER_MEDIA_FIELDS if k in sample]
        if other and sample.get('video') is None:
            raise SampleError('unknown_media_field', f'the sample has {other[0]!r} and no "image" or "video": this '
                              f'format reads images from "image" (one path or a list) and a video from "video"; '
                              f'rename {other[0]!r} to "{OTHER_MEDIA_FIELDS[other[0]]}" (as it is, the sample would '
                              f'train without its {OTHER_MEDIA_FIELDS[other[0]]})')
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) and p for p in image):
        return list(image)
    raise SampleError('bad_image_field', f'"image" must be a path or a list of paths, got {image!r}')


PAIR_HINT = ('it is a preference pair ("chosen" / "rejected"): train it with a DPO / MPO config '
             '(InternVLPreferenceDataset); check_dataset reads it so with --pairs yes')


def with_system(sample: dict, turns: Any) -> Any:
    """``turns`` (a sample's conversation, or a pair's prompt) after a top-level ``"system"`` (ShareGPT's,
    LLaMA-Factory's), read as their first ``{"from": "system"}`` turn, as those tools read it (it was dropped, and
    the template's default system message trained in its place); one beside a system turn, or not text, is
    ``bad_conversation``. An empty one, or none: ``turns`` as they are."""
    system = sample.get('system')
    if system is None or system == '' or not isinstance(turns, list):
        return turns
    shown = json.dumps(system, ensure_ascii=False)
    if not isinstance(system, str):
        raise SampleError('bad_conversation', f'a top-level "system" is text, the system message; got {shown:.60}')
    if turns and isinstance(turns[0], dict) and turns[0].get('from') == 'system':
        raise SampleError('bad_conversation', f'a top-level "system" ({shown:.60}) and a first "system" turn: give '
                                              'the system message once')
    return [{'from': 'system', 'value': system}] + turns


def sample_conversations(sample: dict) -> Any:
    """A sample's ``conversations``; a sample without them is ``bad_conversation`` saying what it holds instead (a
    preference pair, another tool's ``messages``), not "got NoneType"; so is a preference pair in the conversation
    form (``conversations`` ending with the human turn, and ``chosen`` / ``rejected``). A top-level ``system`` is
    their first turn (:func:`with_system`)."""
    if 'chosen' in sample and 'rejected' in sample:
        raise SampleError('bad_conversation', f'the sample has "chosen" and "rejected": {PAIR_HINT}'
                          if 'conversations' in sample else f'the sample has no "conversations": {PAIR_HINT}')
    if 'conversations' in sample:
        return with_system(sample, sample['conversations'])
    if 'messages' in sample:
        why = ('it has "messages" (OpenAI\'s, ms-swift\'s format): this format is LLaVA\'s, "conversations": '
               '[{"from": "human" | "gpt", "value": TEXT}, ...]; convert it')
    else:
        why = f'its keys are {", ".join(map(repr, list(sample)[:8])) or "none"}'
    raise SampleError('bad_conversation', f'the sample has no "conversations": {why}')
