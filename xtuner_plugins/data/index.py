"""A sample index with no Python object per sample: where each sample's bytes are in its annotation file.

One ``int64`` array ``[N, 3]`` per annotation file: each entry's byte offset, byte size and ``LINE`` (the 1-based
line of a ``.jsonl`` file, blank lines skipped but counted; the 1-based position in a ``.json`` list). It is found by
scanning the bytes with numpy (newlines; for a list, quotes, escapes and nesting depth), saved as ``.npy`` beside the
length cache, keyed by the file's path, size and modification time, and memory-mapped: every rank of a node and every
DataLoader worker share its pages (forked processes do not copy them, as they copy Python objects they touch). A sample
is read (``os.pread`` of its bytes) and parsed when it is used; the bytes around it must still be its line's or
item's bounds (a newline; a comma or bracket), else the file changed after it was indexed (:class:`AnnotationChanged`).
The key holds the file's inode and change time too: content written back under the same size and modification time
(``cp -p``, ``rsync --inplace``, a coarse-grained clock) is indexed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import List, Optional

import numpy as np

from xtuner_plugins.errors import Stated
from xtuner_plugins.filemodes import file_mode

from .nodepass import node_once

INDEX_VERSION = 3  # 2: the inode and change time in the key; 3: a line of a byte-order mark alone is blank
BOM = b'\xef\xbb\xbf'
WINDOW = 1 << 24  # bytes scanned at a time: the scan's memory stays ~10x this whatever the file's size
_WHITESPACE = np.array([32, 9, 10, 13, 11, 12], dtype=np.uint8)  # what bytes.strip() strips
_OPEN, _CLOSE = (ord('['), ord('{')), (ord(']'), ord('}'))


def _file(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    return np.memmap(path, dtype=np.uint8, mode='r') if size else np.zeros(0, dtype=np.uint8)


def scan_jsonl(path: str) -> np.ndarray:
    """``[N, 3]`` (offset, size, line) of each non-blank line (a line holding only whitespace is blank, as
    ``bytes.strip()``, after a byte-order mark: an empty file saved with one, then joined with ``cat``), without its
    newline; a UTF-8 byte-order mark opening the file is left out."""
    data = _file(path)
    newlines = [np.flatnonzero(data[a:a + WINDOW] == 10) + a for a in range(0, len(data), WINDOW)]
    ends = np.concatenate(newlines + [np.array([len(data)], dtype=np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    if len(data) >= 3 and bytes(data[:3]) == BOM:
        starts[0] = 3
    keep = ends > starts
    starts, ends, lines = starts[keep], ends[keep], lines[keep]
    # a line is blank only if its first byte is whitespace or a BOM's: look at those one by one (few in real files)
    firsts = data[starts]
    maybe = np.flatnonzero(np.isin(firsts, _WHITESPACE) | (firsts == BOM[0])) if len(starts) else \
        np.zeros(0, dtype=np.int64)
    blank = [i for i in maybe if not bytes(data[starts[i]:ends[i]]).removeprefix(BOM).strip()]
    if blank:
        keep = np.ones(len(starts), dtype=bool)
        keep[blank] = False
        starts, ends, lines = starts[keep], ends[keep], lines[keep]
    return np.stack([starts, ends - starts, lines], axis=1) if len(starts) else np.zeros((0, 3), dtype=np.int64)


def _run_start(data: np.ndarray, at: int) -> int:
    """Where the run of backslashes that ends right before byte ``at`` begins (``at`` when there is none)."""
    while at > 0:
        block = data[max(0, at - 4096):at]
        other = np.flatnonzero(block != 92)
        if len(other):
            return at - len(block) + int(other[-1]) + 1
        at -= len(block)
    return 0


def _real_quotes(data: np.ndarray, quotes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The quotes (all in ``data[lo:hi]``) not escaped by an odd run of backslashes before them. The runs are found
    in arrays (a loop over each quote after a backslash took 5.6 s for an 81 MB file of 8.8M ``\\"``, five times
    ``json.load``), in the window alone and the run that goes on into it from before: the whole file's backslashes,
    found again for every window, made the scan quadratic (45 s for 844 MB, 4.4 s for 211 MB)."""
    escaped = quotes[(quotes > 0) & (data[np.maximum(quotes - 1, 0)] == 92)]
    if not len(escaped):
        return quotes
    first = _run_start(data, lo)
    slashes = np.flatnonzero(data[first:hi] == 92) + first
    breaks = np.flatnonzero(np.diff(slashes) != 1)
    ends = np.append(slashes[breaks], slashes[-1])          # the last backslash of each run
    starts = np.insert(slashes[breaks + 1], 0, slashes[0])  # and its first
    run = np.searchsorted(ends, escaped - 1)                # the run that ends right before each such quote
    drop = escaped[(ends[run] - starts[run] + 1) % 2 == 1]
    return np.setdiff1d(quotes, drop, assume_unique=True) if len(drop) else quotes


def scan_json_list(path: str) -> np.ndarray:
    """``[N, 3]`` (offset, size, position) of each element of the top-level list of a ``.json`` file, by a scan
    of its bytes that follows strings (and their escapes) and the nesting depth; raises ``ValueError`` naming the
    file when it is not one list. Each element is parsed (and any JSON error in it found) when it is read."""
    data = _file(path)
    start = 3 if len(data) >= 3 and bytes(data[:3]) == BOM else 0
    tops: List[np.ndarray] = []    # brackets opening or closing the top level (a valid file: its '[' and ']')
    commas: List[np.ndarray] = []  # commas between the list's elements
    in_string, depth = 0, 0

    def invalid(why: str) -> ValueError:
        return ValueError(f'{path}: not valid JSON ({why}); a .json annotation file must hold a list of samples, use '
                          f'.jsonl for one sample per line')
    if bytes(data[:2]) in (b'\xff\xfe', b'\xfe\xff') or 0 in data[:64]:
        raise invalid('UTF-16 text: a UTF-16 byte-order mark or NUL bytes; save it as UTF-8, iconv -f UTF-16 -t UTF-8 '
                      'FILE > NEW')
    for a in range(start, len(data), WINDOW):
        w = data[a:a + WINDOW]
        quotes = _real_quotes(data, np.flatnonzero(w == 34) + a, a, a + len(w))
        marks = np.flatnonzero((w == 91) | (w == 93) | (w == 123) | (w == 125) | (w == 44)) + a
        marks = marks[(np.searchsorted(quotes, marks) + in_string) % 2 == 0]  # outside strings
        in_string = (in_string + len(quotes)) % 2
        chars = data[marks]
        delta = np.isin(chars, _OPEN).astype(np.int64) - np.isin(chars, _CLOSE).astype(np.int64)
        after = depth + np.cumsum(delta)
        if len(after) and after.min() < 0:
            raise invalid(f'a closing bracket with none open, at byte {int(marks[np.argmax(after < 0)])}')
        tops.append(marks[(after - delta == 0) | (after == 0)])
        commas.append(marks[(after == 1) & (chars == 44)])
        depth = int(after[-1]) if len(after) else depth
    top = np.concatenate(tops) if tops else np.zeros(0, dtype=np.int64)
    if not len(top) or data[top[0]] != 91 or bytes(data[start:top[0]]).strip():
        raise invalid('the file is empty' if len(data) <= start or not bytes(data[start:]).strip()
                      else 'the top level is not a list')
    if len(top) == 1 or depth:
        raise invalid('the list is not closed at the end of the file')
    closed = int(top[1])
    if len(top) > 2 or bytes(data[closed + 1:]).strip():
        raise invalid(f'more data after the list, at byte {int(top[2]) if len(top) > 2 else closed + 1}')
    b = np.concatenate([top[:1]] + commas + [top[1:2]]).astype(np.int64)
    b = b[(b >= top[0]) & (b <= closed)]
    starts, sizes = b[:-1] + 1, b[1:] - b[:-1] - 1
    if len(starts) == 1 and not bytes(data[starts[0]:starts[0] + sizes[0]]).strip():
        return np.zeros((0, 3), dtype=np.int64)   # []
    return np.stack([starts, sizes, np.arange(1, len(starts) + 1, dtype=np.int64)], axis=1)


def scan(path: str) -> np.ndarray:
    """The index of one annotation file (``.jsonl`` or a ``.json`` list)."""
    return scan_jsonl(path) if path.endswith('.jsonl') else scan_json_list(path)


def file_identity(st: os.stat_result) -> dict:
    """What says an annotation file's bytes are the ones a cache was made of: its size, modification time, inode
    and change time (which no copy tool sets: any write, even one restoring the modification time, changes it)."""
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=[st.st_dev, st.st_ino], ctime_ns=st.st_ctime_ns)


def index_key(path: str) -> str:
    parts = dict(version=INDEX_VERSION, annotation=os.path.abspath(path), **file_identity(os.stat(path)))
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def save_array(path: str, array: np.ndarray) -> None:
    """Write an ``.npy`` atomically (a reader never sees half of it), with a plain file's mode (:func:`file_mode`)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, 'wb') as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_array(path: str) -> Optional[np.ndarray]:
    """An ``.npy`` memory-mapped (an empty one read), or None when it is not there or unreadable."""
    try:
        array = np.load(path, mmap_mode='r')
    except (OSError, ValueError):
        try:
            array = np.load(path)
        except (OSError, ValueError):
            return None
    return array


def ascending_below(array, bound: int) -> bool:
    """Whether ``array`` is a 1-D array of whole numbers rising strictly from 0 or more to below ``bound``: what
    a cache's record numbers are (an edited one, ``10**9`` among them, was an IndexError traceback)."""
    if array is None or array.ndim != 1 or array.dtype.kind not in 'iu':
        return False
    return not len(array) or (int(array[0]) >= 0 and int(array[-1]) < bound and bool(np.all(np.diff(array) > 0)))


FILES_PER_SOURCE = 3   # kept open per annotation file: its own, its index's and its check's (arrays mapped)


def room_for_open_files(sources: int) -> None:
    """Raise this process's soft limit of open files (``RLIMIT_NOFILE``) for ``sources`` annotation files, each
    keeping a few open (:data:`FILES_PER_SOURCE`: mapped arrays hold their file), up to the hard limit; refused in
    one line past it. The soft limit is 1024 on many systems: a meta file of 400 annotation files stopped with
    'OSError: [Errno 24] Too many open files' in a traceback, from whichever open came first."""
    import resource
    try:
        now = len(os.listdir('/proc/self/fd'))
    except OSError:   # (not Linux)
        now = 256
    need = now + sources * FILES_PER_SOURCE + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        from xtuner_plugins.errors import Refused
        raise Refused(f'{sources} annotation files keep about {need} files open, and this process may open {hard} '
                      f'(ulimit -Hn): raise the limit (ulimit -n {need}, or the hard limit in '
                      f'/etc/security/limits.conf), or join the files into fewer (cat a.jsonl b.jsonl > ab.jsonl)')
    room = 2 * need   # (and as many again for what else opens files: the lengths' arrays, DataLoader workers)
    resource.setrlimit(resource.RLIMIT_NOFILE, (room if hard == resource.RLIM_INFINITY else min(room, hard), hard))


class AnnotationChanged(Stated, RuntimeError):
    """An annotation file no longer holds its samples where its index says: it changed after it was indexed."""


class SourceIndex:
    """The entries of one annotation file and the means to read one: ``entries`` ``[N, 3]`` (offset, size, line)."""

    def __init__(self, path: str, entries: np.ndarray, cache_file: Optional[str] = None):
        self.path = path
        self.entries = entries.view(np.ndarray)  # the same mapped pages; indexing it makes no memmap object
        self.cache_file = cache_file
        self._jsonl = path.endswith('.jsonl')
        self._fd = os.open(path, os.O_RDONLY)  # opened now: forked ranks' DataLoader workers read the same file

    def __len__(self) -> int:
        return len(self.entries)

    def line(self, i: int) -> int:
        return int(self.entries[i, 2])

    def read(self, i: int) -> bytes:
        """The bytes of entry ``i``. The file was opened with the index: a forked DataLoader worker reads through that
        descriptor (``pread``, no shared position), so a file replaced meanwhile (``sed -i``, an editor) is not read."""
        if self._fd is None:  # unpickled (a spawned process)
            self._fd = os.open(self.path, os.O_RDONLY)
        offset, size, line = (int(x) for x in self.entries[i])
        lead = 1 if offset else 0
        got = os.pread(self._fd, size + lead + 1, offset - lead)  # the byte before and after it too
        before, body, after = got[:lead], got[lead:lead + size], got[lead + size:]
        if self._jsonl:
            whole = (before in (b'', b'\n') or (offset == len(BOM) and before == BOM[-1:])) and \
                after in (b'', b'\n') and len(body) == size and b'\n' not in body
        else:
            whole = before in (b'[', b',') and after in (b',', b']')
        if not whole:
            cache = f'; delete its index {self.cache_file} if the file changed under the same size and time' \
                if self.cache_file else ''
            raise AnnotationChanged(
                f'{self.path}: changed after its samples were indexed ({"line" if self._jsonl else "item"} {line} '
                f'is no longer {size} bytes at byte {offset}): an annotation file must not change while a run reads '
                f'it; write new data to a new file, or start the run again to index the file anew{cache}')
        return body

    def __getstate__(self):
        return dict(path=self.path, entries=self.entries, cache_file=self.cache_file, _jsonl=self._jsonl, _fd=None)

    def __del__(self):
        if getattr(self, '_fd', None) is not None:
            os.close(self._fd)
            self._fd = None


def source_index(path: str, cache_dir: Optional[str]) -> SourceIndex:
    """The index of ``path``: memory-mapped from ``cache_dir`` (built there once per node, under a file lock, by the
    first process to ask), or scanned in memory when there is no cache folder or it cannot be written."""
    if not cache_dir:
        return SourceIndex(path, scan(path))
    file = os.path.join(cache_dir, f'index-{index_key(path)}.npy')
    entries = node_once(file, lambda: load_array(file), lambda: _build(path, file), f'the index of {path}')
    return SourceIndex(path, entries, file)


def _build(path: str, file: str) -> np.ndarray:
    entries = scan(path)
    try:
        save_array(file, entries)
    except OSError:
        return entries
    return load_array(file)
