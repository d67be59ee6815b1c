"""How ``tools/train.py`` (``cli/train.py``) names a failed run's cause in its closing line.

Each reader takes the exception that ended ``xtuner train``'s ``main`` and gives the line's words, or says it is
not theirs:

* :func:`failure_message`: the first line of any error, the worker's own for one a DataLoader worker raised;
* :func:`worker_death`: a DataLoader worker that ended without an error of its own (the out-of-memory killer, a
  signal from outside the run, a crash in native code); the line says which, and what to try;
* :func:`lost_peer`: a rank of several that lost another rank (the rank that stopped first says why; each
  node's first rank says so, :func:`lost_peer_line`);
* :func:`disk_refused`: a write the disk refused outside the checkpoints (the log, TensorBoard's or the scalars'
  file), which named no file and said nothing of the disk (and :func:`quiet_disk_errors`: such a write in a thread
  or a log handler in one line, not a traceback);
* :func:`config_import_hint`: a config importing its base by a package name that MMEngine cannot resolve;
* :func:`recorded_source_hint`: a vision encoder or LLM folder not found where the previous stage records one.
"""

import os
import re
import signal
from typing import Optional

#: what the collective backends say when another rank's process is gone (gloo, NCCL, the TCP store)
PEER_LOST = ('Connection closed by peer', 'Connection reset by peer', 'remote process exited or there was a network '
             'error', 'Broken pipe')

# torch's words for a worker that ended without raising (torch/utils/data: the SIGCHLD handler's check, in C++, and
# the loader's own when a worker's queue went quiet): "DataLoader worker (pid 6349) is killed by signal: Killed.",
# "... (pid 6349) exited unexpectedly with exit code 1. Details are lost ...", "... (pid(s) 6349, 6350) exited
# unexpectedly"
_KILLED = re.compile(r'DataLoader worker \(pid (\d+)\) is killed by signal: ([^.\n]*)')
_EXITED = re.compile(r'DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) exited unexpectedly(?: with exit code (-?\d+))?')

_FEWER = ('fewer train_dataloader.num_workers (each holds its own copy of what it decodes) or a smaller batch '
          'need less')
_IN_PROCESS = 'train_dataloader.num_workers=0 runs the loading in the training process, where its error is shown'


def failure_message(exc: BaseException) -> str:
    """The first line of the exception's message; for one a DataLoader worker raised, which torch re-raises as
    "Caught X in DataLoader worker process N." with the worker's traceback below, the worker's own message (a bad
    sample met while loading: the file, line and reason)."""
    text = str(exc)
    if 'Original Traceback' in text:
        name = type(exc).__name__ + ': '
        for line in reversed(text.splitlines()):
            if not line.startswith(' ') and name in line:
                return line.split(name, 1)[1]
    return text.splitlines()[0] if text else ''


def disk_refused(exc: BaseException, work_dir: str) -> Optional[str]:
    """The closing line's words for a run stopped by a write the disk refused (a full disk, a quota, a file-size
    limit: an OSError of that errno, in ``exc`` or what it was raised from) that no line of ours named (a checkpoint's
    is ``WriteFailed``, said whole): the file where known, the work folder's free space, and how to go on; None for
    any other error."""
    import errno
    import shutil
    seen = _disk_error(exc)
    if seen is None:
        return None
    where = f' writing {seen.filename}' if seen.filename else ''
    try:
        free = f'{shutil.disk_usage(work_dir if os.path.isdir(work_dir) else ".").free / 2 ** 20:.1f} MiB free'
    except OSError:
        free = 'its free space unknown'
    limit = ', and a file-size limit (ulimit -f) is set' if seen.errno == errno.EFBIG else ''
    return (f'{seen.strerror or seen}{where} (the run writes its log, its scalars and TensorBoard files and its '
            f'checkpoints under {work_dir}: its disk has {free}{limit}); make room, then --cfg-options resume=True '
            'continues from the last checkpoint')


def _disk_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OSError of a write the disk refused (full, a quota, a file-size limit) in ``exc`` or what it was raised
    from, unless a line of ours says it whole already (``Stated``: a checkpoint's ``WriteFailed``); else None."""
    import errno
    from xtuner_plugins.errors import Stated
    seen, depth = exc, 0
    while seen is not None and depth < 8 and not (isinstance(seen, OSError) and seen.errno in (
            errno.ENOSPC, errno.EDQUOT, errno.EFBIG)):
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return None if seen is None or depth >= 8 or isinstance(seen, Stated) else seen


def quiet_disk_errors() -> None:
    """A write the disk refused in a thread of the run (TensorBoard's event writer) or in a log handler printed its
    traceback above the closing line ('Exception in thread Thread-1: ... OSError: [Errno 28]', '--- Logging error
    ---' for each record after it): one line says it instead, once a file. The run stops at its next write of
    those files in the training thread (TensorBoard's writer raises its thread's error again; the closing line is
    :func:`disk_refused`'s); a log file that cannot be written loses its lines from there."""
    import logging
    import sys
    import threading
    said = set()

    def say(error: OSError, who: str, then: str) -> None:
        if (who, error.filename) not in said:
            said.add((who, error.filename))
            where = f', writing {error.filename}' if error.filename else ''
            print(f'train: {error.strerror or error} ({who}{where}): {then}', file=sys.stderr, flush=True)

    thread_hook = threading.excepthook

    def excepthook(args) -> None:
        error = _disk_error(args.exc_value)
        if error is None:
            return thread_hook(args)
        say(error, f'in thread {getattr(args.thread, "name", "?")}', 'the run stops when it next writes through it')

    handle = logging.Handler.handleError

    def handle_error(self, record) -> None:
        error = _disk_error(sys.exc_info()[1])
        if error is None:
            return handle(self, record)
        say(error, f'the log\'s {type(self).__name__}', 'the lines it logs from here are lost')

    threading.excepthook, logging.Handler.handleError = excepthook, handle_error


def worker_death(exc: BaseException) -> Optional[str]:
    """The closing line's words for a DataLoader worker that died (torch's ``RuntimeError``, raised in the training
    process wherever it was, so its traceback says nothing of the cause), or None for any other error.

    SIGKILL is what the kernel's out-of-memory killer sends; SIGTERM came from outside the run (the run's own stop
    ends its workers after the run's closing line); a bus error is most often ``/dev/shm`` full (a container's
    64 MiB default); another signal or an exit code is a crash in the worker, shown in full with no workers."""
    if not isinstance(exc, RuntimeError):
        return None
    chain, seen = [], exc   # (waiting on a worker's queue, torch raises 'exited unexpectedly' from the signal's error)
    while seen is not None and len(chain) < 8:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = '\n'.join(chain)
    killed = _KILLED.search(text)
    if killed:
        pid, name = killed.group(1), killed.group(2).strip()
        sig = _signal_named(name)
        if sig == signal.SIGKILL:
            return (f'a DataLoader worker (pid {pid}) was killed by SIGKILL: most often the out-of-memory killer '
                    f'(dmesg or journalctl -k names it); {_FEWER}')
        if sig == signal.SIGTERM:
            return (f'a DataLoader worker (pid {pid}) was stopped by SIGTERM from outside the run (to stop a run, '
                    'signal its training process, which then says how to resume)')
        if sig == signal.SIGBUS:
            return (f'a DataLoader worker (pid {pid}) ended with a bus error: most often the shared memory (/dev/shm) '
                    'is full, which passes the batches between the processes (a container\'s is 64 MiB unless '
                    f'given more: docker run --shm-size 8g); {_FEWER}')
        return f'a DataLoader worker (pid {pid}) crashed ({name or "killed by a signal"}); {_IN_PROCESS}'
    exits = list(_EXITED.finditer(text))
    exited = next((m for m in exits if m.group(2) is not None), exits[0] if exits else None)   # the code, if said
    if exited:
        pids, code = exited.group(1).strip(), exited.group(2)
        how = f'exited with code {code}' if code is not None else 'ended without a word'
        s = 's' if ',' in pids else ''
        return f'DataLoader worker{s} (pid{s} {pids}) {how}; {_IN_PROCESS}'
    return None


def _signal_named(name: str) -> Optional[int]:
    """The signal whose description (``strsignal``: 'Killed', 'Terminated', 'Bus error') is ``name``."""
    for sig in signal.Signals:
        if signal.strsignal(sig) == name:
            return sig
    return None


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a rank of a run of several losing another rank (which stopped first): a collective's
    or the store's error (torch raises them as ``RuntimeError``s), not this rank's own broken pipe (a
    ``BrokenPipeError`` writing a file, a log or a DataLoader worker's queue: its traceback is the run's cause)."""
    text = str(exc)
    return (int(os.environ.get('WORLD_SIZE', '1') or 1) > 1 and isinstance(exc, RuntimeError)
            and 'DataLoader worker' not in text and any(m in text for m in PEER_LOST))


def lost_peer_line(exc: BaseException, env=os.environ) -> Optional[str]:
    """The line of a rank that lost another (:func:`lost_peer`), on each node's first rank only (``LOCAL_RANK``
    0, or none given): every rank of a 64-rank run printed one, 63 lines that said the same over the one that said
    why."""
    if env.get('LOCAL_RANK', '0') not in ('0', ''):
        return None
    return (f'train: FAILED on rank {env.get("RANK", "?")}: another rank of the run stopped first (its own line, or '
            f'its launcher\'s, says why); this one then lost it (and so did the node\'s other ranks): '
            f'{type(exc).__name__}: {failure_message(exc)[:200]}')


def config_import_hint(exc: BaseException, config: str) -> Optional[str]:
    """The line for a config that imports another by a package name in ``read_base()`` (``from configs.x import
    *`` in a file outside the checkout): MMEngine looks such a name up as an installed package, through
    ``pkg_resources``, which this stack's setuptools no longer has (a ModuleNotFoundError naming it); None for
    anything else."""
    import traceback as tb
    if type(exc) is RuntimeError and not str(exc):
        return lazy_call_hint(exc)
    if not (isinstance(exc, ModuleNotFoundError) and exc.name == 'pkg_resources'):
        return None
    if not any('mmengine/config' in frame.filename.replace(os.sep, '/') for frame in tb.extract_tb(exc.__traceback__)):
        return None
    return (f'{config}: a base config imported by a package name in read_base() (from configs.NAME import *), which '
            'MMEngine reads as an installed package\'s: import it relative to the file (from .NAME import *, the '
            'file beside it, or from ..configs.NAME import * inside the checkout), or copy your config into the '
            'checkout\'s configs/ folder')


def lazy_call_hint(exc: BaseException) -> Optional[str]:
    """The line for a config that calls what it imports (``os.path.join(...)``) as it is read: MMEngine reads a
    config with imports lazily, each imported name a stand-in whose call raises a bare RuntimeError; the config's
    file and line of the call, or None for another RuntimeError."""
    import traceback as tb
    frames = tb.extract_tb(exc.__traceback__)
    if not frames or not frames[-1].filename.replace(os.sep, '/').endswith('mmengine/config/lazy.py'):
        return None
    called = next((f for f in reversed(frames) if '/mmengine/' not in f.filename.replace(os.sep, '/')), None)
    if called is None:
        return None
    return (f'{called.filename}: line {called.lineno} ({(called.line or "").strip()}) calls what the config '
            'imports, which MMEngine\'s reader of configs with imports cannot do as it reads the file (what a config '
            'imports is only named there): write the value out (a text, a number), or give it with --cfg-options')


_SOURCE = re.compile(r'model\.(vision_encoder|llm): ')


def recorded_source_hint(message: str, argv) -> str:
    """For a refusal of ``model.vision_encoder`` or ``model.llm`` (a folder not found: the config's default, where
    a next stage was given only ``model.pretrained_pth``), the folder that previous stage records:
    `` (CKPT, model.pretrained_pth, was trained with model.llm=DIR: give --cfg-options model.llm=DIR)``, or where it
    is gone too, that it is to be given where it is now; else ''."""
    found = _SOURCE.match(message)
    given = [a.split('=', 1)[1] for a in argv if a.startswith('model.pretrained_pth=')]
    if not found or not given or not os.path.exists(given[-1]):
        return ''
    key = found.group(1)
    try:
        from xtuner_plugins.models.lineage import read_lineage
        source = ((read_lineage(given[-1]) or {}).get('sources') or {}).get(key) or {}
    except (OSError, ValueError):
        return ''
    path = source.get('abspath') or source.get('path')
    if not isinstance(path, str):
        return ''
    if not os.path.exists(path):   # moved since: the user knows where (a colleague's copy, another machine)
        return (f' ({given[-1]}, model.pretrained_pth, was trained with model.{key}={path}, not there either: give '
                f'--cfg-options model.{key}=THE_FOLDER where it is now; its files are compared with the recorded ones)')
    return (f' ({given[-1]}, model.pretrained_pth, was trained with model.{key}={path}: give --cfg-options '
            f'model.{key}={path})')
