"""Annotation files as sources: LLaVA json (a list), jsonl, and InternVL meta files.

A *source* is one annotation file with its image folder, ``repeat_time`` and ``max_dynamic_patch``.
:func:`expand_sources` turns the dataset's arguments (several files, or meta files that list several
files) into sources; :func:`repeat_array` its samples after ``repeat_time``. Each file's samples are found by a byte
index (``index.py``) and parsed one at a time (``entries.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from xtuner_plugins.errors import NotFound, Refused

from .index import BOM
from .strictjson import DEEP, DuplicateKey, finite_number, loads

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


def _as_list(value, n: int, what: str, one_for_all: bool = False) -> list:
    """``value`` for each of ``n`` files: one value for all, or a list of one per file (``one_for_all``: a list
    of one is one for all, as ``check_dataset``'s single ``--image-folder`` is); refused, in one line, otherwise."""
    if value is None or isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value)
    if one_for_all and len(value) == 1:
        return value * n
    if len(value) != n:
        raise Refused(f'{what} has {len(value)} entries but data_files has {n}: give one per file, in the order '
                      f'of data_files' + (', or one for all' if one_for_all else ''))
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
        raise Refused(f'{where} {path!r} names two different things: {beside} (beside the meta file) and '
                      f'{os.path.abspath(path)} (in the current folder, where InternVL would read it); write '
                      f'the one meant as an absolute path')
    return path if found_here and not found_beside else beside


def is_meta_file(path: str) -> bool:
    if not path.endswith('.json'):
        return False
    with open(path, encoding='utf-8-sig', errors='replace') as f:
        head = f.read(4096).lstrip()
    return head.startswith('{')


def meta_sources(path: str) -> List[DataSource]:
    """The sources an InternVL meta file names (``Refused`` naming the file, and the entry and key where one is
    wrong; ``NotFound`` for an annotation file that is not there)."""
    with open(path, 'rb') as f:
        raw = f.read()
    start = len(BOM) if raw.startswith(BOM) else 0
    try:
        meta = loads(raw[start:].decode('utf-8'))
    except DuplicateKey as exc:
        raise Refused(f'{path}: meta file: {exc.describe()}') from None
    except RecursionError:
        raise Refused(f'{path}: meta file {DEEP}') from None
    except UnicodeDecodeError as exc:
        raise Refused(f'{path}: meta file is not UTF-8 text (byte 0x{raw[start + exc.start]:02x} at byte '
                      f'offset {start + exc.start})') from None
    except json.JSONDecodeError as exc:
        if exc.msg == 'Extra data':   # an object, then more: one sample a line
            raise Refused(f'{path}: holds more than one JSON value (a second starts at line {exc.lineno}): one '
                          f'sample a line is JSON lines, name the file .jsonl (a .json file holds one list of '
                          f'samples, or is an InternVL meta file)') from None
        raise Refused(f'{path}: meta file is not valid JSON: {exc}') from None
    except ValueError as exc:  # a number past Python's 4300 digits
        raise Refused(f'{path}: meta file cannot be read: {exc}') from None
    if 'conversations' in meta:
        raise Refused(f'{path}: holds one sample, not a list of samples: a .json annotation file is a list of '
                      f'samples ([{{...}}, {{...}}]) or an InternVL meta file; use .jsonl for one sample a line')
    listed = [name for name, entry in meta.items() if isinstance(entry, list)]
    if listed:
        raise Refused(f'{path}: {listed[0]!r} holds a list inside an object: a .json annotation file is the list '
                      f'of samples itself ([{{...}}, {{...}}]), and a meta file maps names to objects with '
                      f'"annotation" and "root"')
    if not meta:   # an IndexError or numpy's 'need at least one array to concatenate' later
        raise Refused(f'{path}: a meta file with no entries: it names no annotation file to train on')
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
        return Refused(f'{path}: entry {name!r}: "{key}" must be {expected}, got {value:.200}')
    if not isinstance(entry, dict):
        raise Refused(f'{path}: entry {name!r} must be an object with "annotation" (and usually "root"), got '
                      f'{json.dumps(entry):.200}')
    if not isinstance(entry.get('annotation'), str) or not entry['annotation']:
        raise bad('annotation', 'the path of one annotation file (one entry per file)')
    root = entry.get('root')
    if root is not None and (not isinstance(root, str) or not root):
        raise bad('root', 'the image folder\'s path (a string)')
    if 'repeat_time' not in entry:
        raise Refused(f'{path}: entry {name!r}: no "repeat_time" (InternVL\'s meta files require it): 1 uses each '
                      f'sample once, 2.5 two copies and a seeded half, 0.3 a seeded 30 %')
    repeat = entry['repeat_time']
    if not finite_number(repeat) or repeat < 0:
        raise bad('repeat_time', 'a number >= 0 (2.5: two copies and a seeded half)')
    patch = entry.get('max_dynamic_patch')
    from .tile_grid import MOST_TILES, tiles_problem
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
        raise Refused(f'{path}: entry {name!r}: "annotation": {problem}')
    if not annotation.endswith(('.json', '.jsonl')):   # read as a .json list whatever it held
        raise Refused(f'{path}: entry {name!r}: "annotation" {annotation}: unknown annotation format; use .jsonl '
                      'or .json (a list of samples)')
    if is_meta_file(annotation):
        raise Refused(f'{path}: entry {name!r}: "annotation" {annotation} is a meta file itself: a meta file\'s '
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
    other arguments are one value for all files or one per file (``image_folders``: a list of one is one for all
    files too); a meta file's entries carry their own
    (``repeat_time`` required, as InternVL requires it; ``root`` and ``max_dynamic_patch`` optional).
    """
    if isinstance(data_files, str):
        data_files = [data_files]
    if not isinstance(data_files, (list, tuple)) or not all(isinstance(p, str) for p in data_files):
        raise Refused(f'data_files={data_files!r:.80}: give an annotation file, or a list of them (their paths)')
    if not data_files:
        raise Refused('data_files is empty: give at least one .json, .jsonl or meta .json file')
    n = len(data_files)
    folders = _as_list(image_folders, n, 'image_folders', one_for_all=True)
    repeats = _as_list(repeat_times, n, 'repeat_times')
    patches = _as_list(max_dynamic_patches, n, 'max_dynamic_patches')
    sources: List[DataSource] = []
    for path, folder, repeat, patch in zip(data_files, folders, repeats, patches):
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)):
            raise Refused(f'{path}: repeat_times gives it {repeat!r}; give a number >= 0 per file')
        if folder is not None and not isinstance(folder, str):
            raise Refused(f'{path}: image_folders gives it {folder!r:.60}; give a folder (its path) per file, or None')
        if os.path.isdir(path):
            shards = os.path.isfile(os.path.join(path, 'shards.json'))
            raise Refused(f'{path}: a folder, not an annotation file' + (
                ': a shard set (tools/shard_dataset.py\'s), read as one by training\'s shards= (configs/'
                'finetune_lora_shards.py) and by check_dataset.py --data; it is not sharded again' if shards else
                ''))
        if not os.path.isfile(path):   # not there, a link loop or to nothing, a FIFO (said to be 'not found')
            raise NotFound(annotation_problem(path, 'annotation file'))   # (a FileNotFoundError to callers)
        if not path.endswith(('.json', '.jsonl')):
            raise Refused(f'{path}: unknown annotation format; use .jsonl, .json (a list) or a meta .json')
        problem = annotation_problem(path, 'annotation file')   # compressed, or another format
        if problem:
            raise Refused(problem)
        if is_meta_file(path):
            sources.extend(meta_sources(path))
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
    from .tile_grid import tiles_problem
    for src in sources:
        if src.repeat_time < 0 or not math.isfinite(src.repeat_time):
            raise Refused(f'{src.annotation}: repeat_time must be >= 0, got {src.repeat_time}')
        problem = None if src.max_dynamic_patch is None else tiles_problem(src.max_dynamic_patch, 'max_dynamic_patch')
        if problem:
            raise Refused(f'{src.annotation}: {problem}')
        if src.image_folder is not None and os.path.exists(src.image_folder) and not os.path.isdir(src.image_folder):
            raise FileNotFoundError(folder_problem(src))
    return sources


def folder_problem(src: DataSource, advice: bool = True) -> Optional[str]:
    """None, or why ``src``'s image folder is none: it is a file (refused as the sources are read), or it does not
    exist (refused by the start-up check once one of the source's samples names an image or a video: a text-only
    data set needs no folder, whatever its config gives); ``advice``: with where to set it."""
    if src.image_folder is None or os.path.isdir(src.image_folder):
        return None
    what = 'is a file, not a folder' if os.path.exists(src.image_folder) else 'does not exist'
    entry = f'{src.meta}: entry {src.name!r}: ' if src.meta else ''   # its "root", where it was given
    return (f'{entry}{src.annotation}: its image folder {src.image_folder} {what}'
            + (' (set train_dataloader.dataset.image_folders, --image-folder of tools/check_dataset.py, or the meta '
               'file\'s "root")' if advice else ''))


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
