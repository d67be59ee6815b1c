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
* **No stage writes over its parents** (:func:`lineage_in_work_dir`): a run whose work folder holds a
  checkpoint of its own lineage (``model.pretrained_pth`` and the earlier stages it records) would replace it
  with its own ``iter_N.pth`` and ``last_checkpoint``; it stops before anything is built, naming both.
* **No run writes over an earlier run's checkpoints** (:func:`earlier_run_in_work_dir`): a new run (not a resume)
  into a work folder that holds ``iter_N.pth``/``epoch_N.pth`` or ``last_checkpoint`` would replace some of them
  with its own and point ``last_checkpoint`` at its own, leaving two runs mixed in one folder (a convert of the
  newest ``iter_N.pth`` could then take the other run's model); it stops, naming them. A resume, and a requeued
  Slurm job continuing its own checkpoints (``preempt.requeue_decision``), go on.
  A ``model.liger_kernel`` this machine cannot run (:func:`liger_refusal`: no GPU) stops it there too, and so does
  a ``model.pretrained_pth`` that cannot load (:func:`pretrained_refusal`: not there, not a checkpoint).

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
import shutil
import sys
import threading
from typing import Callable, List, Mapping, MutableMapping, Optional

_PATCH_MARK = '_xtuner_plugins_runstart_patch'
_building = threading.local()  # inside a patched from_cfg: the config is prepared already
_applied: List[str] = []


def refuse(message: str) -> None:
    """Stop the run at start-up with one line on rank 0 (``train: refused: ...``) and exit code 2 on every rank."""
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'train: refused: {message}', file=sys.stderr, flush=True)
    raise SystemExit(2)


def prepare_run(cfg):
    """Check the run's ``--cfg-options``, fill in its training length and align its checkpoints, in place;
    returns ``cfg``. Raises ValueError naming every problem; a work folder holding a checkpoint of the run's
    lineage stops it (:func:`refuse`)."""
    from xtuner_plugins.engine.checks import check_run_options
    from xtuner_plugins.engine.length import resolve_training_length
    changed = check_run_options(cfg)
    plain = getattr(cfg, '_cfg_dict', cfg)
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
    from xtuner_plugins.engine.loaded_lineage import previous_stage_of_loaded
    problem = (work_dir_refusal(plain) or previous_stage_of_loaded(plain) or pretrained_refusal(plain)
               or geometry_refusal(plain)
               or lineage_in_work_dir(plain) or earlier_run_in_work_dir(plain) or liger_refusal(plain))
    if problem:
        refuse(problem)
    return cfg


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


#: the least free space a work folder's disk must have for a run to start (its log and config; checkpoints more)
LEAST_FREE = 16 * 2 ** 20


def work_dir_refusal(cfg: Mapping) -> Optional[str]:
    """Why the work folder cannot be one (a file, a symbolic link to nothing, under a file, not writable by this
    user, a model's source folder), found before anything is built: MMEngine's mkdir_or_exist raised
    FileExistsError / NotADirectoryError / PermissionError in a traceback, and a run in its LLM's folder saved
    checkpoints there that changed the folder the run records as its source (it no longer converted)."""
    work_dir = cfg.get('work_dir')
    if not isinstance(work_dir, str) or not work_dir:
        return None
    if os.path.islink(work_dir) and not os.path.exists(work_dir):
        return f'--work-dir {work_dir} is a symbolic link to {os.readlink(work_dir)}, which does not exist'
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        return f'--work-dir {work_dir} is a file, not a folder'
    above = os.path.abspath(work_dir)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f'--work-dir {work_dir} cannot be made: {above} is a file, not a folder'
    if not os.access(above, os.W_OK | os.X_OK):
        return (f'--work-dir {work_dir} is not writable by this user' if above == os.path.abspath(work_dir) else
                f'--work-dir {work_dir} cannot be made: {above} is not writable by this user')
    free = shutil.disk_usage(above).free
    if free < LEAST_FREE:   # a full disk gave pages of logging errors, then a traceback and an empty log
        return (f'--work-dir {work_dir}: its disk has {free / 2 ** 20:.1f} MiB free, and a run writes its log, its '
                f'config and its checkpoints there; free space first')
    model = cfg.get('model') if isinstance(cfg.get('model'), Mapping) else {}
    real = os.path.realpath(work_dir)
    for key in ('llm', 'vision_encoder', 'tokenizer', 'official_checkpoint'):
        source = model.get(key)
        if isinstance(source, Mapping):
            source = source.get('path') or source.get('pretrained_model_name_or_path')
        if isinstance(source, str) and os.path.isdir(source):
            folder = os.path.realpath(source)
            if real == folder or real.startswith(folder + os.sep):
                return (f'--work-dir {work_dir} is {"" if real == folder else "inside "}model.{key}\'s folder '
                        f'{source}: its checkpoints would change the folder the run records as its source (and the '
                        f'run would no longer convert); give the run a work folder of its own')
    return None


def pretrained_refusal(cfg: Mapping) -> Optional[str]:
    """Why ``model.pretrained_pth`` cannot be loaded (no such path, a folder that is no DeepSpeed checkpoint, a
    file torch cannot read), found before anything is built: the model's build said it only after the vision
    tower and the LLM had loaded, in a traceback. None: unset, or it reads."""
    model = cfg.get('model')
    path = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(path, str) or not path:
        return None
    what = ('give a checkpoint of training: work_dirs/<config>/iter_N.pth (a file, or the folder DeepSpeed '
            'saves)')
    if not os.path.exists(path):
        return f'model.pretrained_pth={path}: no such file or folder; {what}'
    if os.path.isdir(path):
        from xtuner_plugins.outcome import deepspeed_checkpoint
        if deepspeed_checkpoint(path):
            return None
        if os.path.isfile(os.path.join(path, 'config.json')):   # a converted (or downloaded) model folder
            return (f'model.pretrained_pth={path} is a model folder (a config.json), not a checkpoint of training: '
                    f'start from it with model.official_checkpoint={path} (an InternVL folder: its vision tower, '
                    'projector and LLM), model.pretrained_pth left unset')
        return f'model.pretrained_pth={path} is a folder but not a DeepSpeed checkpoint (no *model_states.pt); {what}'
    from xtuner_plugins.models.checkpoint import read_meta
    try:
        read_meta(path)
    except (OSError, ValueError) as exc:
        return f'model.pretrained_pth: {exc}'
    return None


def geometry_refusal(cfg: Mapping) -> Optional[str]:
    """Why this run's vision geometry does not fit the checkpoint it starts from (``stages.geometry_problem``), or
    None. Training's only: a chain trained before this was checked still converts and answers as it was trained."""
    model = cfg.get('model')
    path = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(path, str) or not path:
        return None
    from xtuner_plugins.models.stages import geometry_problem
    return geometry_problem(path, dict(model))


def liger_refusal(cfg: Mapping) -> Optional[str]:
    """Why ``model.liger_kernel`` cannot run here (no CUDA device, beside ``compile_blocks``, not installed:
    ``models/liger.check_liger``), found before the model loads; None when it can or is off. ZeRO-3 and the LM
    head are checked when the model is built."""
    model = cfg.get('model')
    flag = model.get('liger_kernel') if isinstance(model, Mapping) else None
    if not flag:
        return None
    from xtuner_plugins.models.liger import check_liger
    try:
        check_liger(flag, compile_blocks=model.get('compile_blocks', 'auto'))
    except (ValueError, ImportError) as e:
        return str(e)
    return None


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


def lineage_in_work_dir(cfg: Mapping) -> Optional[str]:
    """Why the run's work folder must not be used: it holds a checkpoint the run is trained from
    (``model.pretrained_pth``, or an earlier stage its lineage records); None when it holds none."""
    model, work_dir = cfg.get('model'), cfg.get('work_dir')
    pretrained = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(pretrained, str) or not pretrained or not isinstance(work_dir, str) \
            or not os.path.isdir(work_dir):
        return None
    from xtuner_plugins.models.lineage import resolve_chain
    try:
        chain = [stage.path for stage in resolve_chain(pretrained)]
    except (OSError, ValueError):  # the model's build says what is wrong with the chain
        chain = [pretrained]
    for path in reversed(chain):
        if os.path.exists(path) and os.path.realpath(os.path.dirname(os.path.abspath(path))) == \
                os.path.realpath(work_dir):
            what = (f'model.pretrained_pth={path}' if path == chain[-1] else
                    f'{path} (an earlier stage of model.pretrained_pth={pretrained}, recorded in its lineage)')
            return (f"{what} is in this run's work folder {work_dir}: the run's own checkpoints (iter_N.pth, "
                    'last_checkpoint) would write over it; give this stage another --work-dir')
    return None


def _checkpoint_hook(cfg: Mapping) -> Mapping:
    hooks = cfg.get('default_hooks')
    hook = hooks.get('checkpoint') if isinstance(hooks, Mapping) else None
    return hook if isinstance(hook, Mapping) else {}


def absolute_out_dir(cfg: Mapping) -> None:
    """A relative ``default_hooks.checkpoint.out_dir`` made absolute (in place): MMEngine saved under it relative
    to the current folder, while ``last_checkpoint``'s relative path is read against the work folder (a resume
    found nothing, and the end line said 'no checkpoint saved')."""
    hook = _checkpoint_hook(cfg)
    out_dir = hook.get('out_dir')
    if isinstance(out_dir, str) and out_dir and '://' not in out_dir and not os.path.isabs(out_dir):
        hook['out_dir'] = os.path.abspath(out_dir)


def checkpoint_dir(cfg: Mapping) -> Optional[str]:
    """The folder the run's checkpoints go to: the work folder, or MMEngine's ``out_dir/<the work folder's
    name>`` when ``default_hooks.checkpoint.out_dir`` is set."""
    work_dir, out_dir = cfg.get('work_dir'), _checkpoint_hook(cfg).get('out_dir')
    if not isinstance(work_dir, str) or not work_dir:
        return None
    if isinstance(out_dir, str) and out_dir and '://' not in out_dir:
        return os.path.join(out_dir, os.path.basename(os.path.normpath(os.path.abspath(work_dir))))
    return work_dir


def _listed(names: List[str]) -> str:
    """The first three checkpoint names and the last, for a message."""
    return ', '.join(names[:3] + (['...'] if len(names) > 4 else []) + names[3:][-1:])


def earlier_run_in_work_dir(cfg: Mapping) -> Optional[str]:
    """Why a new run must not train into its work folder, or into the folder its checkpoints go to
    (:func:`checkpoint_dir`: runs whose work folders share a name share it): it holds an earlier run's checkpoints
    (module docstring); None for a resume, a requeued job that continues its own, or folders without
    checkpoints."""
    work_dir = cfg.get('work_dir')
    if cfg.get('resume') or not isinstance(work_dir, str) or not work_dir:
        return None
    from xtuner_plugins.engine.preempt import requeue_decision
    from xtuner_plugins.outcome import find_checkpoints
    made = os.path.isdir(work_dir)
    if made and requeue_decision(work_dir)[0]:
        return None
    saves = checkpoint_dir(cfg)
    if saves and os.path.isdir(saves) and not (made and os.path.samefile(saves, work_dir)):
        names = [os.path.basename(path) for path in find_checkpoints(saves)]
        if names:   # another run's, which this one's would write over and rotate out (no last_checkpoint here)
            return (f'the checkpoint folder {saves} (default_hooks.checkpoint.out_dir + the work folder\'s name) '
                    f'holds the checkpoints of an earlier run ({_listed(names)}): this new run would write its own '
                    f'iter_N.pth over them and rotate them out. Continue that run with --cfg-options resume=True, '
                    f'give this run a work folder of another name or another out_dir, or move them away first')
    if not made:
        return None
    names = [os.path.basename(path) for path in find_checkpoints(work_dir)]
    pointer = os.path.join(work_dir, 'last_checkpoint')
    if not names and not os.path.isfile(pointer):
        return None
    shown = _listed(names)
    try:
        with open(pointer, encoding='utf-8') as f:
            shown += f'{"; " if shown else ""}last_checkpoint -> {f.read().strip()}'
    except OSError:
        pass
    return (f'the work folder {work_dir} holds the checkpoints of an earlier run ({shown}): this new run would '
            f'write its own iter_N.pth over them and leave two runs mixed in one folder. Continue that run with '
            f'--cfg-options resume=True (or --resume CHECKPOINT), give this run another --work-dir, or move them '
            f'away first')


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
