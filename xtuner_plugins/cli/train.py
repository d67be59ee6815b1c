"""Train with XTuner's own train script, in this process, so the exit code is the run's.

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--deepspeed JSON|NAME] [--resume CKPT] [--cfg-options ...]
    python tools/train.py CONFIG --nproc-per-node 2 ...   (2 processes on this machine, no torchrun)
    torchrun --nproc_per_node=4 tools/train.py CONFIG --launcher pytorch --deepspeed deepspeed_zero2

The same options as ``xtuner train`` (it runs ``xtuner/tools/train.py``'s ``main``), with three differences:
``xtuner train`` exits 0 even when training crashed, this exits non-zero with the traceback and a closing
summary (``train: FAILED: ...``, the run's log, what to do), or with one line and no traceback for an error whose
message says it whole (``xtuner_plugins/errors.py``): ``train: refused: ...``, exit code 2, for a setting or an
input that cannot work (a model argument, a checkpoint that does not fit the config), ``train: FAILED: ...`` for
such a failure during training (an annotation file changed under the run, too many bad samples); and
``--resume work_dirs/<cfg>/iter_N.pth`` works under torch >= 2.6, where XTuner reads the checkpoint's seed with
``torch.load``'s new ``weights_only`` default, which refuses MMEngine checkpoints (they pickle training state
next to the weights) before any training code runs (it reads them as resume does: ``engine/resume_load.py``);
and ``--cfg-options`` are checked before anything loads: a variable of the config file (``llm_path=...``,
which changes nothing once the file is read), a key nothing reads (a misspelt setting of the model, the data
set, a hook, the loop: named with the closest valid ones) or a value of the wrong kind is refused in one line,
and so are training lengths that contradict each other (``max_epochs=3 max_iters=200``). Ctrl-C (SIGINT) ends
with one line instead of a traceback, exit code 130: ``train: interrupted at iteration N; last checkpoint PATH;
resume: COMMAND`` (the command run again with ``--resume`` of that checkpoint); SIGTERM (``kill``, ``timeout``,
systemd) ends the same way, ``train: stopped by SIGTERM at ...``, exit code 143, where no checkpoint is saved on it
first (``engine/preempt.py``: under Slurm, or ``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1``).

``--nproc-per-node N`` (N > 1, or 1 with ``--deepspeed``) runs this tool N times on this machine as the ranks of
one run (``--launcher pytorch``, the variables torchrun gives; ``MASTER_PORT`` in the environment sets the port)
from our launcher (``cli/local_launch.py``; torchrun's costs ~350 MiB), which on a machine without a GPU loads
the ranks' libraries once and forks the ranks from itself (:func:`rank_preload`; bad ``--cfg-options`` are then
refused once, before any rank starts); a rank that fails stops the others and its exit code is the launcher's.
Each process imports DeepSpeed and bitsandbytes only when the run uses them (``xtuner_plugins/deferred_imports.py``).
"""

import os
import signal
import sys
import time
import traceback
from typing import List, NoReturn
from unittest import mock

from xtuner_plugins.cli.train_args import (deepspeed_refusal, flag_values, nproc_option, options_refusal,
                                            resume_refusal, started_by_a_launcher, unpaired_refusal)
from xtuner_plugins.cli.train_closing import interrupted_line, next_steps
from xtuner_plugins.cli.train_failures import (config_import_hint, disk_refused, failure_message, lost_peer,
                                               lost_peer_line, quiet_disk_errors, recorded_source_hint, worker_death)


#: ``-h``/``--help``: XTuner's parser's options with this tool's own (``--nproc-per-node``, DeepSpeed's names),
#: printed before anything loads (XTuner's help took 14 s, with torch and a log line before it).
HELP = """\
usage: python tools/train.py CONFIG [--work-dir DIR] [--deepspeed NAME|JSON] [--resume CKPT] [--seed N]
                             [--cfg-options KEY=VALUE ...] [--nproc-per-node N]
                             [--launcher {none,pytorch,slurm,mpi}] [--local_rank N]

Train a stage with XTuner's own train script in this process: the exit code is the run's (0 done, 1 failed,
2 refused, 130 interrupted, 143 stopped by SIGTERM), and a failure ends with one line naming its cause, the log
and what to do.

positional arguments:
  CONFIG                a config file (configs/finetune_lora.py, ...) or an XTuner config name

options:
  -h, --help            show this help and exit
  --work-dir DIR        where the log and checkpoints go (default work_dirs/<config's name>); refused when it
                        cannot be written or lies inside a model folder the run reads
  --deepspeed NAME|JSON DeepSpeed: deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, deepspeed_zero3,
                        deepspeed_zero3_offload (XTuner's files), or the path of a .json file
  --resume CKPT         continue from a checkpoint, work_dirs/<config>/iter_N.pth (a file, not a folder); for
                        the work folder's last one: --cfg-options resume=True
  --seed N              the random seed (a resumed run keeps its checkpoint's)
  --cfg-options KEY=VALUE ...
                        change the config's settings, e.g. model.llm=PATH max_iters=200
                        train_dataloader.dataset.data_files="[a.jsonl,b.jsonl]"; each key is checked
                        before anything loads (a misspelt or unused key is refused with the closest valid ones);
                        no spaces, and no commas inside a path (MMEngine splits values at commas)
  --nproc-per-node N    run N processes on this machine as the ranks of one run, without torchrun
                        (MASTER_PORT sets the port); torchrun --nproc_per_node=N tools/train.py CONFIG
                        --launcher pytorch ... works too
  --launcher {none,pytorch,slurm,mpi}
                        how the ranks were started (torchrun: pytorch; srun: slurm, docs/distributed.md)
  --local_rank N, --local-rank N
                        set by older launchers

Ctrl-C stops with one line: the iteration, the last checkpoint and the command that resumes (exit code 130).
docs/training.md has the stages, their settings and what a failure says.
"""


def main() -> int:
    if '-h' in sys.argv[1:] or '--help' in sys.argv[1:]:
        print(HELP, end='')
        return 0
    from xtuner_plugins.malloc import run_under_jemalloc
    run_under_jemalloc()   # on a CPU: this command again under jemalloc, before torch loads (xtuner_plugins/malloc.py)
    nproc, rest = nproc_option(sys.argv[1:])
    refusal = deepspeed_refusal(rest)   # before any rank starts: each said it in a traceback
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from xtuner_plugins.deferred_imports import used_packages   # the standard library only: no torch here
    deepspeed = 'deepspeed' in used_packages(rest)
    if nproc is None and deepspeed and not started_by_a_launcher(rest):
        nproc = 1   # docs/training.md's `tools/train.py CONFIG --deepspeed NAME`: DeepSpeed, finding no launcher's
        # variables, looked for MPI's (a raw ModuleNotFoundError: mpi4py); one rank through the launcher instead
    if nproc is not None and (nproc > 1 or deepspeed):  # the launcher
        exit_now(launch_ranks(nproc, rest))   # (one DeepSpeed rank too: it needs the launcher's variables)
    sys.argv[1:] = rest
    with noting_interrupts():   # to the end: a signal after the first, or during the exit, is noted, not raised
        try:
            code = _train()
        except Exception:
            if not _INTERRUPTS:
                raise   # (a Ctrl-C turned into another error while the libraries load: as Ctrl-C itself, below)
            code = _stopped_early()
        except KeyboardInterrupt:   # Ctrl-C (or SIGTERM) while the libraries are still loading
            code = _stopped_early()
        _RUN['ending'] = True   # the outcome is decided: a signal from here on is noted, not raised
        # (the launcher stopping a failed rank's group ends its DataLoader workers too; multiprocessing's exit handler
        # ends them after a run that finished)
        _quiet_sigchld()
        exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` as a forked rank ends (``local_launch.exit_now``: threads joined, the atexit
    handlers run, then ``os._exit``), without the interpreter's teardown: the launcher after its ranks, a run that
    finished, stopped or failed.

    The teardown's garbage collections walk every object the libraries made: a toy run's exit came 1.4-1.7 s after
    its last line (0.07 s without), a launcher's 3.2 s after its line that the ranks ended (0.2-0.4 s without; an
    AMX Xeon, nothing else running), where a loaded CI machine read 24 s from a stalled rank's STALLED line to the
    launcher's end. A signal in the teardown ended a finished run with -15 or a KeyboardInterrupt's traceback.

    A Ctrl-C (or an error) raised inside ``backward()`` (activation checkpointing's saved-tensor hooks run Python
    there: the CPU default ``llm_grad_ckpt_layers='auto'``) leaves autograd nodes in the engine's thread-local ready
    queue; C++ destroys them at ``exit()``, after Python is finalised, and their hooks' destructors take the GIL of
    an interpreter that is gone: a segfault, exit code 139 after the right ``interrupted`` line (in 7 of 10
    tries; 0 of 4 without checkpointing; a gdb backtrace: ``__call_tls_dtors`` -> ``~ReadyQueue`` -> ...
    ``~PySavedVariableHooks`` -> ``gil_scoped_acquire`` -> ``sem_wait(NULL)``)."""
    from xtuner_plugins.cli import local_launch
    local_launch.exit_now(code)


#: the SIGINTs (and SIGTERMs) this process received (:func:`noting_interrupts`)
_INTERRUPTS: List[int] = []
#: the run's state as the signal handling reads it: its work folder once known; whether its closing line has been
#: printed; whether its outcome is decided (a signal then is noted, not raised); whether the libraries are being
#: imported (:func:`_load`: a SIGTERM is noted and raised after; raised inside an import whose C++ code called back
#: into Python, Triton's nanobind, it aborted the process: SIGABRT, ``terminate called after throwing an instance of
#: 'nanobind::python_error'``, 1 in 60 tries)
_RUN = {'work_dir': None, 'said': False, 'ending': False, 'loading': False}


def _quiet_sigchld() -> None:
    """SIGCHLD taken and dropped (the run is stopping): torch's DataLoader handler raised "DataLoader worker ... is
    killed by signal" for the workers the same signal ended. A handler, not ``SIG_DFL``: Python raises "Signal 17
    ignored due to race condition" for a SIGCHLD pending when its Python handler is removed."""
    signal.signal(signal.SIGCHLD, lambda sig, frame: None)


def _stopped_early() -> int:
    """A stop that escaped :func:`_train` (before training, or an error the stop turned into on the way out): the
    closing line, once and on rank 0, naming how far the run got."""
    if _RUN['work_dir'] is not None:
        return _interrupted(_RUN['work_dir'])
    if not _RUN['said'] and int(os.environ.get('RANK', '0')) == 0:
        _RUN['said'] = True
        print(f'\ntrain: {_stopped_by()} before training started; nothing saved', file=sys.stderr, flush=True)
    return _stop_code()


def _stopped_by() -> str:
    """How the run's closing line names its stop: ``stopped by SIGTERM`` or ``interrupted`` (Ctrl-C)."""
    return 'stopped by SIGTERM' if signal.SIGTERM in _INTERRUPTS else 'interrupted'


def _stop_code() -> int:
    """143 (128 + SIGTERM) for a run stopped by SIGTERM, 130 for Ctrl-C."""
    return 128 + signal.SIGTERM if signal.SIGTERM in _INTERRUPTS else 130


class noting_interrupts:
    """Within it, SIGINT raises KeyboardInterrupt as Python's own handler does, and is noted: code that catches
    every exception turns a Ctrl-C into another error (MMEngine's config formatting raises ``SyntaxError: Failed
    to format the config file`` from any exception of yapf; numpy, interrupted while it imports, raises
    ``ImportError: cannot load module more than once``), which :func:`_train` then reads as the interrupt it is.

    SIGTERM (``kill``, ``timeout``, systemd; a launcher passing on its own) is taken the same way, as
    :class:`~xtuner_plugins.signals.Terminated`, where nothing else handles it: its default ended the run at once
    without a word, where Ctrl-C said where it stopped and how to resume. Where a checkpoint is saved on SIGTERM
    (``engine/preempt.py``: under Slurm, or ``XTUNER_PLUGINS_SAVE_ON_SIGNAL=1``), that hook's handler holds it from
    the start of the run to its end: before that (the libraries loading, the model being built) it ends here."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        from xtuner_plugins.signals import Terminated, from_signal, sent_again_when_swallowed
        self.previous = {}

        def on_signal(sig, frame):
            _INTERRUPTS.append(sig)
            # the DataLoader workers the same signal reached end now: torch's SIGCHLD handler would raise "DataLoader
            # worker ... is killed by signal" inside the stop's handling (two ranks: a wrong closing line)
            _quiet_sigchld()
            if len(_INTERRUPTS) > 1 or _RUN['ending']:   # a stop under way, or the exit (its atexit handlers: the
                return   # run's lock released), is not cut short: a launcher stopping a rank that failed sends SIGTERM
            if sig == signal.SIGTERM and _RUN['loading']:
                return
            raise from_signal(Terminated(f'signal {sig}') if sig == signal.SIGTERM else KeyboardInterrupt(), sig)
        for sig, default in zip(self.SIGNALS, (signal.default_int_handler, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:   # ignored, or handled by the caller: left as it is
                self.previous[sig] = signal.signal(sig, on_signal)
        # a stop raised in a weakref callback or a __del__ (importlib's module locks) was printed and lost
        self.resent = sent_again_when_swallowed(taken_back=lambda sig: sig in _INTERRUPTS and _INTERRUPTS.remove(sig))
        self.resent.__enter__()
        return self

    def __exit__(self, *exc):
        self.resent.__exit__(*exc)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _load(argv) -> None:
    """The libraries a training process of ``argv`` imports before it reads its config."""
    from xtuner_plugins import deferred_imports
    deferred_imports.install(argv)  # before MMEngine is imported: DeepSpeed/bitsandbytes only when used
    import importlib
    for name in ('torch', 'xtuner_plugins.engine', 'xtuner.tools.train', 'xtuner_plugins.launch'):
        importlib.import_module(name)  # xtuner_plugins.engine: checkpoint patches; cfg-options, length at build


def rank_preload(argv):
    """For :func:`xtuner_plugins.cli.local_launch.launch`: the ranks' libraries loaded once in the launcher, which
    forks the ranks from itself, so the ranks share those pages (~585 MiB private a rank when each imports them,
    benchmarks/RESULTS.md, "Data at scale"); each rank then runs :func:`main`."""
    def preload():
        _load(list(argv))
        from xtuner.tools import train as xtuner_train

        unpaired = unpaired_refusal(argv)   # before XTuner's parser raises on them
        if unpaired:
            print(unpaired, file=sys.stderr)
            raise SystemExit(2)
        with mock.patch.object(sys, 'argv', ['train.py', *argv]):   # (-m local_launch: sys.argv[0] is not)
            args = xtuner_train.parse_args()   # a bad option: argparse's one message, once
        try:
            refusal = options_refusal(args, argv) or resume_refusal(getattr(args, 'resume', None))
        except Exception:  # noqa: BLE001 -- a config that fails to read: each rank says so as without a launcher
            refusal = None
        if refusal:   # once, before any rank starts, rather than from each rank
            print(refusal, file=sys.stderr)
            raise SystemExit(2)
        return main
    return preload


def _train() -> int:
    _RUN['loading'] = True
    try:
        _load(sys.argv[1:])
    finally:
        _RUN['loading'] = False
    if _INTERRUPTS:   # a Ctrl-C that an import caught and went on from, a SIGTERM held (noting_interrupts): stop
        raise KeyboardInterrupt
    from xtuner.tools import train as xtuner_train

    from xtuner_plugins.engine.resume_load import torch_load_for_resume
    read_seed = xtuner_train.get_seed_from_checkpoint

    def seed_from_checkpoint(path):
        # MMEngine / DeepSpeed checkpoints read as the runner's resume reads them: training state, not code
        with torch_load_for_resume():
            try:
                return read_seed(path)
            except (KeyError, TypeError, IndexError) as exc:   # XTuner's checkpoint['meta']['seed']: a traceback
                from xtuner_plugins.errors import Refused
                raise Refused(f'--resume {path}: not a checkpoint a training run saved (no {exc} in it: a weights '
                              f'file or a state dict?); resume from a run\'s iter_N.pth, or start from weights with '
                              f'model.pretrained_pth={path}') from None

    xtuner_train.get_seed_from_checkpoint = seed_from_checkpoint
    unpaired = unpaired_refusal(sys.argv[1:])   # XTuner's parser raised a ValueError traceback on them
    if unpaired:
        print(unpaired, file=sys.stderr)
        return 2
    args = xtuner_train.parse_args()
    if not os.path.isfile(args.config):
        print(f'train: refused: {args.config}: no such config file', file=sys.stderr)
        return 2
    refusal = options_refusal(args, sys.argv[1:]) or resume_refusal(getattr(args, 'resume', None))
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    started = time.time()
    work_dir = args.work_dir or os.path.join('work_dirs', os.path.splitext(os.path.basename(args.config))[0])
    _RUN['work_dir'] = work_dir
    from xtuner_plugins.signals import quiet_cut_descriptor_transfers
    quiet_cut_descriptor_transfers()   # (in the DataLoader workers forked from here)
    quiet_disk_errors()
    try:
        xtuner_train.main()
    except KeyboardInterrupt:  # Ctrl-C: where the run stopped and how to go on, no traceback
        return _interrupted(work_dir)
    except Exception as exc:  # the traceback first, then a short summary a person sees at the end
        if _INTERRUPTS:   # a Ctrl-C that code on the way turned into another error (noting_interrupts)
            return _interrupted(work_dir)
        from xtuner_plugins.errors import Refused, Stated
        if isinstance(exc, Refused):   # a setting or input the message names whole: one line
            message = failure_message(exc)
            print(f'train: refused: {message}{recorded_source_hint(message, sys.argv)}', file=sys.stderr)
            return 2
        hint = config_import_hint(exc, args.config)
        if hint:
            print(f'train: refused: {hint}', file=sys.stderr)
            return 2
        if lost_peer(exc):   # the rank that stopped first printed why; this one's traceback adds nothing
            line = lost_peer_line(exc)
            if line:
                print(line, file=sys.stderr)
            return 1
        died = worker_death(exc) or disk_refused(exc, work_dir)   # (where the process was says nothing of it)
        said = isinstance(exc, Stated) or died is not None
        if not said:   # a failure the message alone may not explain (a bug's report needs it)
            traceback.print_exc()
        print(f'\ntrain: FAILED: {died or f"{type(exc).__name__}: {failure_message(exc)}"}\n  '
              f'{next_steps(work_dir, started, traceback=not said)}', file=sys.stderr)
        return 1
    return 0


def _interrupted(work_dir: str) -> int:
    # (done by noting_interrupts' handler already; again for a stop it did not raise: SIGINT handled by a caller)
    _quiet_sigchld()
    if int(os.environ.get('RANK', '0')) == 0 and not _RUN['said']:
        _RUN['said'] = True
        print(f'\n{interrupted_line(work_dir, sys.argv, _stopped_by())}', file=sys.stderr, flush=True)
    return _stop_code()


def launch_ranks(nproc: int, argv) -> int:
    """Run this tool ``nproc`` times on this machine as the ranks of one run (``--launcher pytorch``), started by
    :mod:`xtuner_plugins.cli.local_launch` from this process, which does not import torch."""
    from xtuner_plugins.cli.local_launch import launch
    if 'RANK' in os.environ and 'LOCAL_RANK' in os.environ:
        print(f'train: --nproc-per-node {nproc} given to a process that is already rank {os.environ["RANK"]} of a '
              'launcher (torchrun, srun, local_launch): give one or the other', file=sys.stderr)
        return 2
    given = flag_values(argv)
    other = [g for g in given if g != 'pytorch']
    if other:
        print(f'train: --nproc-per-node {nproc} with --launcher {other[0]}: the ranks of --nproc-per-node are '
              'started with --launcher pytorch; leave --launcher out', file=sys.stderr)
        return 2
    script = os.path.abspath(sys.argv[0])
    here = os.path.abspath(__file__).rsplit('.', 1)[0]
    cmd = [sys.executable] + (['-m', __spec__.name] if script.rsplit('.', 1)[0] == here and __spec__ else [script])
    port = os.environ.get('MASTER_PORT', '').strip()   # the user's own port, as torchrun's --master-port
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        print(f'train: MASTER_PORT={port!r}: give a port number from 1 to 65535 for the ranks\' rendezvous, or '
              'unset MASTER_PORT for a free one', file=sys.stderr)
        return 2
    rank_argv = list(argv) + ([] if given else ['--launcher', 'pytorch'])
    return launch(cmd + rank_argv, nproc, port=int(port or 0), preload=rank_preload(rank_argv))


if __name__ == '__main__':
    sys.exit(main())
