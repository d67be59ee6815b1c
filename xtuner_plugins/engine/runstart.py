"""What happens to a run's config when its runner is built, before the model is: the ``--cfg-options`` are
checked against the config file (``checks.check_run_options``: unknown keys with the closest valid ones, values
of the wrong kind) and the training length is filled in from its final values (``length.py``: ``max_epochs``,
``max_iters``, ``save_every``, the learning-rate schedule that follows them). Then two things a resume or a
later stage relies on:

* **Checkpoints at optimizer steps** (:func:`align_checkpoints`). With gradient accumulation
  (``optim_wrapper.accumulative_counts``, DeepSpeed's ``gradient_accumulation_steps``) a checkpoint between two
  optimizer steps holds the weights without the gradients accumulated since the last step; a resume from it
  loses them and ends with other weights than an uninterrupted run. A checkpoint interval that is not a multiple
  of the accumulation is raised to the next multiple, with a warning naming both numbers, so every checkpoint is
  one a resume continues exactly.
* **No run that must not start** (``refusals.py``): a work folder that cannot be one, or that holds a checkpoint of
  the run's own lineage or an earlier run's checkpoints; a ``model.pretrained_pth`` that cannot load or whose
  vision geometry does not fit; a ``model.liger_kernel`` this machine cannot run. It stops there, in one line.

:func:`prepare_run` does all this; :func:`apply_runstart_patches` (called from ``runtime.py`` at import) makes
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
import logging
import os
import sys
import threading
from typing import Callable, List, Mapping, MutableMapping, Optional

from xtuner_plugins.engine.refusals import (attention_refusal, checkpoint_hook, earlier_run_in_work_dir,
                                           geometry_refusal, liger_refusal, lineage_in_work_dir, load_from_refusal,
                                           preference_data_refusal, pretrained_refusal, work_dir_refusal)

_PATCH_MARK = '_xtuner_plugins_runstart_patch'
_building = threading.local()  # inside a patched from_cfg: the config is prepared already
_applied: List[str] = []


def refuse(message: str) -> None:
    """Stop the run at start-up with one line on rank 0 (``train: refused: ...``) and exit code 2 on every rank
    (under srun, before the rendezvous, rank 0 is task 0: every task printed the line)."""
    from xtuner_plugins.slurm_step import launch_rank
    if launch_rank(os.environ) == 0:
        print(f'train: refused: {message}', file=sys.stderr, flush=True)
    raise SystemExit(2)


def prepare_run(cfg):
    """Check the run's ``--cfg-options``, fill in its training length and align its checkpoints, in place;
    returns ``cfg``. Raises ValueError naming every problem; a work folder holding a checkpoint of the run's
    lineage stops it (:func:`refuse`)."""
    from xtuner_plugins.engine.checks import check_run_options
    from xtuner_plugins.engine.length import resolve_training_length
    from xtuner_plugins.engine.slurm import refuse_tasks
    from xtuner_plugins.slurm_step import step_problem
    problem = step_problem(os.environ, cfg.get('launcher', 'none'))   # srun -n N without --launcher slurm
    if problem:
        refuse_tasks(problem)
    changed = check_run_options(cfg)
    plain = getattr(cfg, '_cfg_dict', cfg)
    note = one_deepspeed_rank(plain, os.environ)
    if note:
        from mmengine.logging import print_log
        print_log(note, logger='current', level=logging.INFO)
    from xtuner_plugins.engine.resumed_settings import said_taken
    if os.path.isfile(getattr(cfg, 'filename', None) or ''):   # (what the command line gave is known)
        from xtuner_plugins.cfg_words import cfg_options_words
        # the keys --cfg-options names (at the file's own value too; not what XTuner changed: DeepSpeed's strategy)
        said_taken(plain, [word.partition('=')[0] for word in cfg_options_words(sys.argv)])
    resolve_training_length(plain, changed)
    for note, level in ((align_checkpoints(plain), logging.WARNING), (workers_fit(plain), logging.INFO),
                        (sampler_fits(plain, changed), logging.WARNING)):
        if note:
            from mmengine.logging import print_log
            print_log(note, logger='current', level=level)
    absolute_out_dir(plain)
    from xtuner_plugins.engine.loaded_lineage import load_from_other_stage, previous_stage_of_loaded
    problem = (work_dir_refusal(plain) or load_from_refusal(plain) or load_from_other_stage(plain)
               or previous_stage_of_loaded(plain) or pretrained_refusal(plain) or geometry_refusal(plain)
               or lineage_in_work_dir(plain) or earlier_run_in_work_dir(plain) or liger_refusal(plain)
               or attention_refusal(plain) or preference_data_refusal(plain)
               or deepspeed_batch_refusal(plain, os.environ))
    if problem:
        refuse(problem)
    return cfg


def one_deepspeed_rank(cfg: MutableMapping, env: MutableMapping[str, str]) -> Optional[str]:
    """``xtuner train CONFIG --deepspeed ...`` in one process (no ``NPROC_PER_NODE``: XTuner starts its train script
    without torchrun, ``--launcher none``): DeepSpeed, finding none of a launcher's variables, looked for MPI's and
    stopped in a raw ``ModuleNotFoundError: No module named 'mpi4py'`` traceback once the model was built. The run is
    made one rank of torch's ``env://`` rendezvous on this machine instead (``launcher='pytorch'``; ``RANK=0``,
    ``WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` where set, else a free port), as ``tools/train.py``
    starts it through its launcher; the note to log, or None where the run is not such a one."""
    strategy = cfg.get('strategy')
    kind = strategy.get('type') if isinstance(strategy, Mapping) else None
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', '') or str(getattr(kind, '_imported', ''))
    if cfg.get('launcher', 'none') != 'none' or name.rsplit('.', 1)[-1] != 'DeepSpeedStrategy' \
            or any(key in env for key in ('RANK', 'WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'PMI_RANK')):
        return None
    import socket
    port = env.get('MASTER_PORT', '').strip()
    given = port.isdigit() and 0 < int(port) < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(('127.0.0.1', int(port) if given else 0))
        except OSError as exc:   # (torch's store said it in a DistNetworkError traceback once the model was built)
            refuse(f'--deepspeed in one process: MASTER_PORT={port}, the port its rendezvous would serve on '
                   f'127.0.0.1, cannot be taken ({exc.strerror or exc}): set another MASTER_PORT, or unset it for '
                   'a free one')
        port = str(sock.getsockname()[1])
    env.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=port)
    cfg['launcher'] = 'pytorch'
    return (f'--deepspeed in one process (no launcher): trains as the one rank of a run on this machine '
            f'(--launcher pytorch, RANK=0, WORLD_SIZE=1, MASTER_PORT={port}); NPROC_PER_NODE=N for N ranks')


def deepspeed_batch_refusal(cfg: Mapping, env: Mapping[str, str]) -> Optional[str]:
    """A DeepSpeed JSON's ``train_batch_size`` that is not the run's batch x accumulation x ranks: XTuner sets
    DeepSpeed's batch per rank and accumulation from the config (``train_dataloader.batch_size``,
    ``optim_wrapper.accumulative_counts``), and DeepSpeed stopped every rank once the model was built with 'Check batch
    related parameters. train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 3 != 1
    * 1 * 2' in a traceback. The line refusing it, or None (no DeepSpeed, no such number, the ranks not known).
    Hugging Face's ``"auto"`` (a JSON written for its Trainer), which DeepSpeed compared with numbers ('TypeError: '>'
    not supported between instances of 'str' and 'int''), is taken out: DeepSpeed computes it from the other two."""
    strategy = cfg.get('strategy')
    config = strategy.get('config') if isinstance(strategy, Mapping) else None
    total = config.get('train_batch_size') if isinstance(config, Mapping) else None
    if total == 'auto' and isinstance(config, MutableMapping):
        del config['train_batch_size']
    if not isinstance(total, int) or isinstance(total, bool):
        return None
    micro, steps = strategy.get('train_micro_batch_size_per_gpu'), strategy.get('gradient_accumulation_steps')
    ranks = env.get('WORLD_SIZE') or (env.get('SLURM_NTASKS') if cfg.get('launcher') == 'slurm' else None) or (
        '1' if cfg.get('launcher', 'none') == 'none' else None)
    if not (isinstance(micro, int) and isinstance(steps, int) and ranks and ranks.isdigit()):
        return None
    if total == micro * steps * int(ranks):
        return None
    return (f'--deepspeed: its train_batch_size is {total}, and this run trains {micro * steps * int(ranks)} samples '
            f'an optimizer step (train_dataloader.batch_size={micro} x optim_wrapper.accumulative_counts={steps} x '
            f'{ranks} ranks), which XTuner gives DeepSpeed from the config: remove train_batch_size from the JSON '
            '(or set it "auto"), or set the batch and accumulation that make it')


def keep_what_this_run_starts_from(cfg: Mapping) -> None:
    """Mark ``model.pretrained_pth`` kept (``engine/keep.py``: its run's rotation does not delete it), once, on
    rank 0. Called once the run holds its work folder's lock (``runlock.py``, when the runner dumps its config): a
    run refused there (another run is alive in the folder) marks nothing."""
    model = cfg.get('model') if isinstance(cfg, Mapping) else None
    path = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(path, str) or not path or os.environ.get('RANK', '0') != '0':
        return
    from xtuner_plugins.engine.keep import mark_kept
    warning = mark_kept(path, cfg.get('work_dir') or '')
    if warning:
        from mmengine.logging import print_log
        print_log(warning, logger='current', level=logging.WARNING)


def align_checkpoints(cfg: Mapping) -> Optional[str]:
    """Raise an iteration checkpoint interval that is not a multiple of :func:`accumulation` to the next multiple
    (module docstring); the warning to log, or None when nothing changed."""
    hooks = cfg.get('default_hooks')
    hook = hooks.get('checkpoint') if isinstance(hooks, Mapping) else None
    from xtuner_plugins.engine.length import accumulation
    every, steps = (hook or {}).get('interval'), accumulation(cfg)
    if (not isinstance(hook, Mapping) or hook.get('by_epoch', True) or not isinstance(every, int) or every <= 0
            or every % steps == 0):
        return None
    lower, upper = every // steps * steps, -(-every // steps) * steps
    hook['interval'] = upper
    if cfg.get('save_every') is not None:
        cfg['save_every'] = upper
    nearest = f'{lower} or {upper}' if lower else f'{upper}'
    return (f'save_every={every} is not a multiple of the gradient accumulation (optim_wrapper.accumulative_counts='
            f'{steps}): a checkpoint between optimizer steps lacks the gradients accumulated since the last step, '
            f'and a resume from it would end with other weights than an uninterrupted run; checkpoints every '
            f'{upper} iterations instead (save_every={nearest}: multiples of {steps})')


def workers_fit(cfg: Mapping) -> Optional[str]:
    """``train_dataloader.num_workers=0`` (data loaded in the training process) with the stage configs'
    ``persistent_workers=True``, which torch's DataLoader refuses without workers: persistence turned off, as
    nothing is left to keep; the note to log, or None."""
    loader = cfg.get('train_dataloader')
    if not isinstance(loader, Mapping) or loader.get('num_workers') != 0 or not loader.get('persistent_workers'):
        return None
    loader['persistent_workers'] = False
    return ('train_dataloader.num_workers=0: the data is loaded in the training process, so there are no workers to '
            'keep between epochs (persistent_workers=False)')


def sampler_fits(cfg: Mapping, changed: Mapping) -> Optional[str]:
    """``train_dataloader.batch_size`` set alone in ``--cfg-options`` (``changed``; ``=1``): the length-grouped
    sampler kept the config's ``per_device_batch_size`` (4), grouped and filled batches of 4 (an epoch of 5 samples
    ran 8 iterations of 1, and said 3 samples were repeated to fill whole batches). The sampler takes the loader's
    batch; the note to log, or None. A config's own two values (XTuner's set the sampler's to the batch times the
    accumulation) and a sampler's value given too are left as they are."""
    if 'train_dataloader.batch_size' not in changed or 'train_dataloader.sampler.per_device_batch_size' in changed:
        return None
    loader = cfg.get('train_dataloader')
    sampler = loader.get('sampler') if isinstance(loader, Mapping) else None
    if not isinstance(sampler, MutableMapping) or 'per_device_batch_size' not in sampler:
        return None
    size, grouped = loader.get('batch_size'), sampler.get('per_device_batch_size')
    if not isinstance(size, int) or not isinstance(grouped, int) or size == grouped:
        return None
    sampler['per_device_batch_size'] = size
    return (f'train_dataloader.batch_size={size} and train_dataloader.sampler.per_device_batch_size={grouped}: the '
            f'sampler groups the batches the loader makes, so it takes {size} too (set batch_size alone)')


def absolute_out_dir(cfg: Mapping) -> None:
    """A relative ``default_hooks.checkpoint.out_dir`` made absolute (in place): MMEngine saved under it relative
    to the current folder, while ``last_checkpoint``'s relative path is read against the work folder (a resume
    found nothing, and the end line said 'no checkpoint saved')."""
    hook = checkpoint_hook(cfg)
    out_dir = hook.get('out_dir')
    if isinstance(out_dir, str) and out_dir and '://' not in out_dir and not os.path.isabs(out_dir):
        hook['out_dir'] = os.path.abspath(out_dir)


#: called as a runner is built (``runtime.py`` adds its CPU-patch line: a training run's, not every tool's)
ON_RUNNER_BUILT: List[Callable[[], None]] = []


def _runner_built() -> None:
    for call in ON_RUNNER_BUILT:
        call()


def _patch_from_cfg(runner_cls) -> bool:
    original = runner_cls.__dict__['from_cfg'].__func__
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def from_cfg(cls, cfg):
        _runner_built()
        cfg = prepare_run(copy.deepcopy(cfg))
        depth = getattr(_building, 'depth', 0)
        _building.depth = depth + 1
        try:
            runner = original(cls, cfg)
        finally:
            _building.depth = depth
        from xtuner_plugins.engine.resumed_settings import say_taken
        say_taken()   # in the run's log (a DeepSpeed runner builds its model later)
        return runner

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
        _runner_built()   # (plain xtuner train: from_cfg ran before this package was imported)
        if not getattr(_building, 'depth', 0) and not hasattr(self, '_xtuner_plugins_hooks'):
            cfg = prepare_run(self.cfg)  # the runner's copy of the config: what it logs and saves
            if isinstance(self._train_loop, dict) and cfg.get('train_cfg') is not None:
                self._train_loop = copy.deepcopy(cfg['train_cfg'])
            if self.param_schedulers is not None and cfg.get('param_scheduler') is not None:
                self.param_schedulers = copy.deepcopy(cfg['param_scheduler'])
            self._xtuner_plugins_hooks = copy.deepcopy(cfg.get('default_hooks'))
            from xtuner_plugins.engine.resumed_settings import carry_taken, took
            if took('custom_hooks'):   # (the runner holds no copy of them before it registers them)
                self._xtuner_plugins_custom_hooks = copy.deepcopy(cfg.get('custom_hooks'))
            taken = (cfg.get('model') or {}).get('pretrained_pth')   # loaded_lineage's, from the resumed checkpoint
            if isinstance(model, dict) and taken and not model.get('pretrained_pth'):
                model['pretrained_pth'] = taken
            loader = getattr(self, '_train_dataloader', None)
            carry_taken(cfg, self, model)   # the resumed checkpoint's settings, taken into the runner's config
            if isinstance(loader, dict) and isinstance(cfg.get('train_dataloader'), Mapping):  # workers_fit's change
                loader['persistent_workers'] = cfg['train_dataloader'].get('persistent_workers', False)
                fitted = cfg['train_dataloader'].get('sampler')   # sampler_fits's
                if isinstance(loader.get('sampler'), dict) and isinstance(fitted, Mapping) \
                        and 'per_device_batch_size' in fitted:
                    loader['sampler']['per_device_batch_size'] = fitted['per_device_batch_size']
        from xtuner_plugins.engine.resumed_settings import say_taken
        say_taken()   # the runner's log is open now
        return build_model(self, model)

    @functools.wraps(register_hooks)
    def patched_register_hooks(self, default_hooks=None, custom_hooks=None):
        resolved = getattr(self, '_xtuner_plugins_hooks', None)
        custom = getattr(self, '_xtuner_plugins_custom_hooks', None)
        return register_hooks(self, resolved if resolved is not None else default_hooks,
                              custom if custom is not None else custom_hooks)

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
