"""Start N training processes on this machine without importing torch in the launcher: one node's ``torchrun``.

Usage::

    python -m xtuner_plugins.cli.local_launch --nproc-per-node N [--master-addr A] [--master-port P] SCRIPT ARGS...
    python tools/train.py CONFIG --nproc-per-node N ...   (the same, each rank running tools/train.py)

``torchrun`` imports torch to start its ranks: 351 MiB of PSS measured on a 2-rank run whose floor is ~1.85 GiB
(benchmarks/RESULTS.md, "Data at scale"). This starts ``python SCRIPT ARGS...`` ``N`` times with the variables of
PyTorch's ``env://`` rendezvous as torchrun sets them for one node (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, and
``OMP_NUM_THREADS=1`` unless set); rank 0's ``init_process_group`` serves the store on the port.

* a rank that fails stops the others (SIGTERM to each rank's process group, SIGKILL ``STOP_GRACE_S`` later) and
  the launcher exits with that rank's code (128 + N for a rank killed by signal N), after one line naming every
  rank seen failed (ranks that ended between two looks, 0.1 s apart, are named together, lowest first);
* SIGINT and SIGTERM are passed on to every rank (each runs in a session of its own, so a terminal's Ctrl-C
  reaches a rank once), then the launcher waits for them as above;
* a rank is killed when the launcher dies, even by SIGKILL (``PR_SET_PDEATHSIG`` on Linux).

No restarts and no multi-node rendezvous: for those, torchrun. Importing this module imports no third-party
package (``xtuner_plugins/__init__`` adds only ``logging``, ``re`` and ``warnings``).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

STOP_GRACE_S = 15.0  # seconds a rank has to end after SIGTERM/SIGINT before SIGKILL
_PR_SET_PDEATHSIG = 1


def rendezvous_env(rank: int, nproc: int, addr: str, port: int, base: Mapping[str, str]) -> Dict[str, str]:
    """``base`` with the variables torchrun gives rank ``rank`` of ``nproc`` on one node."""
    env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK='0', GROUP_WORLD_SIZE='1', ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
               ROLE_NAME='default', MASTER_ADDR=addr, MASTER_PORT=str(port), XTUNER_PLUGINS_LAUNCHER='local_launch')
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def free_port(addr: str, port: int = 0) -> int:
    """``port`` (any free one when 0) after checking that it can be bound on ``addr``; OSError if not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, port))
        return s.getsockname()[1]


def _pdeathsig():
    """What a child runs between fork and exec: SIGKILL to it when the launcher dies (Linux; None elsewhere)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the launcher's own stop paths still apply
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it (a signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Ranks:
    """The started ranks; :meth:`signal_all` and :meth:`stop` reach every process of each rank's group."""

    def __init__(self, cmd: Sequence[str], nproc: int, addr: str, port: int):
        self.procs: List[subprocess.Popen] = []
        pdeathsig = _pdeathsig()
        for rank in range(nproc):
            self.procs.append(subprocess.Popen(list(cmd), env=rendezvous_env(rank, nproc, addr, port, os.environ),
                                               start_new_session=True, preexec_fn=pdeathsig))

    def codes(self) -> List[Optional[int]]:
        return [p.poll() for p in self.procs]

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, sig)  # the rank and its DataLoader workers
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
        """``sig`` to every rank still running, SIGKILL to what is left after ``grace`` s; waits for all."""
        if any(c is None for c in self.codes()):
            self.signal_all(sig)
        deadline = time.monotonic() + grace
        while any(c is None for c in self.codes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)  # also what a rank left behind in its group
        for p in self.procs:
            p.wait()


def launch(cmd: Sequence[str], nproc: int, addr: str = '127.0.0.1', port: int = 0,
           poll_s: float = 0.1, grace: float = STOP_GRACE_S) -> int:
    """Run ``cmd`` as ``nproc`` ranks until all ended; the first failure's exit code, else 0."""
    try:
        port = free_port(addr, port)
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE
        print(f'local_launch: --master-port {port} on {addr}: '
              f'{"address already in use (EADDRINUSE)" if taken else exc}: choose another port', file=sys.stderr)
        return 1
    received: List[int] = []

    def on_signal(sig, _frame):
        received.append(sig)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ranks = Ranks(cmd, nproc, addr, port)
        try:
            return _watch(ranks, received, poll_s, grace)
        finally:
            ranks.stop(signal.SIGKILL, 0)  # no-op when all ended; never leaves a rank behind
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(ranks: Ranks, received: List[int], poll_s: float, grace: float) -> int:
    while True:
        if received:
            sig = received[0]
            print(f'local_launch: {signal.Signals(sig).name} received: passed on to the {len(ranks.procs)} ranks',
                  file=sys.stderr, flush=True)
            ranks.stop(sig, grace)
            failed = [exit_code(c) for c in ranks.codes() if c]
            return failed[0] if failed else 128 + sig
        codes = ranks.codes()
        failed = [(rank, c) for rank, c in enumerate(codes) if c]
        if failed:   # seen in one look: several may have ended since the last (a loaded machine, a rank's peers)
            rank, code = failed[0]
            running = sum(c is None for c in codes)
            print(f'local_launch: {", ".join(f"rank {r} exited with code {exit_code(c)}" for r, c in failed)}'
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
