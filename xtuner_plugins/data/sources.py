"""Reading annotation files: LLaVA json (a list), jsonl, and InternVL meta files.

A *source* is one annotation file with its image folder, ``repeat_time`` and ``max_dynamic_patch``.
:func:`expand_sources` turns the dataset's arguments (several files, or meta files that list several
files) into sources. Each file's samples are found by a byte index (``index.py``) and read one at a time;
:func:`parse_entry` parses one (a jsonl line or a json list's element), naming its ``FILE:LINE`` in every
problem: entries that are not JSON objects are problems, not silently dropped. :func:`read_records` reads a
small file whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import SampleError
from .index import BOM
from .strictjson import DEEP, DuplicateKey, finite_number, line_hint, loads

PathList = Union[str, Sequence[Optional[str]], None]


@dataclass(frozen=True)
class DataSource:
    """One annotation file and how to use it."""

    name: str
    annotation: str
    image_folder: Optional[str]
    repeat_time: float = 1.0
    max_dynamic_patch: Optional[int] = None  # None: the dataset's default
    length: Optional[int] = None  # a meta file entry's "length": the samples it says the file has
    meta: Optional[str] = None  # the meta file the entry is in

    def length_note(self, found: int) -> Optional[str]:
        """Why a meta entry's ``length`` is worth a word once the file is read (``found`` entries: a partial copy
        or download trains on less than meant, without a word before); None when it matches or is not given."""
        if self.length is None or self.length == found:
            return None
        why = 'fewer: a partial copy or download?' if found < self.length else 'more'
        return (f'{self.meta}: entry {self.name!r}: "length" says {self.length} samples, but its annotation file '
                f'{self.annotation} holds {found} ({why}); the {found} there are used')

    @property
    def base_dir(self) -> str:
        """Where relative image paths resolve when there is no image folder."""
        return os.path.dirname(os.path.abspath(self.annotation))


@dataclass
class Record:
    """One sample as read from disk, made when it is asked for. ``raw`` is its text (a jsonl line or a json list's
    element, parsed on use) or an already-parsed object."""

    source: int
    line: int  # 1-based line of a jsonl file, or 1-based position in a json list
    raw: Any


def _as_list(value, n: int, what: str) -> list:
    if value is None or isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f'{what} has {len(value)} entries but data_files has {n}; give one per file')
    return value


def _resolve_meta_path(path: str, meta_dir: str, where: str) -> str:
    """Meta files written for InternVL often use paths relative to the training folder; ours resolve
    relative paths against the meta file's folder first and fall back to the current folder. A relative path
    that names one thing beside the meta file and another in the current folder is refused (``where`` names the
    meta file, the entry and the key): InternVL reads the current folder's, so either choice could read other
    data than the one meant, without a word."""
    if os.path.isabs(path):
        return path
    beside = os.path.join(meta_dir, path)
    found_beside, found_here = os.path.exists(beside), os.path.exists(path)
    if found_beside and found_here and not os.path.samefile(beside, path):
        raise ValueError(f'{where} {path!r} names two different things: {beside} (beside the meta file) and '
                         f'{os.path.abspath(path)} (in the current folder, where InternVL would read it); write '
                         f'the one meant as an absolute path')
    return path if found_here and not found_beside else beside


def is_meta_file(path: str) -> bool:
    if not path.endswith('.json'):
        return False
    with open(path, encoding='utf-8-sig', errors='replace') as f:
        head = f.read(4096).lstrip()
    return head.startswith('{')


def _meta_sources(path: str) -> List[DataSource]:
    with open(path, 'rb') as f:
        raw = f.read()
    start = len(BOM) if raw.startswith(BOM) else 0
    try:
        meta = loads(raw[start:].decode('utf-8'))
    except DuplicateKey as exc:
        raise ValueError(f'{path}: meta file: {exc.describe()}') from None
    except RecursionError:
        raise ValueError(f'{path}: meta file {DEEP}') from None
    except UnicodeDecodeError as exc:
        raise ValueError(f'{path}: meta file is not UTF-8 text (byte 0x{raw[start + exc.start]:02x} at byte '
                         f'offset {start + exc.start})') from None
    except json.JSONDecodeError as exc:
        if exc.msg == 'Extra data':   # an object, then more: one sample a line
            raise ValueError(f'{path}: holds more than one JSON value (a second starts at line {exc.lineno}): one '
                             f'sample a line is JSON lines, name the file .jsonl (a .json file holds one list of '
                             f'samples, or is an InternVL meta file)') from None
        raise ValueError(f'{path}: meta file is not valid JSON: {exc}') from None
    except ValueError as exc:  # a number past Python's 4300 digits
        raise ValueError(f'{path}: meta file cannot be read: {exc}') from None
    if 'conversations' in meta:
        raise ValueError(f'{path}: holds one sample, not a list of samples: a .json annotation file is a list of '
                         f'samples ([{{...}}, {{...}}]) or an InternVL meta file; use .jsonl for one sample a line')
    listed = [name for name, entry in meta.items() if isinstance(entry, list)]
    if listed:
        raise ValueError(f'{path}: {listed[0]!r} holds a list inside an object: a .json annotation file is the list '
                         f'of samples itself ([{{...}}, {{...}}]), and a meta file maps names to objects with '
                         f'"annotation" and "root"')
    if not meta:   # an IndexError or numpy's 'need at least one array to concatenate' later
        raise ValueError(f'{path}: a meta file with no entries: it names no annotation file to train on')
    meta_dir = os.path.dirname(os.path.abspath(path))
    return [_meta_source(path, meta_dir, name, entry) for name, entry in meta.items()]


#: the keys of an InternVL meta file's entry (``length``: InternVL's sample count, compared with the file's;
#: ``data_augment``: said)
META_KEYS = frozenset({'root', 'annotation', 'repeat_time', 'max_dynamic_patch', 'length', 'data_augment'})


def _warn(message: str) -> None:
    from mmengine.logging import print_log
    print_log(message, logger='current', level=logging.WARNING)


#: the first bytes of compressed files, which were read as text ('UTF-16 text', 'not UTF-8 at byte 0x8b')
_COMPRESSED = ((b'\x1f\x8b', 'gzip', 'gunzip'), (b'\x28\xb5\x2f\xfd', 'zstd', 'unzstd'),
               (b'\xfd7zXZ\x00', 'xz', 'unxz'), (b'BZh', 'bzip2', 'bunzip2'), (b'PK\x03\x04', 'zip', 'unzip'))


#: the first bytes (at their offset) of files that are no JSON text, which read as 'UTF-16 text' (a PNG's NUL bytes)
#: or as a byte that is not UTF-8: an image or a video given where the samples were meant, a data set in another
#: format, a tar (a webdataset shard; this project's shard sets are folders with a shards.json)
_NOT_TEXT = ((0, b'\x89PNG', 'a PNG image'), (0, b'\xff\xd8\xff', 'a JPEG image'), (0, b'GIF8', 'a GIF image'),
             (0, b'RIFF', 'a RIFF file (a WebP image, an AVI video)'), (4, b'ftyp', 'an MP4/MOV video'),
             (0, b'\x1aE\xdf\xa3', 'a Matroska/WebM video'), (0, b'%PDF', 'a PDF'),
             (0, b'PAR1', 'a Parquet file (convert it to .jsonl)'),
             (0, b'ARROW1', 'an Arrow file (a datasets cache: write its rows as .jsonl)'),
             (0, b'\x93NUMPY', 'a NumPy array'), (257, b'ustar', 'a tar archive'))


def annotation_problem(path: str, what: str) -> Optional[str]:
    """Why ``path`` cannot be read as an annotation file (a folder, not there, a symbolic link loop or to nothing,
    a FIFO, socket or device: never opened, a FIFO blocks; a compressed file; an image, a video or another binary
    format, :data:`_NOT_TEXT`), or None for a regular file."""
    if os.path.isfile(path):
        try:
            with open(path, 'rb') as f:
                head = f.read(264)
        except OSError as exc:
            return f'{what} cannot be read: {path}: {exc.strerror}'
        for magic, kind, tool in _COMPRESSED:
            if head.startswith(magic):
                return f'{what} {path} is {kind}-compressed: decompress it first ({tool})'
        json_like = head[len(BOM):] if head.startswith(BOM) else head
        if not json_like.lstrip().startswith((b'{', b'[')):   # JSON text: a sample's "WEBP" id is no WebP
            for at, magic, kind in _NOT_TEXT:
                if head[at:at + len(magic)] == magic:
                    return f'{what} {path} is {kind}, not JSON text'
        return None
    if os.path.isdir(path):
        return f'{path} is a folder, not an annotation file'
    from .image_io import why_missing
    return why_missing(path, what)


def _meta_source(path: str, meta_dir: str, name: str, entry: Any) -> DataSource:
    """One entry of a meta file; a wrong or missing value is one line naming the meta file, the entry and the key.
    ``repeat_time`` is required, as InternVL's own loader requires it (it fails with a bare ``KeyError``)."""
    def bad(key: str, expected: str):
        value = json.dumps(entry.get(key)) if key in entry else 'nothing'
        return ValueError(f'{path}: entry {name!r}: "{key}" must be {expected}, got {value:.200}')
    if not isinstance(entry, dict):
        raise ValueError(f'{path}: entry {name!r} must be an object with "annotation" (and usually "root"), got '
                         f'{json.dumps(entry):.200}')
    if not isinstance(entry.get('annotation'), str) or not entry['annotation']:
        raise bad('annotation', 'the path of one annotation file (one entry per file)')
    root = entry.get('root')
    if root is not None and (not isinstance(root, str) or not root):
        raise bad('root', 'the image folder\'s path (a string)')
    if 'repeat_time' not in entry:
        raise ValueError(f'{path}: entry {name!r}: no "repeat_time" (InternVL\'s meta files require it): 1 uses each '
                         f'sample once, 2.5 two copies and a seeded half, 0.3 a seeded 30 %')
    repeat = entry['repeat_time']
    if not finite_number(repeat) or repeat < 0:
        raise bad('repeat_time', 'a number >= 0 (2.5: two copies and a seeded half)')
    patch = entry.get('max_dynamic_patch')
    from .tiling import MOST_TILES, tiles_problem   # (torch: imported when a meta file is read)
    if patch is not None and tiles_problem(patch, ''):
        raise bad('max_dynamic_patch', f'a whole number from 1 to {MOST_TILES}')
    unknown = sorted(set(entry) - META_KEYS)
    if unknown:   # a misspelt max_dynamic_patch was dropped without a word
        import difflib
        named = [repr(k) + ''.join(f' (meant {m!r}?)' for m in difflib.get_close_matches(k, sorted(META_KEYS), 1))
                 for k in unknown]
        _warn(f'{path}: entry {name!r}: {", ".join(named)} not read (an entry\'s keys: {", ".join(sorted(META_KEYS))})')
    if entry.get('data_augment'):
        _warn(f'{path}: entry {name!r}: "data_augment" is not done here (InternVL\'s JPEG-quality augmentation of '
              'that entry\'s images): its images are used as they are')
    annotation = _resolve_meta_path(entry['annotation'], meta_dir, f'{path}: entry {name!r}: "annotation"')
    problem = annotation_problem(annotation, 'annotation file')
    if problem:   # a folder or a symbolic link loop was a raw traceback later, a FIFO a hang
        raise ValueError(f'{path}: entry {name!r}: "annotation": {problem}')
    if not annotation.endswith(('.json', '.jsonl')):   # read as a .json list whatever it held
        raise ValueError(f'{path}: entry {name!r}: "annotation" {annotation}: unknown annotation format; use .jsonl '
                         'or .json (a list of samples)')
    if is_meta_file(annotation):
        raise ValueError(f'{path}: entry {name!r}: "annotation" {annotation} is a meta file itself: a meta file\'s '
                         f'entries name annotation files (.jsonl, or a .json list of samples), not meta files')
    folder = _resolve_meta_path(root, meta_dir, f'{path}: entry {name!r}: "root"') if root else None
    length = entry.get('length')
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        _warn(f'{path}: entry {name!r}: "length" {json.dumps(length):.100} is not a count of samples: not compared '
              f'with the annotation file')
        length = None
    return DataSource(name=name, annotation=annotation, image_folder=folder,
                      repeat_time=float(repeat), max_dynamic_patch=patch, length=length, meta=path)


def expand_sources(data_files: PathList, image_folders: PathList = None,
                   repeat_times: Union[float, Sequence[float]] = 1.0,
                   max_dynamic_patches: Union[int, None, Sequence[Optional[int]]] = None) -> List[DataSource]:
    """Build the list of sources from the dataset's arguments.

    ``data_files`` entries are ``.jsonl`` files, ``.json`` files holding a list of samples, or InternVL
    meta ``.json`` files (an object mapping names to ``root``/``annotation``/``repeat_time``/...). The
    other arguments are one value for all files or one per file; a meta file's entries carry their own
    (``repeat_time`` required, as InternVL requires it; ``root`` and ``max_dynamic_patch`` optional).
    """
    if isinstance(data_files, str):
        data_files = [data_files]
    if not data_files:
        raise ValueError('data_files is empty: give at least one .json, .jsonl or meta .json file')
    n = len(data_files)
    folders = _as_list(image_folders, n, 'image_folders')
    repeats = _as_list(repeat_times, n, 'repeat_times')
    patches = _as_list(max_dynamic_patches, n, 'max_dynamic_patches')
    sources: List[DataSource] = []
    for path, folder, repeat, patch in zip(data_files, folders, repeats, patches):
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)):
            raise ValueError(f'{path}: repeat_times gives it {repeat!r}; give a number >= 0 per file')
        if os.path.isdir(path):
            shards = os.path.isfile(os.path.join(path, 'shards.json'))
            raise ValueError(f'{path}: a folder, not an annotation file' + (
                ': a shard set (tools/shard_dataset.py\'s), read as one by training\'s shards= (configs/'
                'finetune_lora_shards.py) and by check_dataset.py --data; it is not sharded again' if shards else
                ''))
        if not os.path.isfile(path):   # not there, a link loop or to nothing, a FIFO (said to be 'not found')
            raise FileNotFoundError(annotation_problem(path, 'annotation file'))
        if not path.endswith(('.json', '.jsonl')):
            raise ValueError(f'{path}: unknown annotation format; use .jsonl, .json (a list) or a meta .json')
        problem = annotation_problem(path, 'annotation file')   # compressed, or another format
        if problem:
            raise ValueError(problem)
        if is_meta_file(path):
            sources.extend(_meta_sources(path))
            from mmengine.logging import print_log
            if folder is not None:
                print_log(f'{path}: a meta file: its entries\' "root" are the image folders, the image folder given '
                          f'for it ({folder}) is not used', logger='current', level=logging.WARNING)
            if repeat != 1:
                print_log(f'{path}: a meta file: its entries\' "repeat_time" are the repeats, the repeat_times given '
                          f'for it ({repeat:g}) is not used', logger='current', level=logging.WARNING)
        else:
            sources.append(DataSource(name=os.path.basename(path), annotation=path, image_folder=folder,
                                      repeat_time=float(repeat), max_dynamic_patch=patch))
    _warn_named_twice(sources)
    from .tiling import tiles_problem   # (torch: imported when the sources are read)
    for src in sources:
        if src.repeat_time < 0 or not math.isfinite(src.repeat_time):
            raise ValueError(f'{src.annotation}: repeat_time must be >= 0, got {src.repeat_time}')
        problem = None if src.max_dynamic_patch is None else tiles_problem(src.max_dynamic_patch, 'max_dynamic_patch')
        if problem:
            raise ValueError(f'{src.annotation}: {problem}')
        if src.image_folder is not None and os.path.exists(src.image_folder) and not os.path.isdir(src.image_folder):
            raise FileNotFoundError(folder_problem(src))
    return sources


def folder_problem(src: DataSource) -> Optional[str]:
    """None, or why ``src``'s image folder is none: it is a file (refused as the sources are read), or it does not
    exist (refused by the start-up check once one of the source's samples names an image or a video: a text-only
    data set needs no folder, whatever its config gives)."""
    if src.image_folder is None or os.path.isdir(src.image_folder):
        return None
    what = 'is a file, not a folder' if os.path.exists(src.image_folder) else 'does not exist'
    entry = f'{src.meta}: entry {src.name!r}: ' if src.meta else ''   # its "root", where it was given
    return (f'{entry}{src.annotation}: its image folder {src.image_folder} {what} (set train_dataloader.dataset.'
            f'image_folders, --image-folder of tools/check_dataset.py, or the meta file\'s "root")')


def _warn_named_twice(sources: List[DataSource]) -> None:
    """A file named twice is used once per naming, as InternVL does: said, in case it is a slip (a copied entry)."""
    named: dict = {}
    for src in sources:
        named.setdefault(os.path.realpath(src.annotation), []).append(src)
    for path, srcs in named.items():
        if len(srcs) > 1:
            from mmengine.logging import print_log
            total = sum(s.repeat_time for s in srcs)
            whole = all(s.repeat_time == int(s.repeat_time) for s in srcs)
            use = (f'{total:g} times each in all' if whole else f'{total:g} times each on average: each naming\'s '
                   'fraction is its own seeded draw, so some samples are used more often than others')
            print_log(f'{path} is named {len(srcs)} times ({", ".join(repr(s.name) for s in srcs)}): the samples of '
                      f'each naming are used ({use}); if that is not meant, name it once with the repeat_time you '
                      'mean', logger='current', level=logging.WARNING)


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
        obj = loads(text)
    except DuplicateKey as exc:
        raise SampleError('bad_json', exc.describe(), where) from None
    except RecursionError:
        raise SampleError('bad_json', f'line is {DEEP}: not a sample', where) from None
    except json.JSONDecodeError as exc:  # its own "line 2 column 1" counts a newline inside the text: the line's
        body = text.rstrip('\r\n')        # column instead, and where it is
        pos = min(exc.pos, len(body))
        at = 'the end of the line' if pos == len(body) else f'at {body[pos:pos + 20]!r}'
        raise SampleError('bad_json', f'invalid JSON at column {pos + 1}, {at}: {exc.msg}'
                                      f'{line_hint(raw, body, exc.msg)}', where) from None
    except ValueError as exc:  # a number past Python's 4300 digits
        raise SampleError('bad_json', f'line cannot be read: {exc}', where) from None
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
        obj = loads(text)
    except DuplicateKey as exc:
        raise SampleError('bad_json', exc.describe(), where) from None
    except RecursionError:
        raise SampleError('bad_json', f'item is {DEEP}: not a sample', where) from None
    except json.JSONDecodeError as exc:
        path, item = where.rsplit(':', 1)
        raise ValueError(f'{path}: not valid JSON (item {item}: {exc}); a .json annotation file must hold a list of '
                         f'samples, use .jsonl for one sample per line') from None
    except ValueError as exc:  # a number past Python's 4300 digits
        raise SampleError('bad_json', f'item cannot be read: {exc}', where) from None
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


def repeat_indices(n: int, repeat_time: float, seed: int) -> List[int]:
    """Indices ``0..n-1`` repeated ``repeat_time`` times, the fractional part as a seeded subset: ``2.5`` gives two
    full copies plus a seeded random half (without replacement), ``0.3`` a seeded 30 %; the subset keeps file
    order, so repeated runs see the same samples."""
    return repeat_array(n, repeat_time, seed).tolist()


def repeat_subset(n: int, repeat_time: float, seed: int) -> np.ndarray:
    """The seeded subset (sorted) the fractional part of ``repeat_time`` adds; ``random.sample``'s, as always (5M
    samples at 0.3: seconds and ~0.7 GB, so training caches it once per node: ``startcheck.cached_subset``)."""
    whole = int(math.floor(repeat_time))
    extra = int(round((repeat_time - whole) * n))
    if not extra:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(sorted(random.Random(seed).sample(range(n), extra)), dtype=np.int64)


def repeat_array(n: int, repeat_time: float, seed: int, subset: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`repeat_indices` as an ``int64`` array (``subset``: :func:`repeat_subset`'s, when the caller has it)."""
    whole = int(math.floor(repeat_time))
    subset = repeat_subset(n, repeat_time, seed) if subset is None else subset
    return np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), np.asarray(subset, dtype=np.int64)])


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


def sample_conversations(sample: dict) -> Any:
    """A sample's ``conversations``; a sample without them is ``bad_conversation`` saying what it holds instead (a
    preference pair, another tool's ``messages``), not "got NoneType"."""
    if 'conversations' in sample:
        return sample['conversations']
    if 'chosen' in sample and 'rejected' in sample:
        why = ('it is a preference pair ("chosen" / "rejected"): train it with a DPO / MPO config '
               '(InternVLPreferenceDataset); check_dataset reads it so with --pairs yes')
    elif 'messages' in sample:
        why = ('it has "messages" (OpenAI\'s, ms-swift\'s format): this format is LLaVA\'s, "conversations": '
               '[{"from": "human" | "gpt", "value": TEXT}, ...]; convert it')
    else:
        why = f'its keys are {", ".join(map(repr, list(sample)[:8])) or "none"}'
    raise SampleError('bad_conversation', f'the sample has no "conversations": {why}')
