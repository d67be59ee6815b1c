"""Start N training processes on this machine, sharing what they load: one node's ``torchrun``, in less memory.

Usage::

    python -m xtuner_plugins.cli.local_launch --nproc-per-node N [--master-addr A] [--master-port P] SCRIPT ARGS...
    python tools/train.py CONFIG --nproc-per-node N ...   (its ranks forked once their libraries are loaded)

``torchrun`` imports torch to start its ranks: 351 MiB of PSS measured on a 2-rank run whose floor is ~1.85 GiB,
and each rank's own imports are ~585 MiB private (benchmarks/RESULTS.md, "Data at scale"). This starts ``N``
ranks with the variables of PyTorch's ``env://`` rendezvous as torchrun sets them for one node (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; ``OMP_NUM_THREADS`` unless set: the usable cores shared among the ranks, where
torchrun gives one each); rank 0's ``init_process_group`` serves
the store on the port. Each rank is

* given a ``preload`` (:func:`launch`; ``tools/train.py --nproc-per-node N`` gives ``cli/train.py``'s
  ``rank_preload``): forked from the launcher once the launcher has imported the rank's libraries
  (``gc.freeze()`` after), so their pages are shared by the launcher and every rank instead of loaded N times,
  as a DataLoader's workers share their rank's. Not where
  forking is unsafe (:func:`fork_refusal`: a GPU device on the machine, whose driver must not be initialised
  before a fork; a thread in the launcher after loading) nor with ``XTUNER_PLUGINS_FORK_RANKS=0``: one line says
  so and the ranks start as below;
* otherwise ``python SCRIPT ARGS...`` started anew, the launcher importing no torch.

* a rank that fails stops the others (SIGTERM to each rank's process group, SIGKILL ``STOP_GRACE_S`` later) and
  the launcher exits with that rank's code (128 + N for a rank killed by signal N), after one line naming every
  rank seen failed (ranks that ended between two looks, 0.1 s apart, are named together, lowest first);
* SIGINT and SIGTERM are passed on to every rank (each runs in a session of its own, so a terminal's Ctrl-C
  reaches a rank once), then the launcher waits for them as above;
* a rank is killed when the launcher dies, even by SIGKILL (``PR_SET_PDEATHSIG`` on Linux).

No restarts and no multi-node rendezvous: for those, torchrun. Importing this module imports no third-party
package (``xtuner_plugins/__init__`` adds only ``logging``, ``re`` and ``warnings``); the launcher imports torch
only in the forked case, to share it.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Union

from xtuner_plugins.signals import parent_death_signal
from xtuner_plugins.slurm_step import step_problem

STOP_GRACE_S = 15.0  # seconds a rank has to end after SIGTERM/SIGINT before SIGKILL
#: after SIGINT, seconds the other ranks have once one rank has ended: a rank blocked in a collective (gloo, NCCL)
#: or in the rendezvous on a peer that has gone never returns to Python, which is where Ctrl-C is seen
PEER_GRACE_S = 5.0
FORK_ENV = 'XTUNER_PLUGINS_FORK_RANKS'  # 0: ranks of a preloading script start as new processes (exec)
GPU_DEVICES = ('/dev/nvidiactl', '/dev/kfd')   # NVIDIA or ROCm devices on this machine: no forked ranks
#: set (where not set) while the launcher loads the ranks' libraries: no thread that would forbid the fork
LOADING_ENV = {
    # pyarrow's jemalloc purging thread (XTuner imports pyarrow through HF datasets; the ranks use neither)
    'JE_ARROW_MALLOC_CONF': 'background_thread:false',
    # OpenBLAS (numpy's, scipy's) starts OMP_NUM_THREADS - 1 threads when loaded: numpy's BLAS is single-threaded
    # in forked ranks, torch's own threads (OMP_NUM_THREADS) start in each rank as before
    'OPENBLAS_NUM_THREADS': '1',
}
#: loads a rank's libraries in the launcher and returns the rank's entry (run in each forked rank: its exit code)
Preload = Callable[[], Callable[[], int]]


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a Slurm step's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def threads_per_rank(nproc: int, cores: Optional[int] = None) -> str:
    """``OMP_NUM_THREADS`` for each of ``nproc`` ranks where it is not set: the usable cores shared among them, at
    least one. torchrun gives each rank one thread, which left 14 of 16 cores idle for 2 ranks training on a CPU;
    more ranks than cores get one each (said: :func:`oversubscribed`)."""
    return str(max(1, (cores or usable_cores()) // max(1, nproc)))


def oversubscribed(nproc: int, cores: Optional[int] = None) -> Optional[str]:
    """The warning for more ranks than usable cores (each rank's thread then waits on the others' for a core, and
    each holds its own copy of the model), or None."""
    cores = cores or usable_cores()
    if nproc <= cores:
        return None
    return (f'local_launch: warning: {nproc} ranks on {cores} usable cores: ranks wait on each other for a core, '
            f'and each holds its own model in memory; --nproc-per-node {cores} or fewer trains as fast in less')


def rendezvous_env(rank: int, nproc: int, addr: str, port: int, base: Mapping[str, str]) -> Dict[str, str]:
    """``base`` with the variables torchrun gives rank ``rank`` of ``nproc`` on one node (``OMP_NUM_THREADS``:
    :func:`threads_per_rank`)."""
    env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK='0', GROUP_WORLD_SIZE='1', ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
               ROLE_NAME='default', MASTER_ADDR=addr, MASTER_PORT=str(port), XTUNER_PLUGINS_LAUNCHER='local_launch')
    env.setdefault('OMP_NUM_THREADS', threads_per_rank(nproc))
    return env


def free_port(addr: str, port: int = 0) -> int:
    """``port`` (any free one when 0) after checking that it can be bound on ``addr``; OSError if not. As torch's
    store binds it (``SO_REUSEADDR``): the port of a run that just ended, its sockets in TIME_WAIT, is free (it was
    refused as in use for a minute after each run with a fixed MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        return s.getsockname()[1]


def _pdeathsig():
    """What a child runs between fork and exec: SIGKILL to it when the launcher dies (Linux; None elsewhere: the
    launcher's own stop paths still apply)."""
    return parent_death_signal(signal.SIGKILL)


def fork_refusal() -> Optional[str]:
    """Why ranks may not be forked from this process (None: they may): threads would not survive a fork, holding
    what locks they held; a GPU driver initialised here would be unusable in the ranks."""
    if os.environ.get(FORK_ENV, '') == '0':
        return f'{FORK_ENV}=0'
    if not os.path.isdir('/proc/self/task') or not hasattr(os, 'fork'):
        return 'not Linux'
    if any(os.path.exists(p) for p in GPU_DEVICES):
        return 'a GPU is present'
    blas = os.environ.get('OPENBLAS_NUM_THREADS', '1').strip()
    if blas != '1':   # known before loading: nothing loaded here for nothing (LOADING_ENV sets 1 where unset)
        return f"OPENBLAS_NUM_THREADS={blas}: OpenBLAS' threads would start in the launcher"
    threads = len(os.listdir('/proc/self/task'))
    return f'{threads} threads in the launcher after loading' if threads > 1 else None


class Forked:
    """A rank forked from the launcher, read as :class:`subprocess.Popen` is (``pid``, ``poll``, ``wait``)."""

    def __init__(self, entry: Callable[[], int], argv: Sequence[str], env: Mapping[str, str], pdeathsig):
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:   # None: the launcher started with that descriptor closed (>&-)
                stream.flush()
        self.returncode: Optional[int] = None
        launcher = os.getpid()
        ready, told = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(ready)
            _run_forked(entry, argv, env, pdeathsig, launcher, told)  # never returns
        os.close(told)
        try:   # as Popen returns once its child exec'd: a signal passed on from now on finds the rank's group and
            os.read(ready, 1)   # handlers (EOF: the rank ended before that, its code is read as any other's)
        finally:
            os.close(ready)

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _run_forked(entry, argv, env, pdeathsig, launcher: int, told: int) -> None:
    """The forked rank: a session of its own and its own signal handlers (then ``told``, the launcher's pipe, is
    written and closed), the rank's variables and argv, ``entry()``, then ``os._exit``."""
    code = 1
    try:
        os.setsid()
        if pdeathsig is not None:
            pdeathsig()
        if os.getppid() != launcher:   # the launcher died before the line above
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)   # the launcher's handlers are not the rank's
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(told, b'1')
        os.close(told)
        os.environ.clear()
        os.environ.update(env)
        sys.argv[:] = list(argv)
        sys.exit(entry())   # what it returns read as the interpreter reads `sys.exit(main())`: None 0, text 1
    except SystemExit as exc:   # as the interpreter reads it: None 0, a number itself, anything else printed, 1
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:   # noqa: B036 -- a rank's end, whatever ended it, is its exit code
        traceback.print_exc()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:   # never back into the launcher's frames this process was forked in
        exit_now(int(code) & 0xFF if isinstance(code, int) else 1)


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` as an interpreter's exit ends it, less its teardown: non-daemon threads
    joined, the atexit handlers (logs, worker processes, a run lock's release), the streams flushed, then
    ``os._exit``. For a forked rank (never back into the launcher's frames), and for ``tools/train.py`` after a run
    that stopped (``cli/train.py``: the teardown could crash)."""
    try:
        getattr(threading, '_shutdown', lambda: None)()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):   # a closed pipe, a closed stream: nothing more to say there
                pass
    finally:
        os._exit(code)


def _how(returncode: int) -> str:
    """`` (stopped by SIGTERM)`` / `` (interrupted)`` for a rank's exit code of a stop (a rank's own line is rank
    0's alone), else ''."""
    return {143: ' (stopped by SIGTERM)', 130: ' (interrupted)'}.get(exit_code(returncode), '')


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it (a signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Ranks:
    """The started ranks; :meth:`signal_all` and :meth:`stop` reach every process of each rank's group."""

    def __init__(self, cmd: Sequence[str], nproc: int, addr: str, port: int,
                 entry: Optional[Callable[[], int]] = None):
        self.procs: List[Union[subprocess.Popen, Forked]] = []
        pdeathsig = _pdeathsig()
        for rank in range(nproc):
            env = rendezvous_env(rank, nproc, addr, port, os.environ)
            self.procs.append(Forked(entry, _rank_argv(cmd), env, pdeathsig) if entry is not None else
                              subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=pdeathsig))

    def codes(self) -> List[Optional[int]]:
        return [p.poll() for p in self.procs]

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, sig)  # the rank and its DataLoader workers
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S,
             peers: Optional[float] = None) -> List[int]:
        """``sig`` to every rank still running, SIGKILL to what is left after ``grace`` s (or ``peers`` s after
        the first rank that ended, when given); waits for all. Returns the ranks that were killed."""
        if any(c is None for c in self.codes()):
            self.signal_all(sig)
        deadline, ended = time.monotonic() + grace, False   # (a rank that ended already counts: the loop sees it)
        while any(c is None for c in self.codes()) and time.monotonic() < deadline:
            if peers is not None and not ended and any(c is not None for c in self.codes()):
                ended, deadline = True, min(deadline, time.monotonic() + peers)
            time.sleep(0.05)
        killed = [rank for rank, c in enumerate(self.codes()) if c is None]
        self.signal_all(signal.SIGKILL)  # also what a rank left behind in its group
        for p in self.procs:
            p.wait()
        return killed


def _rank_argv(cmd: Sequence[str]) -> List[str]:
    """``sys.argv`` of a forked rank of ``cmd`` (``python SCRIPT ARGS`` or ``python -m MODULE ARGS``)."""
    if cmd[1] == '-m':
        import importlib.util
        spec = importlib.util.find_spec(cmd[2])
        return [spec.origin if spec and spec.origin else cmd[2], *cmd[3:]]
    return list(cmd[1:])


def preloaded(preload: Optional[Preload], nproc: int) -> Optional[Callable[[], int]]:
    """The rank's entry after ``preload`` ran here, to fork the ranks from this process; None (ranks exec'd)
    without a preload or where forking is refused (:func:`fork_refusal`, said in one line)."""
    if preload is None:
        return None
    refusal = fork_refusal()
    if refusal is None:   # read by OpenMP when torch loads: before, as for a rank
        os.environ.setdefault('OMP_NUM_THREADS', threads_per_rank(nproc))
        loading = {k: v for k, v in LOADING_ENV.items() if k not in os.environ}
        os.environ.update(loading)
        started = time.monotonic()
        try:
            entry = preload()
        finally:   # read when the libraries loaded; the ranks get the variables a rank started anew gets
            for key in loading:
                os.environ.pop(key, None)
        refusal = fork_refusal()
        if refusal is None:
            gc.collect()
            gc.freeze()   # the loaded objects out of the ranks' collections: their pages stay shared
            print(f'local_launch: the ranks\' libraries loaded in {time.monotonic() - started:.1f} s; the ranks are '
                  'forked from here, sharing them', file=sys.stderr, flush=True)
            return entry
    print(f'local_launch: the ranks start as new processes ({refusal})', file=sys.stderr, flush=True)
    return None


def launch(cmd: Sequence[str], nproc: int, addr: str = '127.0.0.1', port: int = 0,
           poll_s: float = 0.1, grace: float = STOP_GRACE_S, preload: Optional[Preload] = None) -> int:
    """Run ``cmd`` as ``nproc`` ranks until all ended; the first failure's exit code, else 0. With ``preload``,
    the ranks are forked from this process after it ran ``preload`` (:func:`preloaded`). Refused (exit code 2) in
    one of several tasks of a Slurm step: each would start a run of its own (``slurm_step.py``)."""
    problem = step_problem(os.environ, 'pytorch', local=True)
    if problem:
        if os.environ.get('SLURM_LOCALID', '0') in ('0', ''):   # one line a node
            print(f'local_launch: refused: {problem}', file=sys.stderr, flush=True)
        return 2
    try:
        port = free_port(addr, port)
    except (OSError, OverflowError) as exc:   # (OverflowError: a port over 65535)
        why = ('address already in use (EADDRINUSE)' if getattr(exc, 'errno', None) == errno.EADDRINUSE else
               'no such port (0 to 65535)' if isinstance(exc, OverflowError) else str(exc))
        print(f'local_launch: port {port} on {addr} (--master-port, or MASTER_PORT): {why}: choose another port',
              file=sys.stderr)
        return 1
    warning = oversubscribed(nproc)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from xtuner_plugins.signals import sigterm_as_interrupt, stop_code
    try:
        with sigterm_as_interrupt():   # (SIGTERM here ended the launcher at once, without a word)
            entry = preloaded(preload, nproc)
    except KeyboardInterrupt as stop:
        how = 'stopped by SIGTERM' if stop_code(stop) == 143 else 'interrupted'
        print(f'\nlocal_launch: {how} while loading the ranks\' libraries; no rank started', file=sys.stderr,
              flush=True)
        return stop_code(stop)
    received: List[int] = []

    def on_signal(sig, _frame):
        received.append(sig)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ranks = Ranks(cmd, nproc, addr, port, entry)
        try:
            return _watch(ranks, received, poll_s, grace)
        finally:
            ranks.stop(signal.SIGKILL, 0)  # no-op when all ended; never leaves a rank behind
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if entry is not None:
            gc.unfreeze()   # the ranks ended: what was loaded is freed as usual at exit


def _watch(ranks: Ranks, received: List[int], poll_s: float, grace: float) -> int:
    while True:
        if received:
            sig = received[0]
            name = signal.Signals(sig).name
            print(f'local_launch: {name} received: passed on to the {len(ranks.procs)} ranks',
                  file=sys.stderr, flush=True)
            # SIGINT ends a rank where it is; SIGTERM may save a checkpoint first (engine/preempt.py): its full grace
            killed = ranks.stop(sig, grace, peers=PEER_GRACE_S if sig == signal.SIGINT else None)
            if killed and len(killed) < len(ranks.procs) and sig == signal.SIGINT:
                print(f'local_launch: rank {", ".join(map(str, killed))} still running {PEER_GRACE_S:g} s after '
                      f'another rank ended on {name}: killed (waiting on the ended rank in a collective, it could '
                      'not see the signal)', file=sys.stderr, flush=True)
            elif killed:   # (a rank stopped, SIGSTOP, or blocked in a call that does not return)
                print(f'local_launch: rank {", ".join(map(str, killed))} still running {grace:g} s after {name}: '
                      'killed (SIGKILL); the last complete checkpoint stays, and resume=True in the work folder '
                      'continues from it', file=sys.stderr, flush=True)
            failed = [exit_code(c) for c in ranks.codes() if c]
            stops = [c for c in failed if c in (130, 143)]   # the ranks killed (137) were stopped by the signal too
            return (stops or ([] if killed else failed) or [128 + sig])[0]
        codes = ranks.codes()
        failed = [(rank, c) for rank, c in enumerate(codes) if c]
        if failed:   # seen in one look: several may have ended since the last (a loaded machine, a rank's peers)
            # a rank stopped by a signal (kill PID of one rank) is the cause; its peers then fail on the lost rank
            stops = [(r, c) for r, c in failed if exit_code(c) in (130, 143)]
            rank, code = (stops or failed)[0]
            running = sum(c is None for c in codes)
            print(f'local_launch: {", ".join(f"rank {r} exited with code {exit_code(c)}{_how(c)}" for r, c in failed)}'
                  + (f': stopping the {running} other rank(s)' if running else ''), file=sys.stderr, flush=True)
            ranks.stop(signal.SIGTERM, grace)
            return exit_code(code)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(poll_s)


def parser(prog: str = 'python -m xtuner_plugins.cli.local_launch') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
    p.add_argument('--nproc-per-node', '--nproc_per_node', type=int, required=True, metavar='N')
    p.add_argument('--master-addr', '--master_addr', default='127.0.0.1')
    p.add_argument('--master-port', '--master_port', type=int, default=0, help='default: a free port')
    p.add_argument('script')
    p.add_argument('args', nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.nproc_per_node < 1:
        p.error(f'--nproc-per-node {args.nproc_per_node}: give 1 or more processes')
    if not os.path.isfile(args.script):
        p.error(f'{args.script}: no such file')
    return launch([sys.executable, args.script, *args.args], args.nproc_per_node, args.master_addr,
                  args.master_port)


if __name__ == '__main__':
    sys.exit(main())
