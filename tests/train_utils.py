"""Launch XTuner/MMEngine training from tests and judge the outcome, not the exit code.

``run_train`` starts training in a subprocess, in one of three ways:

* ``nproc=1``: ``python <xtuner>/tools/train.py CFG --work-dir W`` (a crash gives a non-zero exit code);
* ``nproc>1``: ``python -m torch.distributed.run --nproc_per_node=N --master_port=<free port>
  <xtuner>/tools/train.py CFG --launcher pytorch [--deepspeed JSON] --work-dir W``;
* ``use_cli=True``: the real ``xtuner train CFG ...`` with ``NPROC_PER_NODE``, ``PORT``, ``ADDR`` in the
  environment. The CLI starts ``python``/``torchrun`` found on ``PATH`` (the venv's ``bin`` is put first) and
  **exits 0 even when training crashed**, so ``TrainOutcome.failed`` also looks at the log and the checkpoints.

Caches (``HF_HOME``, ``TORCH_EXTENSIONS_DIR``, ``XDG_CACHE_HOME``, ``MPLCONFIGDIR``, ...) go to a temp dir,
``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1``, and the repository root is on ``PYTHONPATH`` so configs can
lazy-import ``tests.*`` and ``xtuner_plugins.*``.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
DS_CPU_CONFIGS = {
    'zero2': os.path.join(REPO_ROOT, 'configs', 'deepspeed', 'zero2_cpu.json'),
    'zero3': os.path.join(REPO_ROOT, 'configs', 'deepspeed', 'zero3_cpu.json'),
}

_ITER_LINE = re.compile(r'Iter\(train\)\s*\[\s*(\d+)/(\d+)\]')
_LOSS_IN_LINE = re.compile(r'(?<![\w/])loss:\s*([-+0-9.eE]+|nan|inf)')
_CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
_PORT_IN_USE = ('EADDRINUSE', 'address already in use', 'Address already in use')
_DIST_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK',
             'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID', 'NPROC_PER_NODE', 'NNODES',
             'NODE_RANK', 'PORT', 'ADDR')

_CACHE_DIR: Optional[str] = None


def xtuner_train_script() -> str:
    """Path of ``xtuner/tools/train.py`` without importing xtuner."""
    spec = importlib.util.find_spec('xtuner')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('xtuner is not installed')
    return os.path.join(list(spec.submodule_search_locations)[0], 'tools', 'train.py')


def shared_cache_dir() -> str:
    """One temp dir per test process for the caches of all runs; removed at exit."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.mkdtemp(prefix='xtp-train-cache-')
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def free_port() -> int:
    """A TCP port that was free a moment ago (the launcher binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train_env(nproc: int = 1, cache_dir: Optional[str] = None,
              extra_env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a training subprocess (see the module docstring)."""
    cache = cache_dir or shared_cache_dir()
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(
        HF_HOME=os.path.join(cache, 'hf'),
        HF_HUB_OFFLINE='1',
        TRANSFORMERS_OFFLINE='1',
        HF_DATASETS_OFFLINE='1',
        TORCH_EXTENSIONS_DIR=os.path.join(cache, 'torch_extensions'),
        XDG_CACHE_HOME=os.path.join(cache, 'xdg'),
        MPLCONFIGDIR=os.path.join(cache, 'mpl'),
        TRITON_CACHE_DIR=os.path.join(cache, 'triton'),
        TOKENIZERS_PARALLELISM='false',
        PYTHONUNBUFFERED='1',
        PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]),
        PATH=os.pathsep.join([VENV_BIN, env.get('PATH', '')]),
    )
    if nproc > 1:
        env['OMP_NUM_THREADS'] = '1'
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})
    return env


@dataclass
class TrainOutcome:
    """What a training run left behind. Judge ``failed``/``failure_reasons``, not ``returncode``."""

    command: List[str]
    returncode: Optional[int]
    timed_out: bool
    wall_s: float
    work_dir: str
    log_path: str
    log: str
    checkpoints: List[str] = field(default_factory=list)  # iter_N.pth / epoch_N.pth (file or DeepSpeed dir)
    losses: Dict[int, float] = field(default_factory=dict)  # iteration -> logged (rank 0) loss
    scalars: List[dict] = field(default_factory=list)  # records of vis_data/scalars.json
    max_iters: Optional[int] = None  # N of the log's "Iter(train) [k/N]"
    last_iter: Optional[int] = None  # largest k logged
    failure_reasons: List[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failure_reasons)

    @property
    def ok(self) -> bool:
        return not self.failure_reasons

    @property
    def final_checkpoint(self) -> Optional[str]:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def has_traceback(self) -> bool:
        return 'Traceback (most recent call last)' in self.log

    def vis_dir(self) -> Optional[str]:
        return _latest_vis_dir(self.work_dir)

    def scalar_series(self, name: str) -> Dict[int, float]:
        """``{step: value}`` of one scalar of ``vis_data/scalars.json`` (e.g. ``tokens_per_sec``)."""
        return {int(r.get('step', r.get('iter'))): float(r[name]) for r in self.scalars if name in r}

    def summary(self, tail: int = 60) -> str:
        """For assertion messages: the reasons and the end of the log."""
        lines = self.log.splitlines()[-tail:]
        return (f'command: {" ".join(self.command)}\nreturncode={self.returncode} timed_out={self.timed_out} '
                f'wall={self.wall_s:.1f}s failure_reasons={self.failure_reasons}\n--- log tail ---\n'
                + '\n'.join(lines))


def _latest_vis_dir(work_dir: str) -> Optional[str]:
    dirs = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data')))  # <timestamp>/vis_data
    return dirs[-1] if dirs else None


def find_checkpoints(work_dir: str) -> List[str]:
    """``iter_N.pth``/``epoch_N.pth`` in ``work_dir`` (files, or DeepSpeed folders), ordered by N."""
    found = []
    for name in os.listdir(work_dir) if os.path.isdir(work_dir) else []:
        m = _CKPT_NAME.match(name)
        path = os.path.join(work_dir, name)
        if m and (os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))):
            found.append((int(m.group(2)), path))
    return [p for _, p in sorted(found)]


def read_scalars(work_dir: str) -> List[dict]:
    """Records of the newest ``<work_dir>/<timestamp>/vis_data/scalars.json`` (written by rank 0)."""
    vis = _latest_vis_dir(work_dir)
    records = []
    if vis and os.path.isfile(os.path.join(vis, 'scalars.json')):
        with open(os.path.join(vis, 'scalars.json'), encoding='utf-8') as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return records


def parse_log(log: str):
    """(losses {iter: loss}, max_iters, last_iter) from MMEngine's ``Iter(train) [k/N] ... loss: x`` lines.

    The logged loss is ``LogProcessor``'s mean over ``window_size`` iterations (10 by default): configs
    that compare per-iteration losses should set ``log_processor=dict(by_epoch=False, window_size=1)``.
    """
    losses, max_iters, last_iter = {}, None, None
    for line in log.splitlines():
        m = _ITER_LINE.search(line)
        if not m:
            continue
        k, n = int(m.group(1)), int(m.group(2))
        max_iters, last_iter = n, max(k, last_iter or 0)
        lm = _LOSS_IN_LINE.search(line[m.end():])
        if lm:
            losses[k] = float(lm.group(1))
    return losses, max_iters, last_iter


def _judge(outcome: TrainOutcome, require_checkpoint: bool, expect_iters: Optional[int]) -> List[str]:
    reasons = []
    if outcome.timed_out:
        reasons.append('timed out')
    if outcome.returncode not in (0, None):
        reasons.append(f'exit code {outcome.returncode}')
    if outcome.has_traceback:
        reasons.append('traceback in the log')
    if 'ChildFailedError' in outcome.log:
        reasons.append('torchrun reported a failed child')
    target = expect_iters or outcome.max_iters
    if target is None:
        reasons.append('no training iteration was logged')
    elif outcome.last_iter is None or outcome.last_iter < target:
        reasons.append(f'training stopped at iteration {outcome.last_iter} of {target}')
    if require_checkpoint:
        names = [os.path.basename(p) for p in outcome.checkpoints]
        if not outcome.checkpoints:
            reasons.append('no checkpoint saved')
        elif target is not None and f'iter_{target}.pth' not in names and not any(
                n.startswith('epoch_') for n in names):
            reasons.append(f'final checkpoint iter_{target}.pth missing (found {names})')
    return reasons


def _cfg_options_args(cfg_options: Union[None, Mapping, Sequence[str]]) -> List[str]:
    if not cfg_options:
        return []
    if isinstance(cfg_options, Mapping):
        items = []
        for k, v in cfg_options.items():
            if isinstance(v, bool):
                v = str(v)
            items.append(f'{k}={v}')
    else:
        items = list(cfg_options)
    return ['--cfg-options', *items]


def _resolve_deepspeed(deepspeed: Optional[str]) -> Optional[str]:
    if deepspeed is None:
        return None
    if deepspeed in DS_CPU_CONFIGS:
        return DS_CPU_CONFIGS[deepspeed]
    for cand in (deepspeed, os.path.join(REPO_ROOT, deepspeed)):
        if os.path.isfile(cand):
            return os.path.abspath(cand)
    return deepspeed  # a stock XTuner name such as deepspeed_zero2


def _run_logged(cmd: List[str], env: Dict[str, str], log_path: str, timeout: float):
    """Run ``cmd`` in its own session with output to ``log_path``; kill the whole group on timeout."""
    with open(log_path, 'w', encoding='utf-8') as logf:
        logf.write('$ ' + ' '.join(cmd) + '\n')
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            except ProcessLookupError:
                pass
            proc.wait()
            return proc.returncode, True


def run_train(config: str, work_dir: str, nproc: int = 1, deepspeed: Optional[str] = None,
              cfg_options: Union[None, Mapping, Sequence[str]] = None, use_cli: bool = False,
              timeout: float = 240, extra_args: Sequence[str] = (), extra_env: Optional[Mapping] = None,
              require_checkpoint: bool = True, expect_iters: Optional[int] = None,
              cache_dir: Optional[str] = None, port_retries: int = 1,
              script: Optional[str] = None) -> TrainOutcome:
    """Train ``config`` into ``work_dir`` in a subprocess and return a :class:`TrainOutcome`.

    Args:
        config: config path (relative paths are taken from the repository root) or an XTuner config name.
        work_dir: passed as ``--work-dir``; the combined stdout/stderr goes to ``<work_dir>/train_output.log``.
        nproc: processes on this machine (``torch.distributed.run`` / ``NPROC_PER_NODE`` when > 1).
        deepspeed: ``'zero2'``/``'zero3'`` (this repo's CPU JSONs), a JSON path, or a stock XTuner name.
        cfg_options: ``{'model.crash_at_iter': 2}`` or ``['a=1', ...]`` for ``--cfg-options``.
        use_cli: go through ``xtuner train`` (its exit code is 0 even after a crash).
        timeout: seconds before the run (launcher and ranks) is killed.
        require_checkpoint: a run without ``iter_<max_iters>.pth`` (or ``epoch_*.pth``) counts as failed.
        expect_iters: the number of iterations that must be logged (default: N of ``Iter(train) [k/N]``).
        port_retries: rerun this often when the rendezvous port turned out to be taken.
        script: the train script (default XTuner's ``xtuner/tools/train.py``; e.g. this repo's ``tools/train.py``).
    """
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    log_path = os.path.join(work_dir, 'train_output.log')
    cfg_path = config
    for cand in (config, os.path.join(REPO_ROOT, config)):
        if os.path.isfile(cand):
            cfg_path = os.path.abspath(cand)
            break
    ds = _resolve_deepspeed(deepspeed)
    train_args = [cfg_path, '--work-dir', work_dir]
    if ds:
        train_args += ['--deepspeed', ds]
    train_args += _cfg_options_args(cfg_options) + list(extra_args)

    for attempt in range(port_retries + 1):
        port = free_port()
        env = train_env(nproc, cache_dir=cache_dir, extra_env=extra_env)
        if use_cli:
            env.update(NPROC_PER_NODE=str(nproc), NNODES='1', PORT=str(port), ADDR='127.0.0.1')
            cmd = [os.path.join(VENV_BIN, 'xtuner'), 'train', *train_args]
        elif nproc == 1:
            cmd = [sys.executable, script or xtuner_train_script(), *train_args]
        else:
            cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--nnodes=1',
                   '--master_addr=127.0.0.1', f'--master_port={port}', script or xtuner_train_script(), *train_args,
                   '--launcher', 'pytorch']
        t0 = time.perf_counter()
        returncode, timed_out = _run_logged(cmd, env, log_path, timeout)
        wall = time.perf_counter() - t0
        with open(log_path, encoding='utf-8', errors='replace') as f:
            log = f.read()
        if nproc > 1 and attempt < port_retries and any(s in log for s in _PORT_IN_USE):
            continue
        break

    losses, max_iters, last_iter = parse_log(log)
    scalars = read_scalars(work_dir)
    scalar_losses = {int(r['step']): float(r['loss']) for r in scalars if 'loss' in r and 'step' in r}
    outcome = TrainOutcome(command=cmd, returncode=returncode, timed_out=timed_out, wall_s=wall,
                           work_dir=work_dir, log_path=log_path, log=log,
                           checkpoints=find_checkpoints(work_dir), losses=scalar_losses or losses,
                           scalars=scalars, max_iters=max_iters, last_iter=last_iter)
    outcome.failure_reasons = _judge(outcome, require_checkpoint, expect_iters)
    return outcome


def load_checkpoint_state(path: str) -> Dict[str, 'object']:
    """The model state dict of an MMEngine checkpoint file or a DeepSpeed checkpoint folder, on the CPU
    (the package's own reader, which ``model.pretrained_pth`` and the converter use)."""
    from xtuner_plugins.models.checkpoint import load_trained_state_dict
    return load_trained_state_dict(path)
