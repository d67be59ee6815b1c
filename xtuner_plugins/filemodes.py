"""The mode a file this project writes gets: what a plain ``open`` gives (``0o666`` less the umask), whoever wrote it;
and a cache folder where the home folder cannot take one.

Two writers give less:

* ``tempfile.mkstemp``, through which checkpoints, caches and indexes are written atomically, makes its files 0600;
* safetensors 0.8 writes through a temporary file of its own (safetensors/safetensors#764), so every
  ``model.safetensors`` (``save_file``, and transformers' ``save_pretrained`` through it) is 0600 whatever the
  umask (safetensors/safetensors#782; its fix, #789, is not released). A converted folder's weights were then
  unreadable to every other user: a teammate, or a serving account (``PermissionError`` where the config read).

:func:`file_mode` is the mode; :func:`as_plain_files` gives it to a folder's files once they are written;
:func:`unreadable` says which files of a model folder this user cannot read (a folder written before, or by another
user), where transformers would say "No such file".

:func:`home_caches`: DeepSpeed, imported by MMEngine, makes Triton's cache in ``~/.triton`` as it is imported; with a
home that cannot be written (a container run under a user id without one, ``HOME=/nonexistent``) conversion,
chat, eval, serving and planning stopped there with a ``PermissionError`` traceback (plain training, which defers
DeepSpeed, did not).
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Optional


def umask() -> int:
    """This process's umask, read without changing it (Linux's ``/proc``), else by setting it back at once."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, ValueError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def file_mode() -> int:
    """The mode a plain ``open`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~umask()


def as_plain_files(folder: str) -> None:
    """Give every regular file under ``folder`` (written by this process: a conversion's staging folder, tiny models)
    :func:`file_mode`; links are left alone."""
    mode = file_mode()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def home_caches() -> None:
    """Point ``TRITON_CACHE_DIR``, where it is not set and ``~/.triton`` cannot be made or written, at a folder of
    this user's under the temporary folder: ``triton-UID``, made 0700, and used only while it is this user's and
    private (the cache holds pickles DeepSpeed loads: a folder another user made first would run their code), else a
    new private folder."""
    if os.environ.get('TRITON_CACHE_DIR'):
        return
    home = os.path.expanduser('~')
    triton = os.path.join(home, '.triton')
    if os.access(triton, os.W_OK | os.X_OK) if os.path.isdir(triton) else os.access(home, os.W_OK | os.X_OK):
        return
    base = os.path.join(tempfile.gettempdir(), f'triton-{os.getuid()}')
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
        private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    except OSError:
        private = False
    os.environ['TRITON_CACHE_DIR'] = os.path.join(base if private else tempfile.mkdtemp(prefix='triton-'), 'cache')


#: the files of a model folder that transformers reads (weights, configs, tokenizers, remote code): another file
#: there that this user cannot read (a README, notes) stops nothing
MODEL_FILES = ('.safetensors', '.bin', '.json', '.model', '.txt', '.tiktoken', '.jinja', '.py', '.pt', '.pth')


def unreadable(folder: str) -> Optional[str]:
    """Why this user cannot read a model folder's files (``None`` when every one reads): transformers and
    safetensors call a weight file without read permission "No such file or directory", and a broken link
    likewise; this names the files, their owner and mode."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        return f'{folder}: this user cannot list the folder ({_owner_mode(folder)})'
    broken = [e.name for e in entries if e.is_symlink() and not os.path.exists(e.path)]
    if broken:
        return f'{folder}: {", ".join(broken[:4])} {"is a broken link" if len(broken) == 1 else "are broken links"}'
    closed = [e for e in entries if e.is_file() and e.name.endswith(MODEL_FILES) and not os.access(e.path, os.R_OK)]
    if closed:
        named = ', '.join(f'{e.name} ({_owner_mode(e.path)})' for e in closed[:4])
        more = f' and {len(closed) - 4} more' if len(closed) > 4 else ''
        return (f'{folder}: this user (uid {os.getuid()}) cannot read {named}{more}; make them readable '
                f'(chmod a+r) or copy the folder')
    return None


def _owner_mode(path: str) -> str:
    info = os.stat(path)
    return f'owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}'
