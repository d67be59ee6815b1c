"""Whether a source's images and videos are there, looked up at start-up: a wrong image folder is named before
training, in one line with the count and the folder, rather than met sample by sample (``missing_image``) once
training runs and summed up as "1 samples failed to load".

Every path is looked up (one ``stat`` each, no sample drawn) by the start-up check (``startcheck.py``), once per
node and cached with it: 100,000 paths took 0.2-0.3 s on a local ext4 disk, where the folder check that start-up
already does for them (:func:`~xtuner_plugins.data.image_io.resolve_image_path`, a ``realpath`` each) took 5.9 s. A
network file system adds its round trip per file to both.
"""

from __future__ import annotations

import os
from typing import Optional

from .image_io import near_miss
from .sources import DataSource

__all__ = ['missing_line']


def missing_line(src: DataSource, samples: int, videos: int, missing: int, where: str, gone: str) -> Optional[str]:
    """The line for the log about ``missing`` of a source's ``samples`` naming images or a video (``videos`` of them a
    video) that name a path with nothing there, the first at ``where`` (``FILE:LINE``) naming ``gone``; None when
    none is missing. Those samples are still counted and skipped when drawn, as any missing image.

    Raises:
        Refused: none of them is there (a wrong image folder), before training.
    """
    if not missing:
        return None
    noun = 'videos' if videos == samples else 'images or videos' if videos else 'images'
    folder = src.image_folder if src.image_folder is not None else src.base_dir
    root = os.path.abspath(folder)
    shown = os.path.relpath(gone, root) if os.path.commonpath([root, os.path.abspath(gone)]) == root else gone
    line = (f'{src.annotation}: {missing} of {samples} samples name {noun} not found under {folder}'
            + (' (the annotation file\'s folder: no image folder given)' if src.image_folder is None else '')
            + f' (first: {where}: {shown}{near_miss(gone) or _other_case(gone)})')
    if missing == samples:   # (Refused: one line at training's start, where it was a 40-line traceback)
        from xtuner_plugins.errors import Refused
        raise Refused(f'{line}: is the image folder right?{_other_folder(root, shown)} (train_dataloader.dataset.'
                      f'image_folders, --image-folder of tools/check_dataset.py, or the meta file\'s "root")')
    reasons = ' / '.join(r for r, n in (('missing_image', samples - videos), ('missing_video', videos)) if n)
    return f'{line}; each is skipped when drawn ({reasons})'


def _other_folder(root: str, shown: str) -> str:
    """'' or, when the first path not found is there under the folder's parent (paths that repeat the folder's last
    part) or under the folder without its first part (one folder too many), what to change."""
    if os.path.isabs(shown) or shown.startswith('..'):
        return ''
    parent, rest = os.path.dirname(root), shown.replace(os.sep, '/').partition('/')[2]
    if os.path.isfile(os.path.join(parent, shown)):
        return f' {shown} is there under {parent}: that is its folder'
    if rest and os.path.isfile(os.path.join(root, rest)):
        return f' {rest} is there under {root}: the paths name one folder too many'
    return ''


def _other_case(path: str) -> str:
    """'' or, for a missing path whose folder holds its name in other letter case (data made on a file system that
    ignores case), which: one listing of one folder, for the first path not found only."""
    folder, name = os.path.split(path)
    try:
        with os.scandir(folder or '.') as entries:
            found = next((e.name for e in entries if e.name.lower() == name.lower() and e.name != name), None)
    except OSError:
        return ''
    return f' ({found!r} is there: names differ in letter case here)' if found else ''
