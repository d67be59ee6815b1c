"""The folder a conversion writes (``tools/convert_to_official.py``'s OUT_DIR): checked before the model is built
(:func:`check_out_dir`), claimed while the conversion runs (:func:`claimed`), written beside it and moved in whole
(:func:`written_whole`), and what a killed conversion left beside it put right by the next
(:func:`recover_leftovers`)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Callable, Optional

from xtuner_plugins.engine.lockfile import LOCK_NAME
from xtuner_plugins.filemodes import as_plain_files
from xtuner_plugins.links import leads_nowhere

from .files import Log, _print


#: what a training work folder holds (checkpoints, MMEngine's pointer to the last one, the run lock)
TRAINING_FILES = ('*.pth', 'last_checkpoint', LOCK_NAME)


def training_file(folder: str) -> Optional[str]:
    """The first file in ``folder`` or below that marks a training work folder (:data:`TRAINING_FILES`), or None."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            if any(fnmatch.fnmatch(name, pattern) for pattern in TRAINING_FILES):
                return os.path.join(root, name)
    return None


def check_out_dir(out_dir: str, inputs, overwrite: bool, log: Log = _print) -> str:
    """The folder to write (``out_dir``, or the folder it links to); refuses one that is an input, holds an input
    or lies inside one, one that holds a training run's files (``--overwrite`` never deletes a work folder), and
    a non-empty one without ``overwrite``, and one through a symbolic link that leads nowhere
    (``links.leads_nowhere``). What a killed conversion left beside it is put right first
    (:func:`recover_leftovers`)."""
    nowhere = leads_nowhere(out_dir)
    if nowhere:
        raise ValueError(f'OUT_DIR {out_dir} {nowhere.words}; ' + ('a conversion never makes a link\'s target: make '
                         'that folder first, or give another OUT_DIR' if nowhere.missing else 'give another OUT_DIR'))
    out = os.path.realpath(out_dir)
    recover_leftovers(out, log)
    for path in inputs:  # by path parts: '/' holds every input ('/' + os.sep would not prefix one)
        if os.path.commonpath([out, path]) in (out, path):
            raise ValueError(f'OUT_DIR {out_dir} is, holds or lies inside an input ({path}); choose another folder')
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'OUT_DIR {out_dir} exists and is not a folder')
    above = os.path.dirname(out)  # the folder the temporary copy is made in: checked before the model is built
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f'OUT_DIR {out_dir} cannot be made: {above} is a file, not a folder')
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f'OUT_DIR {out_dir} cannot be made: {above} is not writable here')
    found = training_file(out) if os.path.isdir(out) else None
    if found:
        raise ValueError(f'OUT_DIR {out_dir} holds a training run\'s files ({found}); a conversion never replaces a '
                         'training work folder, --overwrite or not: choose another folder')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f'OUT_DIR {out_dir} is not empty; pass --overwrite to replace its contents')
    not_ours = not_a_conversion(out) if os.path.isdir(out) else None
    if not_ours:
        raise ValueError(f'OUT_DIR {out_dir} is not a converted folder ({not_ours}); --overwrite replaces an earlier '
                         f'conversion only (a converted config.json or .gguf files, no subfolders), never a folder of '
                         f'other files: choose another folder, or empty it yourself')
    return out


def _claim(out: str, pid: int) -> str:
    """The file a conversion into ``out`` writes beside it while it runs (its host and pid): what it leaves when
    killed is recognised by it, not by its name alone."""
    return out.rstrip(os.sep) + f'.converting-{pid}'


def _claimed_here(out: str, pid: int) -> Optional[bool]:
    """Whether conversion ``pid``'s claim beside ``out`` is this machine's (None: no claim, or not a claim)."""
    try:
        with open(_claim(out, pid), encoding='utf-8') as f:
            claim = json.load(f)
        return claim['host'] == socket.gethostname() and claim['pid'] == pid
    except (OSError, ValueError, KeyError, TypeError):
        return None


_held: set = set()   # the claims this process holds (:func:`claimed` nests)


@contextlib.contextmanager
def claimed(out: str):
    """Hold this process's claim of ``out`` (:func:`_claim`) for the block, from before the model is built to the
    end: a second conversion into ``out`` while another one's claim is alive is refused. Two conversions into one
    folder otherwise each passed the start's check, and the later one to finish replaced the other's finished
    folder, ``--overwrite`` or not."""
    claim = _claim(out, os.getpid())
    if claim in _held:
        yield
        return
    os.makedirs(os.path.dirname(claim), exist_ok=True)   # OUT_DIR's parent, made as the conversion would
    try:
        with open(claim, 'w', encoding='utf-8') as f:
            json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}, f)
    except BaseException:   # a full disk: the error is the caller's one line, and no empty claim is left behind
        with contextlib.suppress(OSError):
            os.remove(claim)
        raise
    _held.add(claim)
    keep = False
    try:
        other = _other_conversion(out)
        if other:
            raise ValueError(f'another conversion is writing {out} ({other}); wait for it to end, or choose another '
                             'folder')
        yield
    except BaseException as exc:   # a stop that cut the replaced folder's removal short: the claim names what is
        keep = getattr(exc, 'leftover', None) is not None   # left for the next conversion to remove
        raise
    finally:
        _held.discard(claim)
        if not keep:
            os.remove(claim)


def _other_conversion(out: str) -> Optional[str]:
    """Another live conversion's claim of ``out``, in words (a claim of another machine cannot be checked: it
    counts), or None. This machine's gone conversions' claims were removed by :func:`recover_leftovers`."""
    parent, base = os.path.split(out)
    claims = re.compile(re.escape(base) + r'\.converting-(\d+)$')
    elsewhere = None   # this machine's running conversion named first, whatever the names' order (it was by pid)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        found = claims.match(name)
        pid = int(found.group(1)) if found else None
        if pid is None or pid == os.getpid():
            continue
        here = _claimed_here(out, pid)
        if here and _running(pid):
            return f'pid {pid} on this machine'
        if here is False and elsewhere is None:
            elsewhere = (f'{os.path.join(parent, name)} claims it for a conversion on another machine; remove that '
                         'file once that conversion is over')
    return elsewhere


def recover_leftovers(out: str, log: Log) -> None:
    """What a conversion killed outright (SIGKILL, a power cut: no ``except`` ran) left beside ``out``, put right
    before another starts (:func:`written_whole`'s names): ``OUT.tmp-PID``, written in part, is removed;
    ``OUT.old-PID``, the earlier conversion moved aside just before the new one was to move in, is moved back where
    ``out`` is missing, else removed (the new one went in, as asked; or a stop cut its removal short). Only for a
    conversion whose claim (:func:`_claim`) says it ran on this machine, as a PID no process holds now
    (:func:`_gone`): a folder of the user's named alike (``OUT.old-20241127``) or another machine's running
    conversion is left alone. Each said."""
    parent, base = os.path.split(out)
    names = sorted(os.listdir(parent)) if base and os.path.isdir(parent) else []
    left = re.compile(re.escape(base) + r'\.(tmp|old)-(\d+)$')
    for name in names:
        found = left.match(name)
        path = os.path.join(parent, name)
        if not found or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = int(found.group(2))
        here = _claimed_here(out, pid)
        if not here:
            whose = 'no conversion claimed it' if here is None else 'another machine\'s conversion claimed it'
            log(f'{path}: named as a conversion\'s leftover, but {whose}; left as it is')
            continue
        if not _gone(out, pid):
            continue
        if found.group(1) == 'old' and not os.path.lexists(out):
            os.replace(path, out)
            log(f'{path}: the earlier conversion, moved aside by a conversion that was killed (pid '
                f'{pid}); moved back to {out}')
        elif found.group(1) == 'old':
            shutil.rmtree(path)
            log(f'{path}: what was left of the folder a conversion replaced, stopped or killed (pid {pid}) before it '
                'removed it; removed')
        else:
            shutil.rmtree(path)
            log(f'{path}: left by a conversion that was killed (pid {pid}); removed')
    claims = re.compile(re.escape(base) + r'\.converting-(\d+)$')
    for name in names:   # the claims of this machine's conversions that are gone (their folders put right above)
        found = claims.match(name)
        if found and _claimed_here(out, int(found.group(1))) and _gone(out, int(found.group(1))):
            os.remove(os.path.join(parent, name))


def _gone(out: str, pid: int) -> bool:
    """Whether conversion ``pid`` of this machine into ``out`` is over: no process holds ``pid``, or it is this
    process's, which holds no claim of ``out`` now (an earlier conversion of this process, or of one whose pid this
    one was given since, stopped with a leftover it named: :func:`written_whole`)."""
    return not _running(pid) or (pid == os.getpid() and _claim(out, pid) not in _held)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):   # another user's process; a number no pid can be
        return True
    return True


def not_a_conversion(folder: str) -> Optional[str]:
    """Why the non-empty ``folder`` is not what a conversion writes, naming what it holds; None for a conversion or an
    empty folder. A conversion holds no subfolder and either ``.gguf`` files or a ``config.json`` whose
    ``model_type`` is one of the converted formats (``folder.FOLDER_FORMATS``): a plain transformers model (its
    LLM saved with ``save_pretrained``), or a download with its README, is not one."""
    from xtuner_plugins.models.folder import FOLDER_FORMATS
    names = sorted(os.listdir(folder))
    if not names:
        return None
    subfolders = [n + os.sep for n in names if os.path.isdir(os.path.join(folder, n))]
    if subfolders:
        return f'it holds {", ".join(subfolders[:3])}{", ..." if len(subfolders) > 3 else ""}'
    if any(n.endswith('.gguf') for n in names):
        return _not_a_gguf_pair(folder, names)
    if 'config.json' not in names:
        return f'it holds {", ".join(names[:3])}{", ..." if len(names) > 3 else ""} and no config.json'
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, AttributeError):
        return 'its config.json does not read as a JSON object'
    if model_type not in FOLDER_FORMATS:
        return (f'its config.json is of model_type {model_type!r}, not one a conversion writes '
                f'({", ".join(sorted(FOLDER_FORMATS))})')
    docs = [n for n in names if n.lower().startswith(('readme', 'license')) or n.startswith('.git')]
    if docs:
        return f'it holds {", ".join(docs[:3])}, which a conversion never writes'
    others = [n for n in names if not written_by_conversions(n)]
    if others:   # a user's notes, results, a backup copy: the overwrite removed them with the old folder
        return (f'it holds {", ".join(others[:3])}{", ..." if len(others) > 3 else ""}, which a conversion never '
                f'writes (move it out first)')
    return None


#: what conversions write into a folder (every format; tokenizers save one of TOKENIZER_FILES and the files beside
#: it), besides the remote code (``remote_code.VLM_FILES``, ``projector.py``) and the weights' shards
CONVERSION_FILES = frozenset((
    'config.json', 'generation_config.json', 'preprocessor_config.json', 'processor_config.json',
    'video_preprocessor_config.json', 'chat_template.jinja', 'chat_template.json', 'model.safetensors',
    'model.safetensors.index.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
    'merges.txt', 'vocab.json', 'tokenizer.json', 'tokenizer.model', 'vocab.txt', 'tokenizer.tiktoken'))


def written_by_conversions(name: str) -> bool:
    """Whether a file of this name is one a conversion writes (:data:`CONVERSION_FILES`), so that ``--overwrite``
    may remove it with the folder it replaces."""
    from xtuner_plugins.remote_code import VLM_FILES
    return (name in CONVERSION_FILES or name in VLM_FILES or name == 'projector.py'
            or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', name) is not None)


def _not_a_gguf_pair(folder: str, names) -> Optional[str]:
    """Why ``names`` are not the two files a GGUF conversion into ``folder`` writes (``gguf.convert_staged``,
    named after the folder: ``NAME-TYPE.gguf`` and ``mmproj-NAME-TYPE.gguf``), or None."""
    base = os.path.basename(os.path.normpath(folder))
    mmproj = [n for n in names if n.startswith(f'mmproj-{base}-') and n.endswith('.gguf')]
    text = [n for n in names if n.startswith(f'{base}-') and n.endswith('.gguf')]
    if len(names) == 2 and len(mmproj) == 1 and len(text) == 1:
        return None
    return (f'it holds {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}, not the two files a GGUF '
            f'conversion into it writes ({base}-TYPE.gguf and mmproj-{base}-TYPE.gguf)')


def written_whole(out: str, write, moving_in: Optional[Callable] = None):
    """``write(tmp)`` into a temporary folder beside ``out``, moved into place only once it is whole: the old ``out``
    is moved aside, the new one moved in, then the old removed; a failure or an interrupt (Ctrl-C) before the new
    one is in removes the temporary folder and leaves ``out`` as it was (the old one moved back). Returns what
    ``write`` returns. ``moving_in((out, stat))``, called just before the move, gets the new folder's
    ``os.stat``: what the caller compares ``out`` with to know whether the new one is in (:func:`moved_in`).

    A stop once the new one is in (SIGTERM as Ctrl-C) is raised again after the old one is removed; when a second
    stop cut that short as well, the stop's ``leftover`` names what is left of it, and this conversion's claim
    stays beside ``out`` so that the next conversion into ``out`` removes it (:func:`recover_leftovers`)."""
    tmp, old = (out.rstrip(os.sep) + f'.{kind}-{os.getpid()}' for kind in ('tmp', 'old'))
    with claimed(out):   # before anything is written or moved (held already by a conversion from its start)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        stop = None
        try:
            result = write(tmp)
            as_plain_files(tmp)   # safetensors 0.8 writes its files 0600: unreadable to any other user
            if os.path.isdir(out):
                os.replace(out, old)
            if moving_in is not None:
                moving_in((out, os.stat(tmp)))
            os.replace(tmp, out)
        except BaseException as exc:
            if os.path.lexists(tmp):   # not moved in: out as it was
                if os.path.isdir(old) and not os.path.exists(out):
                    os.replace(old, out)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            stop = exc   # a stop just after the new one went in: the old one is removed first
        try:
            shutil.rmtree(old, ignore_errors=True)
        except KeyboardInterrupt as exc:   # (SIGTERM too): what is left of the old folder is removed before exit
            stop = stop or exc
            with contextlib.suppress(KeyboardInterrupt):
                shutil.rmtree(old, ignore_errors=True)
        if stop is not None:
            if os.path.lexists(old):
                stop.leftover = old
            raise stop
        if os.path.lexists(old):   # files of another user's that this one may not remove: said, not left silently
            print(f'warning: the replaced folder could not be removed whole ({old}: its files or folders are not '
                  f'this user\'s to remove); remove it yourself', file=sys.stderr)
    return result


def moved_in(moving) -> bool:
    """Whether ``out`` is the new folder :func:`written_whole` announced as ``moving`` (``(out, stat)``, or None)."""
    if moving is None:
        return False
    try:
        return os.path.samestat(os.stat(moving[0]), moving[1])
    except OSError:
        return False
