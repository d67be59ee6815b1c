"""This process's rank as its launcher gave it (:func:`launch_rank`), whether it is one task of a Slurm step
(``srun``) of several, and why such a task would train a run of its own: the standard library only, so that
``cli/local_launch.py`` (which imports no torch) checks it before it starts any rank. ``engine/runstart.py``
refuses the same for a run without a launcher (``train: refused: ...``). The tasks a node runs
(:func:`tasks_on_node`) are read here too, for the data's memory bound (``data/startcheck.py``) as for the GPUs'
check; ``engine/slurm.py`` holds the rest of what is read from Slurm.
"""

from __future__ import annotations

import re
from typing import List, Mapping, Optional


def launch_rank(env: Mapping[str, str]) -> int:
    """This process's global rank as its launcher gave it: ``RANK`` (torchrun, our launcher, MMEngine's slurm
    launcher once it ran), else ``SLURM_PROCID`` (a task of srun before the rendezvous), else 0."""
    for key in ('RANK', 'SLURM_PROCID'):
        value = env.get(key, '').strip()
        if value.isdigit():
            return int(value)
    return 0


def step_tasks(env: Mapping[str, str]) -> int:
    """The tasks of the Slurm step (``srun``) this process is one of; 0 outside a step (no Slurm, a batch script)
    and in the shell of ``srun --pty bash`` (``SLURM_PTY_PORT``: an interactive session of a job's allocation, where
    ``--ntasks-per-node=8`` is the usual way to ask for its GPUs, and what the shell starts is one command)."""
    if not env.get('SLURM_STEP_ID') or env.get('SLURM_PTY_PORT'):
        return 0
    for key in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS'):
        if env.get(key, '').strip().isdigit():
            return int(env[key])
    return 0


def step_problem(env: Mapping[str, str], launcher: str, local: bool = False) -> Optional[str]:
    """Why this process, one task of a Slurm step of several, would train a run of its own instead of being one
    rank of the step's run (``launcher`` ``none``; ``local``: it starts ranks of its own, ``--nproc-per-node``), the
    tasks' runs writing one work folder; None otherwise (``--launcher slurm``, torchrun on each node)."""
    tasks = step_tasks(env)
    if tasks < 2 or (launcher not in ('none', '', None) and not local):
        return None
    how = ('starts ranks of its own (--nproc-per-node, one node\'s launcher)' if local else
           'has no --launcher slurm, so each task would train alone')
    job = env.get('SLURM_JOB_ID', '?')
    return (f'task {env.get("SLURM_PROCID", "?")} of the {tasks} tasks srun started (job {job}, '
            f'step {env["SLURM_STEP_ID"]}) {how}: {tasks} runs into one work folder; give --launcher slurm (one task '
            f'per GPU: srun --ntasks-per-node=GPUS), or start one task (srun -n1 ... --nproc-per-node N)')


def expand_counts(text: str) -> List[int]:
    """Slurm's per-node counts, ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in filter(None, text.split(',')):
        m = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', part)
        if not m:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def tasks_on_node(env: Mapping[str, str]) -> Optional[int]:
    """Tasks of this step on this node (``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``, indexed by
    ``SLURM_NODEID``); None when Slurm did not say."""
    for key in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
        counts = expand_counts(env.get(key, ''))
        node = int(env.get('SLURM_NODEID', '0') or 0)
        if counts and node < len(counts):
            return counts[node]
    return None
