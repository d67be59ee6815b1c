"""Where a path a tool writes into goes through a symbolic link that leads nowhere, in words.

A folder a tool is to make (a run's ``--work-dir``, a conversion's ``OUT_DIR``, a cache folder) may be, or lie
under, a symbolic link whose target is gone (a moved disk, an unmounted share) or that points at itself. There,
``os.makedirs`` made the link's target, parents and all (a conversion into a dangling link wrote
``/nonexistent/dir`` at the root), or failed in a traceback (``FileNotFoundError`` for a work folder under such a
link, after the models had loaded), or a loop failed once the whole model was converted (``Not a directory``).
:func:`leads_nowhere` finds it first, for each tool to refuse in its own words.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple, Optional


class Nowhere(NamedTuple):
    """Why a path leads nowhere: ``words`` follow the path ('is a symbolic link to T, which does not exist', 'lies
    under L, a symbolic link loop (L -> T -> ...)'); ``missing``: the link's target is not there (a folder to
    make), not a loop nor a link that cannot be followed."""
    words: str
    missing: bool


def leads_nowhere(path: str) -> Optional[Nowhere]:
    """Why ``path``, or a folder above it, is a symbolic link that leads nowhere (to nothing, or a loop); None when
    none is."""
    start = here = os.path.abspath(path)
    while True:
        if os.path.islink(here):
            try:
                os.stat(here)
            except OSError as exc:
                what = 'is' if here == start else f'lies under {here},'
                if exc.errno == errno.ELOOP:
                    return Nowhere(f'{what} a symbolic link loop ({here} -> {os.readlink(here)} -> ...)', False)
                why = 'does not exist' if exc.errno == errno.ENOENT else f'cannot be followed: {exc.strerror}'
                return Nowhere(f'{what} a symbolic link to {os.readlink(here)}, which {why}',
                               exc.errno == errno.ENOENT)
        if os.path.dirname(here) == here:
            return None
        here = os.path.dirname(here)
