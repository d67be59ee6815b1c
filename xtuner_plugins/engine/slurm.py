"""Training under Slurm: ``srun ... python tools/train.py CFG --launcher slurm`` (docs/distributed.md#slurm).

MMEngine's slurm launcher (``mmengine.dist.utils._init_dist_slurm``) takes each rank's place from Slurm:
``SLURM_PROCID`` (the rank), ``SLURM_NTASKS`` (the world size), ``SLURM_LOCALID`` (the GPU on its node),
``SLURM_NODELIST`` (``MASTER_ADDR``: its first host, by ``scontrol show hostname``, unless ``MASTER_ADDR`` is
set), and ``MASTER_PORT`` from the environment, else 29500. :func:`apply_slurm_patches` (called from
``runtime.py`` at import, before either runner starts its process group) wraps it:

* **a port per job**: without ``MASTER_PORT`` (nor ``env_cfg.dist_cfg.port``) the port is derived from
  ``SLURM_JOB_ID`` (:func:`job_port`), so two jobs sharing a node do not both take 29500; a requeued job keeps
  its id, and its port; rank 0 checks that port is free on its node first (:func:`master_port_problem`: jobs
  whose ids differ by a multiple of 10000 share one);
* **one line instead of a hang or a traceback** (``train: refused: ...``, exit code 2) when the run cannot
  start: ``--launcher slurm`` outside Slurm, a batch script with several tasks that runs the command itself
  instead of through ``srun`` (its one process would wait for the others forever), a node list ``scontrol``
  cannot resolve, a loopback ``MASTER_ADDR`` inherited by a step of several nodes (:func:`master_problem`), or
  more tasks on a GPU node than GPUs its tasks see (:func:`gpu_problem`); fewer tasks than GPUs is a warning (the
  rest stay idle);
* **no scontrol** (a container): ``MASTER_ADDR`` is read from the node list itself (:func:`first_host`);
* **on a CPU** ``torch.cuda.set_device`` is a no-op for the call (as for ``--launcher pytorch``, runtime.py's
  patch 1); the backend is the config's ``DIST_BACKEND``, gloo there;
* ``--launcher pytorch`` without torchrun's variables (``RANK``, ...; under srun, or alone): one line
  (:func:`pytorch_launch_problem`), not MMEngine's ``KeyError: 'RANK'`` traceback;
* a rank waiting at the rendezvous for one that never comes (a task that ended at start-up, srun without
  ``--kill-on-bad-exit=1``) stops after ``XTUNER_PLUGINS_RENDEZVOUS_TIMEOUT`` s with one line (``rendezvous.py``);
* each rank says where it is, one line: ``slurm: rank 1 of 16 (task 1 on node-a), master node-a:21234, job 1234``.

A stop asked by Slurm (scancel, preemption, the time limit, ``scontrol requeue``) saves a checkpoint first:
``preempt.py``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from typing import List, Mapping, Optional

from xtuner_plugins.slurm_step import tasks_on_node

_PATCH_MARK = '_xtuner_plugins_slurm_patch'
_applied: List[str] = []

PORT_BASE, PORT_SPAN = 20000, 10000  # 20000-29999: below Linux's ephemeral range (32768-60999)


def job_port(env: Mapping[str, str]) -> Optional[int]:
    """``MASTER_PORT`` of a job without one: ``20000 + SLURM_JOB_ID % 10000`` (None without a job id)."""
    job = env.get('SLURM_JOB_ID', '')
    return PORT_BASE + int(job) % PORT_SPAN if job.isdigit() else None


def gpu_problem(env: Mapping[str, str], gpus: int) -> Optional[str]:
    """Why the tasks of this node cannot have a GPU each (``gpus``: the GPUs a task sees), or None."""
    tasks = tasks_on_node(env)
    if tasks is None or tasks <= gpus:
        return None
    host = env.get('SLURMD_NODENAME') or env.get('HOSTNAME') or 'this node'
    seen = env.get('CUDA_VISIBLE_DEVICES')
    return (f'Slurm runs {tasks} tasks on {host} but each sees {gpus} GPU{"s" * (gpus != 1)}'
            f'{f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""}: one task per GPU is needed; ask for '
            f'--ntasks-per-node=N with --gpus-per-node=N (or --gres=gpu:N), not --gpus-per-task, which shows each '
            f'task its own GPU only')


def launch_problem(env: Mapping[str, str]) -> Optional[str]:
    """Why ``--launcher slurm`` cannot start here (outside a Slurm step, or the batch script itself), or None."""
    missing = [k for k in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST') if not env.get(k)]
    if missing:
        return (f'--launcher slurm needs the environment of a Slurm task ({", ".join(missing)} not set): start '
                f'the command with srun (srun -N NODES --ntasks-per-node=GPUS python tools/train.py CONFIG '
                f'--launcher slurm), or use torchrun with --launcher pytorch')
    counts = {k: env[k].strip() for k in ('SLURM_PROCID', 'SLURM_NTASKS')}
    if not all(v.isdigit() for v in counts.values()) or int(counts['SLURM_PROCID']) >= int(counts['SLURM_NTASKS']) \
            or not int(counts['SLURM_NTASKS']):   # rank 2 of 1 waited for its peers forever
        return (f'--launcher slurm: SLURM_PROCID={env["SLURM_PROCID"]!r} is no rank of SLURM_NTASKS='
                f'{env["SLURM_NTASKS"]!r} tasks (whole numbers, the rank below the count): an environment set by '
                f'hand or left from another step? start the command with srun')
    if not env.get('SLURM_STEP_ID') and int(env['SLURM_NTASKS']) > 1:
        return (f'--launcher slurm runs in the batch script of job {env.get("SLURM_JOB_ID", "?")} itself, one '
                f'process for {env["SLURM_NTASKS"]} tasks (it would wait for the others forever): start it with '
                f'srun in the script (srun python tools/train.py CONFIG --launcher slurm; tools/slurm/*.sbatch)')
    return None


def pytorch_launch_problem(env: Mapping[str, str]) -> Optional[str]:
    """Why ``--launcher pytorch`` cannot start here (none of torchrun's variables: MMEngine's ``KeyError: 'RANK'``
    traceback), or None."""
    missing = [k for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if not env.get(k)]
    if not missing:
        return None
    how = ('under srun, give --launcher slurm (srun sets the rank of each task)' if env.get('SLURM_PROCID') else
           'start it with torchrun (torchrun --nproc_per_node=N tools/train.py CONFIG --launcher pytorch), or '
           'with tools/train.py CONFIG --nproc-per-node N (no --launcher)')
    return f'--launcher pytorch needs the variables torchrun gives its ranks ({", ".join(missing)} not set): {how}'


def first_host(node_list: str) -> Optional[str]:
    """The first host of a Slurm host list, read as ``scontrol show hostnames`` reads it (``node[01-03,7]`` ->
    ``node01``, ``rack[1-2]-n[01-02]`` -> ``rack1-n01``, ``gpu-a7,cpu1`` -> ``gpu-a7``); None when it is not one."""
    depth, end = 0, len(node_list)
    for i, char in enumerate(node_list):  # the first entry: up to a comma outside brackets
        depth += (char == '[') - (char == ']')
        if depth < 0 or depth > 1:
            return None
        if char == ',' and depth == 0:
            end = i
            break
    entry = node_list[:end].strip()
    host = re.sub(r'\[\s*(\d+)(?:-\d+)?(?:,[\d,\-\s]*)?\]', lambda m: m.group(1), entry)
    return host if host and re.fullmatch(r'[A-Za-z0-9._-]+', host) else None


def master_addr(node_list: str) -> str:
    """The first host of ``node_list`` (``scontrol show hostnames``; where there is no ``scontrol``, as in many
    containers, :func:`first_host`); ValueError saying why it failed."""
    try:
        done = subprocess.run(['scontrol', 'show', 'hostnames', node_list], capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError:
        host = first_host(node_list)
        if host is None:
            raise ValueError(f'no scontrol here (a container?) and the node list {node_list!r} is not one this '
                             f'reads') from None
        return host
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f'scontrol show hostnames {node_list}: {exc}') from None
    hosts = done.stdout.split()
    if done.returncode != 0 or not hosts:
        said = '; '.join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise ValueError(f'scontrol show hostnames {node_list} failed (exit code {done.returncode}: '
                         f'{said or "no host"})')
    return hosts[0]


LOOPBACK = re.compile(r'(localhost(\.localdomain)?|127(\.\d{1,3}){3}|::1|0\.0\.0\.0)', re.IGNORECASE)


def nodes_of_step(env: Mapping[str, str]) -> int:
    """The nodes this step runs on (1 when Slurm does not say)."""
    for key in ('SLURM_STEP_NUM_NODES', 'SLURM_NNODES', 'SLURM_JOB_NUM_NODES'):
        if env.get(key, '').strip().isdigit():
            return int(env[key])
    return 1


def master_problem(env: Mapping[str, str]) -> Optional[str]:
    """Why a ``MASTER_ADDR`` the task inherited cannot be the master of this step (a loopback address on a step of
    several nodes: the other nodes' ranks would wait for a master on their own host, for the process group's
    timeout), or None."""
    addr, nodes = env.get('MASTER_ADDR', '').strip(), nodes_of_step(env)
    if nodes > 1 and LOOPBACK.fullmatch(addr):
        hosts = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_NODELIST')
        return (f'MASTER_ADDR={addr} is in the environment (from the shell or the batch script?) but this step runs on '
                f'{nodes} nodes ({hosts}): the ranks of the other nodes would wait for a master on their own host; '
                f'unset MASTER_ADDR (the first node of SLURM_NODELIST is then taken) or set it to that node\'s '
                f'address')
    return None


def master_port_problem(env: Mapping[str, str], port: Optional[int] = None, derived: bool = False) -> Optional[str]:
    """Why rank 0 cannot host the rendezvous on its port (in use on this node: another job's, as two jobs whose ids
    differ by a multiple of 10000 get one port, or another program's), or None. Checked on rank 0 only, which binds
    it: torch would fail there with a traceback, and the other ranks might reach the other job's rendezvous. A
    ``MASTER_PORT`` that is not a port number is refused on every rank. ``derived``: the port was taken from the job id (:func:`job_port`)."""
    given = str(port or env.get('MASTER_PORT') or 29500).strip()
    if not given.isdigit() or not 0 < int(given) < 65536:
        return f'MASTER_PORT={given} is not a port (a whole number from 1 to 65535)'
    if env.get('SLURM_PROCID') != '0':
        return None
    import errno
    import socket
    port = int(given)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: a requeued job's TIME_WAIT
        try:
            sock.bind(('', port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None  # torch says what else is wrong
    host = env.get('SLURMD_NODENAME') or os.uname().nodename
    whence = (f' (from job id {env.get("SLURM_JOB_ID")}: {PORT_BASE} + id % {PORT_SPAN}; jobs whose ids differ by a '
              f'multiple of {PORT_SPAN} share it)' if derived else '')
    return (f'port {port}{whence} is in use on {host}, where rank 0 hosts the rendezvous (another job or program '
            f'listens there): export MASTER_PORT to a free port from {PORT_BASE} to {PORT_BASE + PORT_SPAN - 1} in the '
            f'batch script, before srun')


def refuse_tasks(message: str) -> None:
    """One line per node (its first task), exit code 2 on every task (``runstart.refuse``'s form)."""
    if os.environ.get('SLURM_LOCALID', '0') in ('0', ''):
        print(f'train: refused: {message}', file=sys.stderr, flush=True)
    raise SystemExit(2)


def prepare_slurm_env(port: Optional[int] = None) -> None:
    """Check this task's environment and set ``MASTER_PORT``/``MASTER_ADDR`` where Slurm gives none (module
    docstring); refuses in one line what cannot start."""
    import torch
    env = os.environ
    problem = launch_problem(env)
    if problem is None and torch.cuda.is_available():
        problem = gpu_problem(env, torch.cuda.device_count())
    if problem:
        refuse_tasks(problem)
    derived = port is None and 'MASTER_PORT' not in env and job_port(env) is not None
    if derived:
        env['MASTER_PORT'] = str(job_port(env))
    problem = master_problem(env) or master_port_problem(env, port, derived)
    if problem:
        refuse_tasks(problem)
    if 'MASTER_ADDR' not in env:
        try:
            env['MASTER_ADDR'] = master_addr(env['SLURM_NODELIST'])
        except ValueError as exc:
            refuse_tasks(f'{exc}; set MASTER_ADDR to the first node\'s address')


def _where(port: Optional[int]) -> str:
    env = os.environ
    host = env.get('SLURMD_NODENAME') or os.uname().nodename
    return (f'slurm: rank {env["SLURM_PROCID"]} of {env["SLURM_NTASKS"]} (task {env.get("SLURM_LOCALID", "?")} '
            f'on {host}), master {env.get("MASTER_ADDR")}:{port or env.get("MASTER_PORT", 29500)}, '
            f'job {env.get("SLURM_JOB_ID", "?")}')


def _patch_init_dist_pytorch() -> bool:
    """``--launcher pytorch`` without torchrun's variables: one line (:func:`pytorch_launch_problem`)."""
    from mmengine.dist import utils as dist_utils
    original = dist_utils._init_dist_pytorch
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def _init_dist_pytorch(*args, **kwargs):
        problem = pytorch_launch_problem(os.environ)
        if problem:
            refuse_tasks(problem)
        return original(*args, **kwargs)

    setattr(_init_dist_pytorch, _PATCH_MARK, True)
    dist_utils._init_dist_pytorch = _init_dist_pytorch
    return True


def _idle_gpus_note() -> Optional[str]:
    import torch
    tasks = tasks_on_node(os.environ)
    if not torch.cuda.is_available() or tasks is None or tasks >= torch.cuda.device_count():
        return None
    return (f'slurm: WARNING: {tasks} tasks on this node see {torch.cuda.device_count()} GPUs: '
            f'{torch.cuda.device_count() - tasks} stay idle (--ntasks-per-node=GPUs uses them all)')


def _patch_init_dist_slurm() -> bool:
    from mmengine.dist import utils as dist_utils
    original = dist_utils._init_dist_slurm
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def _init_dist_slurm(backend, port=None, init_backend='torch', **kwargs):
        from xtuner_plugins.engine.rendezvous import rendezvous_timeout, rendezvous_watch
        prepare_slurm_env(port)
        try:
            seconds = rendezvous_timeout(os.environ)
        except ValueError as exc:
            refuse_tasks(str(exc))
        where = _where(port)
        print(where, file=sys.stderr, flush=True)
        note = _idle_gpus_note()
        if note and os.environ.get('SLURM_LOCALID') == '0':
            print(note, file=sys.stderr, flush=True)
        # on a CPU, torch.cuda.set_device is a no-op inside it (engine/runtime.py's CPU patches wrap it too)
        with rendezvous_watch(where.partition('slurm: ')[2], seconds):   # a rank that never comes: one line
            return original(backend, port=port, init_backend=init_backend, **kwargs)

    setattr(_init_dist_slurm, _PATCH_MARK, True)
    dist_utils._init_dist_slurm = _init_dist_slurm
    return True


def apply_slurm_patches() -> List[str]:
    """Wrap MMEngine's slurm launcher once (module docstring); returns the names newly applied."""
    newly = [p.__name__.lstrip('_') for p in (_patch_init_dist_slurm, _patch_init_dist_pytorch) if p()]
    _applied.extend(newly)
    return newly
