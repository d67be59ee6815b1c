"""The files of a shard set (``tools/shard_dataset.py`` writes them; ``shards.py`` trains from them): its
``shards.json``, read and checked whole before anything else (:func:`read_index`, :func:`index_problem`), and a
tar shard's samples, read in order (:func:`read_shard`). The format is described in ``shards.py``.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Dict, Iterator, List, Optional, Tuple

from xtuner_plugins.errors import Refused, Stated

from .strictjson import DuplicateKey, loads

__all__ = ['FORMAT', 'INDEX', 'REWRITE', 'ShardDamaged', 'index_problem', 'is_count', 'media_update', 'read_index',
           'read_shard', 'stamp']

INDEX = 'shards.json'
FORMAT = 'xtuner-plugins-shards/1'
REWRITE = 'write the shard set again with tools/shard_dataset.py'


def read_index(folder: str, allow_links_outside: bool = False, stamps: Optional[List[Tuple]] = None) -> dict:
    """A shard set's ``shards.json``; a ValueError naming the folder when it is not a complete shard set, or a
    shard's size is not the one recorded (truncated or changed after it was written), and naming ``shards.json``
    when it is not one (:func:`index_problem`: a key missing or of the wrong kind, a shard outside the folder).
    ``stamps``, a list, gets each shard's :func:`stamp` as this start-up found it (for :func:`read_shard`)."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise Refused(f'{folder}: no {INDEX}: not a shard set, or one whose writing did not finish '
                      f'(tools/shard_dataset.py writes {INDEX} last)')
    try:
        with open(path, encoding='utf-8') as f:
            index = loads(f.read())
    except DuplicateKey as exc:
        raise Refused(f'{path}: {exc.describe()}; {REWRITE}') from None
    except RecursionError:
        raise Refused(f'{path}: nested deeper than the JSON reader follows: not the writer\'s; {REWRITE}') from None
    except UnicodeDecodeError as exc:
        raise Refused(f'{path}: not UTF-8 (byte {exc.start}); {REWRITE}') from None
    except json.JSONDecodeError as exc:
        raise Refused(f'{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); '
                      f'{REWRITE}') from None
    except ValueError as exc:  # a number past Python's 4300 digits
        raise Refused(f'{path}: cannot be read ({exc}); {REWRITE}') from None
    if not isinstance(index, dict):
        raise Refused(f'{path}: not a JSON object but a {type(index).__name__}; {REWRITE}')
    if index.get('format') != FORMAT:
        raise Refused(f'{path}: format {index.get("format")!r}, expected {FORMAT!r}')
    problem = index_problem(index, folder, allow_links_outside)
    if problem:
        raise Refused(f'{path}: {problem}')
    stats = [_stat(os.path.join(folder, s['file'])) for s in index['shards']]  # one stat a shard: many on Lustre
    sizes = [None if st is None else st.st_size for st in stats]
    missing = [s['file'] for s, size in zip(index['shards'], sizes) if size is None]
    if missing:
        raise Refused(f'{folder}: {len(missing)} of its {len(index["shards"])} shards are missing, first '
                      f'{missing[0]}')
    for shard, size in zip(index['shards'], sizes):
        if shard.get('bytes') is not None and size != shard['bytes']:
            raise Refused(f'{os.path.join(folder, shard["file"])}: {size} bytes, {INDEX} says {shard["bytes"]}: '
                          f'truncated or changed after it was written; {REWRITE}')
    if stamps is not None:
        stamps[:] = [stamp(st) for st in stats]
    return index


def _reason(exc: BaseException) -> str:
    """An error of reading a tar in words: webdataset adds the stream and the URL to its ``args`` (its ``str`` was
    the tuple, ``('unexpected end of data', <_io.BufferedReader ...>, 'PATH')``) and ``@ URL`` to some."""
    first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return first.split(' @ ')[0] or type(exc).__name__


def _stat(path: str) -> Optional[os.stat_result]:
    """The ``stat`` of the regular file at ``path`` (links followed), None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def stamp(st: os.stat_result) -> Tuple[int, int, int, int]:
    """What tells one file from another put in its place, or from itself written over: its device and inode (a
    file renamed over it: ``cp`` to a temporary name and ``mv``, a shard job's atomic rename), its modification time
    (written over in place) and its size."""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _when(ns: int) -> str:
    """A modification time in nanoseconds as local time to the second."""
    import time
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ns / 1e9))


def is_count(value: Any) -> bool:
    """A number of things: an int (not a bool) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def index_problem(index: dict, folder: str, allow_links_outside: bool = False) -> str:
    """What is wrong with a ``shards.json`` of ``folder`` ('' when nothing): ``samples``, ``shards`` (each an
    object with a ``file`` inside the folder and its ``samples``, ``bytes`` optional), ``sources`` (each with its
    ``annotation``) and ``skipped`` missing or of the wrong kind, or the shards' samples not adding up. A shard's
    ``file`` may not lead outside the folder, as written (``../``, an absolute path) nor through a symbolic link
    (unless ``allow_links_outside``, the data set's setting for image folders): nothing outside is read."""
    def kind(value: Any) -> str:
        return type(value).__name__
    shards, sources = index.get('shards'), index.get('sources')
    if not isinstance(shards, list) or not shards:
        return (f'"shards" is {"missing" if shards is None else f"a {kind(shards)} {shards!r:.40}"}, expected a '
                f'non-empty list of {{"file", "samples", "bytes"}}; {REWRITE}')
    root = os.path.abspath(folder)
    real_root = os.path.realpath(root)
    seen: Dict[str, int] = {}
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f'shards[{k}] is a {kind(shard)}, expected {{"file", "samples", "bytes"}}; {REWRITE}'
        name = shard.get('file')
        if not isinstance(name, str) or not name or '\0' in name:
            return f'shards[{k}].file is {name!r}, expected the name of a tar in {folder}; {REWRITE}'
        if not is_count(shard.get('samples')) or not (shard.get('bytes') is None or is_count(shard['bytes'])):
            return (f'shards[{k}] ({name}): samples {shard.get("samples")!r}, bytes {shard.get("bytes")!r}, expected '
                    f'counts; {REWRITE}')
        if name in seen:
            return (f'shards[{k}].file {name!r} is listed before, as shards[{seen[name]}]: its samples would be read '
                    f'twice; {REWRITE}')
        seen[name] = k
        for key in ('digest', 'first', 'media'):
            if not (shard.get(key) is None or isinstance(shard[key], str)):
                return f'shards[{k}] ({name}): {key} {shard[key]!r:.40}, expected text; {REWRITE}'
        if '/' not in name and name not in ('.', '..') and not os.path.islink(os.path.join(root, name)):
            continue  # a name in the folder, not a link (the writer's): inside it, one lstat (not ~8 syscalls)
        full = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, full]) != root or full == root:
            return (f'shards[{k}].file {name!r} leads outside the shard set\'s folder {folder} (to {full}): not '
                    f'read; {REWRITE}')
        real = os.path.realpath(full)
        if not allow_links_outside and os.path.commonpath([real_root, real]) != real_root:
            return (f'shards[{k}].file {name!r} is a symbolic link to {real}, outside the shard set\'s folder '
                    f'{folder}: not read (set the data set\'s allow_links_outside=True to allow it)')
    if not is_count(index.get('samples')) or index['samples'] != sum(s['samples'] for s in shards):
        return (f'samples {index.get("samples")!r}, but its {len(shards)} shards hold '
                f'{sum(s["samples"] for s in shards)}; {REWRITE}')
    if not isinstance(sources, list) or not sources:
        return (f'"sources" is {"missing" if sources is None else f"a {kind(sources)} {sources!r:.40}"}, expected '
                f'a non-empty list of {{"annotation", "max_dynamic_patch"}}; {REWRITE}')
    for k, source in enumerate(sources):
        if (not isinstance(source, dict) or not isinstance(source.get('annotation'), str)
                or not (source.get('max_dynamic_patch') is None or is_count(source['max_dynamic_patch']))):
            return (f'sources[{k}] is {source!r:.80}, expected {{"annotation": FILE, "max_dynamic_patch": N or '
                    f'null}}; {REWRITE}')
    if not isinstance(index.get('skipped', {}), dict):
        return f'"skipped" is a {kind(index["skipped"])}, expected an object (reason: count); {REWRITE}'
    return ''


def media_update(digest, sample: Dict[str, Any]) -> None:
    """Add a shard sample's media (its members but its ``json``: images, a video, frames, each named) to ``digest``
    (a hashlib object), as the writer records them in ``shards.json``'s ``media`` and the reader checks them: the
    records' digest does not see an image put in the place of another of the same size."""
    for field in sorted(k for k in sample if not k.startswith('__') and k != 'json'):
        data = bytes(sample[field])
        digest.update(field.encode('utf-8') + b'\0' + len(data).to_bytes(8, 'little') + data)


class ShardDamaged(Stated, ValueError):
    """A shard that cannot be read whole as ``shards.json`` describes it (gone, changed, truncated, damaged): the
    stream stops with this one line (``tools/train.py`` prints it without a traceback)."""


def _members(stream, path: str, total: int) -> Iterator[Dict[str, Any]]:
    """The regular files of the uncompressed tar ``stream`` of ``total`` bytes as webdataset's ``tar_file_iterator``
    gives them to ``group_by_keys`` (``fname``, ``data``, ``__url__``; its ``__...__`` names skipped), each refused
    (:class:`ShardDamaged`) before it is read where it would expand in memory, a sparse member (a 10 KB shard whose
    sparse member claimed 1.2 GB took 3 GB of memory to read; webdataset's reader reads every member whole, and opens
    compressed tars, which the writer never makes); where its header claims more bytes than the shard holds after it
    (damaged, or cut); and where its name is a path (``../x.img0.png``: its sample was read as one of key
    ``../x`` or refused as missing its ``json``). Written here because webdataset's reader has no bound on a
    member's size."""
    import re
    import tarfile
    with tarfile.open(fileobj=stream, mode='r|') as tar:
        for info in tar:
            if not info.isreg() or re.match(r'__[^/]*__($|/)', info.name):
                continue
            if info.issparse():
                raise ShardDamaged(f'{path}: a sparse member {info.name!r} claims {info.size} bytes, and the shard '
                                   f'holds {total}: not what the writer makes (read whole, it would expand in '
                                   f'memory); {REWRITE}')
            if info.offset_data + info.size > total:   # (tarfile's 'unexpected end of data', not naming it)
                raise ShardDamaged(f'{path}: a member {info.name!r} claims {info.size} bytes from byte '
                                   f'{info.offset_data}, past the end of the shard ({total} bytes): its header is '
                                   f'damaged, or the shard was cut after it was written; {REWRITE}')
            if '/' in info.name or '\\' in info.name:   # (read from memory, never extracted; still not the writer's)
                raise ShardDamaged(f'{path}: a member named {info.name!r}, a path: the writer names each member '
                                   f'KEY.FIELD at the top of the tar (000000042.json, 000000042.img0.jpg); the shard '
                                   f'is not read past it; {REWRITE}')
            yield dict(fname=info.name, data=tar.extractfile(info).read(), __url__=path)
            tar.members = []   # read as a stream: the members seen are not kept


def read_shard(path: str, skip: int = 0, expected: Optional[int] = None, size: Optional[int] = None,
               digest: Optional[str] = None, started: Optional[Tuple] = None,
               first: Optional[str] = None, media: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """The samples of one tar shard (``{'__key__', 'json', 'img0.jpg', ...}``, bytes), after the first ``skip``.
    A shard no longer there, no longer of its ``size`` in bytes (``shards.json``'s, checked at start-up: a shard
    written over since), no longer the file start-up found (``started``, its :func:`stamp` then: another file of the
    same size put in its place, or this one written over, since), that cannot be read, that ends before its
    ``expected`` samples or holds more, or whose samples read through are not the ones of its ``digest``
    (``shards.json``'s: another shard of the same size put in its place before start-up, met once it is read
    whole; at its first sample where ``first``, the digest of that sample's record, is recorded) is a
    :class:`ShardDamaged` naming it (and the samples read), the first three before any sample; so is one whose media
    read through are not the ones of its ``media`` digest (an image put in the place of another of the same size,
    met once the shard is read whole: its samples up to there were given; :func:`media_update`, about 0.3% of the
    time a sample's image takes to decode)."""
    import hashlib
    import tarfile

    from webdataset.tariterators import group_by_keys
    k = -1
    try:
        stream = open(path, 'rb')
    except OSError as exc:
        gone = isinstance(exc, FileNotFoundError)
        raise ShardDamaged(f'{path}: ' + ('no longer there: removed or renamed after the run started (its '
                                          f'{INDEX} lists it)' if gone else f'cannot be opened ({exc.strerror})') +
                           f'; {REWRITE}, or put it back') from None
    with stream:
        opened = os.fstat(stream.fileno())
        now = opened.st_size
        if size is not None and now != size:
            raise ShardDamaged(f'{path}: {now} bytes, {INDEX} says {size}: written over or cut after the run started '
                               f'(another shard job writing into this folder?); {REWRITE}, into a new folder')
        # (the path's stat, the call start-up made, not the descriptor's: overlayfs documents that a file's st_dev
        # and st_ino may come from the layer serving it; a file put there, or removed, after the open is refused too)
        here = _stat(path) if started is not None else None
        if started is not None and (here is None or stamp(here) != started):
            here = here or opened   # (removed since the open: what the message can say is the opened file's)
            was = 'another file put in its place' if stamp(here)[:2] != started[:2] else 'written over'
            sized = (f'at the same size ({here.st_size} bytes' if here.st_size == started[3] else
                     f'{here.st_size} bytes, {started[3]} when it started (cut or grown')
            raise ShardDamaged(f'{path}: {was} after the run started, {sized}; modified '
                               f'{_when(here.st_mtime_ns)}): its samples may not be the ones {INDEX} lists '
                               f'(another shard job writing into this folder?); {REWRITE}, into a new folder, or '
                               f'start the run again if the shard is the same')
        read, held = hashlib.sha1(), hashlib.sha1()   # of its records in order, and of its media, as the writer's
        try:
            for k, sample in enumerate(group_by_keys(_members(stream, path, now))):
                if expected is not None and k >= expected:
                    raise ShardDamaged(f'{path}: the tar holds more than the {expected} samples {INDEX} says: '
                                       f'changed after it was written; {REWRITE}')
                if digest is not None:
                    read.update(bytes(sample.get('json') or b'') + b'\n')
                if media is not None:
                    media_update(held, sample)
                if k == 0 and first is not None:   # a shard of another set, at the same size: before it is used
                    found = hashlib.sha1(bytes(sample.get('json') or b'') + b'\n').hexdigest()[:16]
                    if found != first:
                        raise ShardDamaged(f'{path}: its first sample is not the one {INDEX} records (its digest '
                                           f'{found}, recorded {first}): another shard of the same size put in '
                                           f'its place; {REWRITE}')
                if k >= skip:
                    yield sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if isinstance(exc, ShardDamaged):
                raise
            raise ShardDamaged(f'{path}: the tar cannot be read after its {k + 1} samples '
                               f'({_reason(exc)}): damaged or truncated; {REWRITE}') from None
    if expected is not None and k + 1 < expected:
        raise ShardDamaged(f'{path}: the tar ends after {k + 1} of its {expected} samples: truncated; {REWRITE}')
    if media is not None and held.hexdigest()[:16] != media:
        raise ShardDamaged(f'{path}: its images or videos are not the ones {INDEX} records (their digest '
                           f'{held.hexdigest()[:16]}, recorded {media}): one changed or put in the place of another '
                           f'after the shard was written (its samples were read up to its end); {REWRITE}')
    if digest is not None and read.hexdigest()[:16] != digest:
        raise ShardDamaged(f'{path}: its samples are not the ones {INDEX} records (their digest '
                           f'{read.hexdigest()[:16]}, recorded {digest}): another shard of the same size put in its '
                           f'place; {REWRITE}')
