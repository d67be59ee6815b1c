"""The test side of the package's launcher (:mod:`xtuner_plugins.launch`): every run of a test process
keeps its caches (``HF_HOME``, ``TORCH_EXTENSIONS_DIR``, ...) in one temp dir, removed at exit.

``run_train``/``run_local_nodes``/``train_env`` are the launcher's with that cache dir as default; judge a run
by ``TrainOutcome.failed``/``failure_reasons`` (``xtuner train`` exits 0 even when training crashed).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Dict, Optional

from xtuner_plugins import launch
from xtuner_plugins.launch import DS_CPU_CONFIGS, REPO_ROOT, free_port, xtuner_train_script  # noqa: F401
from xtuner_plugins.outcome import TrainOutcome, find_checkpoints, parse_log, read_scalars  # noqa: F401

_CACHE_DIR: Optional[str] = None


def shared_cache_dir() -> str:
    """One temp dir per test process for the caches of all runs; removed at exit."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.mkdtemp(prefix='xtp-train-cache-')
        atexit.register(shutil.rmtree, _CACHE_DIR, True)
    return _CACHE_DIR


def train_env(nproc: int = 1, cache_dir: Optional[str] = None, extra_env=None) -> Dict[str, str]:
    return launch.train_env(nproc, cache_dir or shared_cache_dir(), extra_env)


def run_train(config: str, work_dir: str, **kwargs) -> TrainOutcome:
    """:func:`xtuner_plugins.launch.run_train` with the test process's cache dir."""
    kwargs['cache_dir'] = kwargs.get('cache_dir') or shared_cache_dir()
    return launch.run_train(config, work_dir, **kwargs)


def run_local_nodes(config: str, work_dirs, **kwargs):
    """:func:`xtuner_plugins.launch.run_local_nodes` with the test process's cache dir."""
    kwargs['cache_dir'] = kwargs.get('cache_dir') or shared_cache_dir()
    return launch.run_local_nodes(config, work_dirs, **kwargs)


def load_checkpoint_state(path: str) -> Dict[str, 'object']:
    """The model state dict of an MMEngine checkpoint file or a DeepSpeed checkpoint folder, on the CPU
    (the package's own reader, which ``model.pretrained_pth`` and the converter use)."""
    from xtuner_plugins.models.checkpoint import load_trained_state_dict
    return load_trained_state_dict(path)
