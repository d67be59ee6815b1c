"""What happens to a run's config when its runner is built, before the model is: the ``--cfg-options`` are
checked against the config file (``checks.check_run_options``: unknown keys with the closest valid ones, values
of the wrong kind) and the training length is filled in from its final values (``length.py``: ``max_epochs``,
``max_iters``, ``save_every``, the learning-rate schedule that follows them).

:func:`prepare_run` does both; :func:`apply_runstart_patches` (called from ``runtime.py`` at import) makes
MMEngine's runners call it:

* ``Runner.from_cfg`` and ``FlexibleRunner.from_cfg`` (DeepSpeed): before the original, on a copy of the config.
  This covers ``tools/train.py`` (which imports this package first) and ``xtuner train --deepspeed`` (XTuner
  reads the lazy ``AutoOptimWrapper`` before it builds the runner, importing this package).
* Plain ``xtuner train CFG``: this package is imported only inside ``Runner.__init__``, by ``setup_env``
  reading ``MP_START_METHOD``, after ``from_cfg`` was entered but before ``build_model``. There the patched
  ``Runner.build_model`` runs the same check on ``runner.cfg`` and hands the resolved loop, schedule and
  checkpoint settings to the runner (``register_hooks`` takes the resolved ``default_hooks``).
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import List

_PATCH_MARK = '_xtuner_plugins_runstart_patch'
_building = threading.local()  # inside a patched from_cfg: the config is prepared already
_applied: List[str] = []


def prepare_run(cfg):
    """Check the run's ``--cfg-options`` and fill in its training length, in place; returns ``cfg``.
    Raises ValueError naming every problem."""
    from xtuner_plugins.engine.checks import check_run_options
    from xtuner_plugins.engine.length import resolve_training_length
    changed = check_run_options(cfg)
    resolve_training_length(getattr(cfg, '_cfg_dict', cfg), changed)
    return cfg


def _patch_from_cfg(runner_cls) -> bool:
    original = runner_cls.__dict__['from_cfg'].__func__
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def from_cfg(cls, cfg):
        cfg = prepare_run(copy.deepcopy(cfg))
        depth = getattr(_building, 'depth', 0)
        _building.depth = depth + 1
        try:
            return original(cls, cfg)
        finally:
            _building.depth = depth

    setattr(from_cfg, _PATCH_MARK, True)
    runner_cls.from_cfg = classmethod(from_cfg)
    return True


def _patch_runner_build_model() -> bool:
    """For a runner whose ``from_cfg`` ran before this package was imported (see the module docstring)."""
    from mmengine.runner import Runner
    build_model, register_hooks = Runner.build_model, Runner.register_hooks
    if getattr(build_model, _PATCH_MARK, False):
        return False

    @functools.wraps(build_model)
    def patched_build_model(self, model):
        if not getattr(_building, 'depth', 0) and not hasattr(self, '_xtuner_plugins_hooks'):
            cfg = prepare_run(self.cfg)  # the runner's copy of the config: what it logs and saves
            if isinstance(self._train_loop, dict) and cfg.get('train_cfg') is not None:
                self._train_loop = copy.deepcopy(cfg['train_cfg'])
            if self.param_schedulers is not None and cfg.get('param_scheduler') is not None:
                self.param_schedulers = copy.deepcopy(cfg['param_scheduler'])
            self._xtuner_plugins_hooks = copy.deepcopy(cfg.get('default_hooks'))
        return build_model(self, model)

    @functools.wraps(register_hooks)
    def patched_register_hooks(self, default_hooks=None, custom_hooks=None):
        resolved = getattr(self, '_xtuner_plugins_hooks', None)
        return register_hooks(self, resolved if resolved is not None else default_hooks, custom_hooks)

    for fn in (patched_build_model, patched_register_hooks):
        setattr(fn, _PATCH_MARK, True)
    Runner.build_model, Runner.register_hooks = patched_build_model, patched_register_hooks
    return True


def apply_runstart_patches() -> List[str]:
    """Apply the patches once (see the module docstring); returns the names newly applied."""
    from mmengine.runner import FlexibleRunner, Runner
    newly = []
    for name, patch in (('runner_from_cfg', lambda: _patch_from_cfg(Runner)),
                        ('flexible_runner_from_cfg', lambda: _patch_from_cfg(FlexibleRunner)),
                        ('runner_build_model', _patch_runner_build_model)):
        if patch():
            newly.append(name)
    _applied.extend(newly)
    return newly
