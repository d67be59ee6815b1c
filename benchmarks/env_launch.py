"""A one-node launcher that does not import torch, for ``bench_data_scale.py --launcher env`` (measurement only).

``torchrun`` imports torch to start its ranks: 351 MiB of PSS, 293 MiB of it private, of a run's ~1.85 GiB floor
on this machine. This starts ``N`` ranks of ``SCRIPT ARGS...`` with the variables of PyTorch's ``env://``
rendezvous (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...) and
``OMP_NUM_THREADS=1`` as torchrun sets them, stops them all when one fails or on SIGTERM, and exits with the
first failure's code. No restarts, no multi-node rendezvous: what a product launcher would add.

    python benchmarks/env_launch.py N SCRIPT ARGS...
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def main(argv) -> int:
    n, cmd = int(argv[0]), argv[1:]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   GROUP_RANK='0', ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(n), MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port))
        env.setdefault('OMP_NUM_THREADS', '1')
        procs.append(subprocess.Popen([sys.executable, '-u'] + cmd, env=env))

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.terminate()
    signal.signal(signal.SIGTERM, stop)
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c]
        if failed or all(c is not None for c in codes):
            stop()
            for p in procs:
                p.wait()
            return failed[0] if failed else 0
        time.sleep(0.2)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
