"""The AVX-512 BF16 attention kernel's C library (``csrc/cpu_attention.c``): compiled, cached and loaded.

It is compiled on first use with the system's C compiler (``$CC``, cc or gcc; about a second) into
``$XDG_CACHE_HOME/xtuner_plugins/kernels`` (``~/.cache`` without it), named by a hash of its source, compiler and
flags, moved into place whole (ranks building at once each write their own file); a cached build that does not load
is built again, and one in a folder another user could write is not loaded. Without a compiler, or if the build
fails, :func:`library` is None and one warning says why (attention then runs on torch's SDPA).

The torch operators over it are ``cpu_attention_ops.py``; where it is used, ``cpu_attention.py``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from typing import List, Optional

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_attention.c')
FLAGS = ('-O3', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mavx512bf16', '-mfma', '-fPIC', '-shared',
         '-pthread')


def cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'xtuner_plugins', 'kernels')


def _compiler() -> Optional[List[str]]:
    """The C compiler's command: ``$CC`` (which may carry arguments, ``ccache gcc``), else cc or gcc."""
    try:
        given = shlex.split(os.environ.get('CC', ''))
    except ValueError as e:
        raise RuntimeError(f'$CC ({os.environ["CC"]!r}) does not read as a command: {e}') from e
    for command in (given, ['cc'], ['gcc']):
        if command and shutil.which(command[0]):
            return [shutil.which(command[0]), *command[1:]]
    return None


def build(directory: Optional[str] = None) -> str:
    """The compiled kernel's path, compiled first if this source and these flags were not yet
    (``RuntimeError`` naming the compiler's message when it fails)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError('no C compiler found ($CC, cc or gcc)')
    with open(SOURCE, 'rb') as f:
        source = f.read()
    key = hashlib.sha256(source + ' '.join(compiler + list(FLAGS)).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    path = os.path.join(directory, f'cpu_attention-{key}.so')
    if os.path.isfile(path):
        _check_private(path)
        return path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _check_private(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.cpu_attention-', suffix='.so')
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *FLAGS, '-o', tmp, SOURCE], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f'{" ".join(compiler)} failed on {SOURCE}: {done.stderr.strip()[-2000:]}')
        os.replace(tmp, path)   # whole or not at all: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check_private(path: str) -> None:
    """A library this process loads runs as it: refused (``RuntimeError``) where another user could have put it
    there, its file or its folder another user's or writable by others (a shared ``$XDG_CACHE_HOME``). One of
    this user's that others may write (an earlier version made the folder under umask 002) is made private
    first."""
    for where in (path, os.path.dirname(path)) if os.path.isfile(path) else (path,):
        st = os.stat(where)
        if st.st_uid == os.getuid() and st.st_mode & 0o022:
            try:
                os.chmod(where, st.st_mode & ~0o022)
                st = os.stat(where)
            except OSError:
                pass
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeError(f'{where} is {"not yours" if st.st_uid != os.getuid() else "writable by others"}: '
                               'a kernel built there is not loaded (set XDG_CACHE_HOME to a folder of your own)')


def _load(path: str) -> ctypes.CDLL:
    """The kernel at ``path``; ``AttributeError`` for a library without its functions, closed again (``dlopen`` of
    the same path would otherwise return that one, not the kernel built in its place)."""
    lib = ctypes.CDLL(path)
    if not all(hasattr(lib, name) for name in ('attn_fwd', 'attn_bwd')):
        import _ctypes
        _ctypes.dlclose(lib._handle)
        raise AttributeError(f'{path} is a library without the kernel\'s functions')
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (with one warning) when it cannot be built here. A cached build that does not load
    (cut short by a crash) is built again once."""
    try:
        path = build()
        try:
            lib = _load(path)
        except (OSError, AttributeError):
            os.remove(path)
            lib = _load(build())
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(f"the CPU attention kernel is not available ({e}); attention runs on torch's SDPA")
        return None
    p, i, a, f, n = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.c_int
    lib.attn_fwd.argtypes = [p, p, p, p, p, i, i, i, i, i, i, a, a, a, a, f, n, n, p, i]
    lib.attn_bwd.argtypes = [p, p, p, p, p, p, p, p, p, i, i, i, i, i, i, a, a, a, a, a, a, f, n, n, p, i]
    lib.attn_fwd.restype = lib.attn_bwd.restype = ctypes.c_int
    return lib
