"""Training in a subprocess: the command, its environment, the port, and what came of it; the one launcher of
the demo and the tests (:func:`run_train`, :func:`run_local_nodes`).

* **command** (:func:`train_command`): ``python TRAIN_SCRIPT CFG`` (XTuner's ``xtuner/tools/train.py`` by
  default) for one process; for several processes on one node without DeepSpeed, ``python tools/train.py CFG ...
  --nproc-per-node N`` (``MASTER_PORT`` in the environment: the tool's own launcher, which forks the ranks after
  loading their libraries once and defers DeepSpeed and bitsandbytes), or for another script ``python -m
  xtuner_plugins.cli.local_launch --nproc-per-node --master-addr --master-port TRAIN_SCRIPT CFG ... --launcher
  pytorch``;
  ``python -m torch.distributed.run --nnodes --node_rank --nproc_per_node --master_addr --master_port
  TRAIN_SCRIPT CFG ... --launcher pytorch`` for several nodes or DeepSpeed; or the real ``xtuner train CFG``
  with ``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``ADDR``, ``PORT`` in the environment, from which XTuner's
  CLI builds the same ``torchrun`` command;
* **environment** (:func:`train_env`): no variables of an enclosing launcher, Hugging Face offline, caches
  under one folder when given, the repository root on ``PYTHONPATH``, the venv's ``bin`` first on ``PATH``;
* **port**: a free one, and a rerun on a fresh one when the launcher found it taken;
* **outcome** (:func:`job_outcome`: a :class:`~xtuner_plugins.outcome.TrainOutcome`, judged in
  :mod:`xtuner_plugins.outcome`): ``xtuner train`` **exits 0 even when training crashed**, so a run also fails on
  a traceback or ``ChildFailedError`` in its output, iterations missing or no final checkpoint.

Every launcher runs in its own session; on a timeout, or when another node failed, it is killed with every
process under it, so nothing is left training and nothing waits forever.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from xtuner_plugins.outcome import CRASH_MARKS, TrainOutcome, find_checkpoints, judge, parse_log, read_scalars

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
TRAIN_TOOL = os.path.join(REPO_ROOT, 'tools', 'train.py')  # the ranks of the local launcher: imports deferred
DS_CPU_CONFIGS = {name: os.path.join(REPO_ROOT, 'configs', 'deepspeed', f'{name}_cpu.json')
                  for name in ('zero2', 'zero3')}
# variables of an enclosing launcher that must not leak into a training subprocess
DIST_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK', 'MASTER_ADDR',
            'MASTER_PORT', 'TORCHELASTIC_RUN_ID', 'NPROC_PER_NODE', 'NNODES', 'NODE_RANK', 'PORT', 'ADDR',
            'XTUNER_PLUGINS_LAUNCHER')
CACHE_DIRS = {'HF_HOME': 'huggingface', 'TORCH_EXTENSIONS_DIR': 'torch_extensions', 'XDG_CACHE_HOME': 'xdg',
              'MPLCONFIGDIR': 'matplotlib', 'TRITON_CACHE_DIR': 'triton'}
_PORT_IN_USE = ('EADDRINUSE', 'address already in use', 'Address already in use')
Options = Union[None, Mapping[str, object], Sequence[str]]


# ------------------------------------------------------------------------------------------ command, environment
def xtuner_train_script() -> str:
    """``xtuner/tools/train.py`` (what ``xtuner train`` runs), found without importing xtuner."""
    spec = importlib.util.find_spec('xtuner')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('xtuner is not installed (`make setup` installs the pinned set into .venv)')
    return os.path.join(list(spec.submodule_search_locations)[0], 'tools', 'train.py')


def free_port(host: str = '127.0.0.1') -> int:
    """A TCP port that was free a moment ago (the launcher binds it shortly after: see ``port_retries``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cfg_options_args(options: Options) -> List[str]:
    """``--cfg-options k=v ...`` as MMEngine's ``DictAction`` reads them back (``[a,b]`` for lists);
    a sequence of ``'k=v'`` strings is passed as it is."""
    if not options:
        return []
    if not isinstance(options, Mapping):
        return ['--cfg-options', *options]
    items = []
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = '[' + ','.join(str(v) for v in value) + ']'
        items.append(f'{key}={value}')
    return ['--cfg-options', *items]


def _existing(path: str) -> Optional[str]:
    for cand in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(cand):
            return os.path.abspath(cand)
    return None


def resolve_deepspeed(deepspeed: Optional[str]) -> Optional[str]:
    """``'zero2'``/``'zero3'``: this repository's CPU JSONs; a JSON path; else a stock XTuner name."""
    if not deepspeed:
        return None
    return DS_CPU_CONFIGS.get(deepspeed) or _existing(deepspeed) or deepspeed


def cache_env(cache_dir: str) -> Dict[str, str]:
    """``HF_HOME``, ``TORCH_EXTENSIONS_DIR``, ... under ``cache_dir``."""
    return {key: os.path.join(cache_dir, sub) for key, sub in CACHE_DIRS.items()}


def train_env(nproc: int = 1, cache_dir: Optional[str] = None,
              extra_env: Optional[Mapping[str, object]] = None) -> Dict[str, str]:
    """The environment of a training subprocess (see the module docstring); ``cache_dir`` replaces the caches
    of this environment, without it they stay as they are."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    if cache_dir:
        env.update(cache_env(cache_dir))
    env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1',
               PYTHONFAULTHANDLER='1',   # a crash, or the SIGABRT of a timeout (TrainJob.kill), prints the stacks
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]),
               PATH=os.pathsep.join([VENV_BIN, env.get('PATH', '')]))
    if nproc > 1:
        env['OMP_NUM_THREADS'] = '1'  # one core per process
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    return env


def train_command(config: str, work_dir: str, nproc: int = 1, deepspeed: Optional[str] = None,
                  cfg_options: Options = None, extra_args: Sequence[str] = (), use_cli: bool = False,
                  script: Optional[str] = None, nnodes: int = 1, node_rank: int = 0, addr: str = '127.0.0.1',
                  port: Optional[int] = None, launcher: str = 'auto'):
    """``(argv, environment variables it needs)`` of one node's launcher (see the module docstring);
    ``launcher``: ``'torchrun'`` or ``'local'`` instead of the default choice."""
    ds = resolve_deepspeed(deepspeed)
    args = [_existing(config) or config, '--work-dir', os.path.abspath(work_dir)]
    args += (['--deepspeed', ds] if ds else []) + cfg_options_args(cfg_options) + list(extra_args)
    distributed = nproc > 1 or nnodes > 1 or bool(ds)
    port = port or (free_port() if distributed else None)
    if use_cli:
        env = dict(NPROC_PER_NODE=nproc, NNODES=nnodes, NODE_RANK=node_rank, ADDR=addr)
        return [os.path.join(VENV_BIN, 'xtuner'), 'train', *args], dict(env, **({'PORT': port} if port else {}))
    if not distributed:
        return [sys.executable, script or xtuner_train_script(), *args], {}
    if launcher == 'local' or (launcher == 'auto' and nnodes == 1 and not ds):
        if os.path.abspath(script or TRAIN_TOOL) == TRAIN_TOOL:   # its own launcher, which forks the ranks
            return [sys.executable, TRAIN_TOOL, *args, f'--nproc-per-node={nproc}'], {'MASTER_PORT': str(port)}
        return [sys.executable, '-m', 'xtuner_plugins.cli.local_launch', f'--nproc-per-node={nproc}',
                f'--master-addr={addr}', f'--master-port={port}', script or TRAIN_TOOL, *args,
                '--launcher', 'pytorch'], {}
    return [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}', f'--node_rank={node_rank}',
            f'--nproc_per_node={nproc}', f'--master_addr={addr}', f'--master_port={port}',
            script or xtuner_train_script(), *args, '--launcher', 'pytorch'], {}


# ------------------------------------------------------------------------------------------ a started launcher
def ends_with_parent():
    """A ``preexec_fn`` for Linux (else None): in the forked child, before its program runs, SIGTERM when the process
    that started it dies (``PR_SET_PDEATHSIG``, kept across the ``exec``). A caller killed outright (SIGKILL, the
    kernel's OOM killer) left its training running, orphaned, on towards writing checkpoints into a work folder a
    rerun would reuse; the launcher takes SIGTERM as it does from ``kill`` (its ranks stop). libc is found here, in
    the parent: the child only calls it."""
    if not sys.platform.startswith('linux'):
        return None
    from xtuner_plugins.signals import parent_death_signal
    return parent_death_signal(signal.SIGTERM)


class TrainJob:
    """One launcher in its own session, its output in ``log_path``; ``on_line`` sees each line as it comes;
    ``cwd``: the repository root unless given."""

    def __init__(self, cmd: List[str], env: Mapping[str, str], log_path: str,
                 on_line: Optional[Callable[[str], None]] = None, cwd: Optional[str] = None):
        self.cmd, self.log_path, self.on_line = cmd, log_path, on_line
        self.timed_out, self.stopped_because = False, ''
        self.start = time.perf_counter()
        self.end: Optional[float] = None
        with open(log_path, 'w', encoding='utf-8') as log:
            log.write('$ ' + ' '.join(cmd) + '\n')
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=ends_with_parent())
        self._reader = open(log_path, encoding='utf-8', errors='replace')
        self._partial = ''

    def pump(self) -> None:
        """Hand the lines written since the last call to ``on_line``."""
        text = self._partial + self._reader.read()
        lines = text.split('\n')
        self._partial = lines.pop()
        if self.on_line:
            for line in lines:
                self.on_line(line)

    def poll(self) -> Optional[int]:
        code = self.proc.poll()
        if code is not None and self.end is None:
            self.end = time.perf_counter()
        return code

    def read_log(self) -> str:
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def crashed(self) -> bool:
        """Ended with a non-zero code, or with a crash in its output (``xtuner train`` exits 0 anyway)."""
        return self.poll() is not None and (self.proc.returncode != 0 or
                                            any(mark in self.read_log() for mark in CRASH_MARKS))

    def kill(self, reason: str, stacks: bool = False) -> None:
        """SIGKILL to the launcher and every process under it: its process group, and the ranks, which
        ``torchrun`` starts in sessions of their own. ``stacks`` (a timeout): SIGABRT to each first, so that a
        hung run's log shows where each process was (``PYTHONFAULTHANDLER``, :func:`train_env`), 3 s at most."""
        import psutil
        if self.poll() is None:
            self.stopped_because = reason
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            if stacks:
                self._dump_stacks(tree)
            try:   # (the group may be gone after the stacks; a rank in a session of its own may not)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for process in tree:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        self.proc.wait()
        self.poll()

    def _dump_stacks(self, tree) -> None:
        """SIGABRT to the processes under the launcher (``tree``), one at a time, each given up to 1 s (3 s in all)
        to write its stacks and end, then to the launcher (its own end must not end them first), given 1 s more: at
        once, their stacks went into the one log together, their lines cut into each other. (The launcher is waited
        for through ``self.proc``: psutil would reap it and leave Popen an exit code of 0.)"""
        import psutil
        deadline = time.monotonic() + 3
        for process in tree:
            try:
                process.send_signal(signal.SIGABRT)
                process.wait(timeout=max(min(1.0, deadline - time.monotonic()), 0.01))
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        try:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.pump()
        if self._partial and self.on_line:
            self.on_line(self._partial)
        self._partial = ''
        self._reader.close()

    @property
    def wall_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start


def job_outcome(job: TrainJob, work_dir: str, require_checkpoint: bool = True,
                expect_iters: Optional[int] = None, lead: bool = True) -> TrainOutcome:
    """What ``job`` left in its log and ``work_dir``, judged (:func:`~xtuner_plugins.outcome.judge`)."""
    log = job.read_log()
    if job.stopped_because:
        log += f'\n[launch] {job.stopped_because}: SIGKILL to the launcher and its ranks\n'
    losses, max_iters, last_iter = parse_log(log)
    scalars = read_scalars(work_dir) if lead else []
    scalar_losses = {int(r['step']): float(r['loss']) for r in scalars if 'loss' in r and 'step' in r}
    outcome = TrainOutcome(command=job.cmd, returncode=job.proc.returncode, timed_out=job.timed_out,
                           wall_s=job.wall_s, work_dir=work_dir, log_path=job.log_path, log=log,
                           checkpoints=find_checkpoints(work_dir), losses=scalar_losses or losses, scalars=scalars,
                           max_iters=max_iters, last_iter=last_iter, pid=job.proc.pid)
    outcome.failure_reasons = judge(outcome, require_checkpoint, expect_iters, lead)
    if job.stopped_because and not job.timed_out:
        outcome.failure_reasons.append(job.stopped_because)
    return outcome


def wait_jobs(jobs: Sequence[TrainJob], timeout: float, grace: float = 120, interval: float = 0.2) -> None:
    """Wait until every job ended. A job still running ``timeout`` s after the start is killed; when one job
    crashed the others are killed at once, and when one ended well the others get ``grace`` s to follow (the
    nodes of one run end together: a node left behind waits on the others)."""
    deadline = time.perf_counter() + timeout
    try:
        while True:
            for job in jobs:
                job.pump()
            running = [j for j in jobs if j.poll() is None]
            if not running:
                return
            ended = [j for j in jobs if j.poll() is not None]
            crashed = [jobs.index(j) for j in ended if j.crashed()]
            now = time.perf_counter()
            if crashed:
                reason = f'stopped: launcher {crashed[0]} of {len(jobs)} failed'
            elif ended and now > min(j.end for j in ended) + grace:
                reason = f'stopped: still running {grace:.0f} s after another launcher ended'
            elif now > deadline:
                reason = f'timed out after {timeout:.0f} s'
                for job in running:
                    job.timed_out = True
            else:
                time.sleep(interval)
                continue
            for job in running:
                job.kill(reason, stacks=job.timed_out)
    finally:
        for job in jobs:
            job.kill('stopped: the caller was interrupted')  # no-op for ended jobs
            job.close()


# ------------------------------------------------------------------------------------------ entry points
def run_local_nodes(config: str, work_dirs: Sequence[str], nproc: int = 1, timeout: float = 240,
                    port: Optional[int] = None, port_retries: int = 1, per_node: Sequence[Mapping] = (),
                    cache_dir: Optional[str] = None, extra_env: Optional[Mapping] = None,
                    on_line: Optional[Callable[[str], None]] = None, require_checkpoint: bool = True,
                    expect_iters: Optional[int] = None, grace: float = 120, **command) -> List[TrainOutcome]:
    """Train on ``len(work_dirs)`` nodes, all on this machine: node ``r`` is a launcher with ``NODE_RANK=r``,
    ``ADDR=127.0.0.1`` and one ``PORT``, its output in ``<work_dirs[r]>/train_output.node<r>.log``
    (``train_output.log`` for one node). Nodes may share a work folder (shared storage) or not.
    ``per_node[r]``: arguments of :func:`train_command` for node ``r`` alone (e.g. ``cfg_options``, ``port``);
    ``**command``: for all; the other arguments as for :func:`run_train`. Returns one outcome per node."""
    nnodes, work_dirs = len(work_dirs), [os.path.abspath(w) for w in work_dirs]
    for attempt in range(port_retries + 1):
        chosen, jobs = port or free_port(), []
        try:
            for rank, work_dir in enumerate(work_dirs):
                os.makedirs(work_dir, exist_ok=True)
                kwargs = dict(command, nproc=nproc, nnodes=nnodes, node_rank=rank, port=chosen)
                kwargs.update(per_node[rank] if rank < len(per_node) else {})
                cmd, env = train_command(config, work_dir, **kwargs)
                log = os.path.join(work_dir, f'train_output.node{rank}.log' if nnodes > 1 else 'train_output.log')
                jobs.append(TrainJob(cmd, train_env(nproc, cache_dir, dict(extra_env or {}, **env)), log,
                                     on_line if rank == 0 else None))
        finally:
            wait_jobs(jobs, timeout, grace)
        if port or attempt == port_retries or not any(s in j.read_log() for j in jobs for s in _PORT_IN_USE):
            return [job_outcome(j, w, require_checkpoint, expect_iters, lead=(r == 0))
                    for r, (j, w) in enumerate(zip(jobs, work_dirs))]


def run_train(config: str, work_dir: str, nproc: int = 1, deepspeed: Optional[str] = None,
              cfg_options: Options = None, use_cli: bool = False, timeout: float = 240, **kwargs) -> TrainOutcome:
    """Train ``config`` into ``work_dir`` (``--work-dir``; the output goes to ``<work_dir>/train_output.log``)
    in a subprocess and return a :class:`TrainOutcome`.

    ``nproc``: processes (``torchrun``/``NPROC_PER_NODE`` when > 1); ``deepspeed``: ``'zero2'``/``'zero3'``
    (this repository's CPU JSONs), a JSON path or a stock XTuner name; ``cfg_options``: ``{'k': v}`` or
    ``['k=v', ...]``; ``use_cli``: through ``xtuner train``; ``timeout``: seconds before launcher and ranks are
    killed. ``**kwargs``: ``extra_args``, ``script`` (default XTuner's ``xtuner/tools/train.py``) as for
    :func:`train_command`; ``cache_dir`` (default: this environment's caches), ``extra_env``,
    ``require_checkpoint`` (a run without ``iter_<N>.pth`` or ``epoch_*.pth`` fails), ``expect_iters``
    (default N of ``Iter(train) [k/N]``), ``port_retries`` (reruns when the port was taken) and ``on_line``
    (called with each line of the output, the first ``$ COMMAND``) as for :func:`run_local_nodes`.
    """
    return run_local_nodes(config, [work_dir], nproc=nproc, timeout=timeout, deepspeed=deepspeed,
                           cfg_options=cfg_options, use_cli=use_cli, **kwargs)[0]
