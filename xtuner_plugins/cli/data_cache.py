"""The data sets' cache: what it holds, what nothing has used for a while, and removing that.

Usage::

    python tools/data_cache.py                          # the default cache: its size, and what is unused 30+ days
    python tools/data_cache.py --prune                  # remove the entries unused for 30 days or more
    python tools/data_cache.py --prune --unused-days 0  # remove every entry no run is building now
    python tools/data_cache.py --cache-dir /scratch/cache --unused-days 7 --prune

Training keeps, per annotation file and settings, a byte index of its samples, the start-up check, the sample
lengths and a repeat's subset (``data/index.py``, ``startcheck.py``, ``lengths.py``) in the data set's
``cache_dir``, by default ``$XDG_CACHE_HOME/xtuner_plugins/lengths`` (``~/.cache/...``). An entry is keyed by the
file's path, size, times and inode and by the settings, so a file edited, moved or re-tokenised gets a new entry and
the old one stays: at InternVL's scale (tens of millions of samples, about 60 bytes each over the four) a few
edits leave gigabytes behind, in a home folder that may have a quota. Each start that reads an entry marks it used
(its file's modification time, or a mark of the user's own beside another user's file in a folder a group shares;
``data/nodepass.py``), so an entry unused for ``--unused-days`` belongs to no run of that time. Removing one is
safe at any time: a run started meanwhile that wanted it builds it again (its loaders read a missing file as no
cache), a running run keeps what it has mapped, and an entry a run is building now (its lock held) is skipped. Files a writer left half-written (``tmpXXXXXXXX.tmp``) go with the entries once a day old.
Only files of the names a cache writes are touched, and ``--prune`` refuses a folder that holds anything else (a
data folder given by mistake, whose images may be named by their hash as cache entries are).

Exit status 0, 2 for a bad argument or a cache folder that cannot be read.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

from xtuner_plugins.cli.tool_args import tool_error

PROG = 'data_cache'
#: an entry's files, each the name of one a cache writes: ``index-KEY.npy``, ``subset-KEY.npy`` and ``KEY.good.npy``,
#: ``KEY.check.json``, ``KEY.lengths.npy``, ``KEY.refs.npy``, ``KEY.ids.npy``, ``KEY.images.json``; the ``.npy``
#: ones a run builds under a lock with their ``.lock`` beside them, and the marks of use of users who may not set
#: their times (``.used-UID``: ``data/nodepass.py``)
_ENTRY = re.compile(r'^(?:(index-|subset-)([0-9a-f]{40})(\.npy(?:\.lock|\.used-\d+)?)|()([0-9a-f]{40})'
                    r'(\.(?:good|lengths)\.npy(?:\.lock|\.used-\d+)?|\.(?:refs|ids)\.npy|\.(?:check|images)\.json))$')
#: a writer's temporary file (``tempfile.mkstemp(suffix='.tmp')``: ``tmp`` and 8 characters)
_TEMPORARY = re.compile(r'^tmp[a-z0-9_]{8}\.tmp$')
_KINDS = {'index-': 'index', 'subset-': 'repeat subset', '': 'check and lengths'}
TMP_AGE_S = 86400.0   # a *.tmp file older than this is a dead writer's


@dataclass
class Entry:
    kind: str
    files: List[str] = field(default_factory=list)
    size: int = 0
    used: float = 0.0   # the newest modification time of its files (each use sets it)
    locks: List[str] = field(default_factory=list)


def read_entries(folder: str) -> Dict[str, Entry]:
    """The cache folder's entries by name (``index-KEY``, ``KEY``, ...), each with its files, size and last use."""
    entries: Dict[str, Entry] = {}
    with os.scandir(folder) as found:
        for item in found:
            match = _ENTRY.match(item.name)
            if not match or not item.is_file(follow_symlinks=False):
                continue
            groups = match.groups()
            prefix, key, suffix = groups[:3] if groups[1] else groups[3:]
            entry = entries.setdefault((prefix or '') + key, Entry(_KINDS[prefix or '']))
            st = item.stat(follow_symlinks=False)
            if suffix.endswith('.lock'):   # (created once: its time says nothing of the entry's use)
                entry.locks.append(item.path)
                continue
            entry.files.append(item.path)
            entry.size += st.st_size
            entry.used = max(entry.used, st.st_mtime)
    return entries


def stale_temporaries(folder: str, now: float) -> List[str]:
    """The ``*.tmp`` files of writers that died (a day old or more)."""
    with os.scandir(folder) as found:
        return [item.path for item in found if _TEMPORARY.match(item.name) and item.is_file(follow_symlinks=False)
                and now - item.stat(follow_symlinks=False).st_mtime >= TMP_AGE_S]


def foreign(folder: str) -> List[str]:
    """The names in ``folder`` that no cache writes (a folder, a file of another kind), sorted; not NFS's
    ``.nfsXXXX`` files (a removed file a process still has open: a running run's mapped entry)."""
    with os.scandir(folder) as found:
        return sorted(item.name for item in found if not item.name.startswith('.nfs') and not (
            (_ENTRY.match(item.name) or _TEMPORARY.match(item.name)) and item.is_file(follow_symlinks=False)))


def remove_entry(entry: Entry) -> bool:
    """Remove the entry's files, then its locks; False where a run holds one of its locks (building it now).
    ``OSError`` where a file cannot be removed (a cache folder this user may only read)."""
    held = []
    try:
        for lock in entry.locks:
            try:
                held.append(os.open(lock, os.O_RDONLY))
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:   # a file system without file locks: no run can hold one there
                pass
        for path in entry.files + entry.locks:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return True
    finally:
        for fd in held:
            os.close(fd)


def size_text(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} TiB'


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cache-dir', default=None,
                   help='the cache folder (a data set\'s cache_dir; default $XDG_CACHE_HOME/xtuner_plugins/lengths)')
    p.add_argument('--unused-days', type=float, default=30.0,
                   help='an entry no run has read for this many days is unused (default 30; 0: every entry)')
    p.add_argument('--prune', action='store_true', help='remove the unused entries (without it: only say what)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.unused_days >= 0:   # (NaN too)
        return tool_error(PROG, f'--unused-days must be 0 or more, got {args.unused_days}')
    if args.cache_dir is None:
        from xtuner_plugins.data.lengths import default_cache_dir
        args.cache_dir = default_cache_dir()
    folder = args.cache_dir
    if not folder:
        return tool_error(PROG, "--cache-dir '': give a folder (a data set's cache_dir)")
    from xtuner_plugins.links import leads_nowhere
    nowhere = leads_nowhere(folder)   # (was 'no cache there', exit 0)
    if nowhere:
        return tool_error(PROG, f'--cache-dir {folder} {nowhere.words}: no data set can cache there; give the '
                                'folder itself')
    if not os.path.exists(folder):
        print(f'{PROG}: {folder}: no cache there (nothing has been cached yet)')
        return 0
    now = time.time()
    try:
        entries = read_entries(folder)
        temporaries = stale_temporaries(folder, now)
        others = foreign(folder)
    except OSError as exc:
        return tool_error(PROG, f'{folder}: cannot be read: {exc.strerror or exc}')
    if others and args.prune:   # (a data folder given by mistake: its files named by their hash look like entries)
        return tool_error(PROG, f'{folder} holds {len(others)} file(s) or folder(s) no data cache writes ('
                                f'{", ".join(others[:3])}{", ..." if len(others) > 3 else ""}): not a data cache '
                                'folder, nothing removed; give --cache-dir the cache_dir of a data set')
    cutoff = now - args.unused_days * 86400
    unused = {name: e for name, e in entries.items() if e.used <= cutoff or not e.files}
    total = sum(e.size for e in entries.values())
    print(f'{PROG}: {folder}: {len(entries)} entries, {size_text(total)}'
          + (f' (and {len(others)} other file(s) or folder(s), no cache\'s: --prune refuses this folder)'
             if others else ''))
    by_kind: Dict[str, List[Entry]] = defaultdict(list)
    for entry in entries.values():
        by_kind[entry.kind].append(entry)
    for kind, kept in sorted(by_kind.items()):
        print(f'  {kind}: {len(kept)} entries, {size_text(sum(e.size for e in kept))}')
    days = f'{args.unused_days:g} days'
    freed = sum(e.size for e in unused.values())
    print(f'{PROG}: unused for {days} or more: {len(unused)} entries, {size_text(freed)}'
          + (f'; {len(temporaries)} file(s) a writer left half-written' if temporaries else ''))
    if not args.prune:
        if unused or temporaries:
            print(f'{PROG}: --prune removes them (safe while runs go on: one that needs an entry builds it again)')
        return 0
    removed = busy = 0
    try:
        for entry in unused.values():
            if remove_entry(entry):
                removed += 1
            else:
                busy += 1
        for path in temporaries:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    except OSError as exc:
        return tool_error(PROG, f'{exc.filename}: cannot be removed ({exc.strerror}); removed {removed} entries '
                                'before it: the cache folder is another user\'s, or read-only')
    left = sum(e.size for e in read_entries(folder).values())
    dead = f' and {len(temporaries)} half-written file(s)' if temporaries else ''
    print(f'{PROG}: removed {removed} entries{dead}' + (f'; {busy} skipped, a run building them now' if busy else '')
          + f'; the cache now holds {size_text(left)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
