"""Why a run must not start, found when its runner is built, before anything is (``runstart.prepare_run`` stops the
run with the first one, in one line: ``runstart.refuse``); and where its checkpoints go (:func:`checkpoint_dir`).

* **A work folder that cannot be one** (:func:`work_dir_refusal`): a file, a symbolic link to nothing, under a
  file, not writable by this user, on a full disk, a model's source folder.
* **No stage writes over its parents** (:func:`lineage_in_work_dir`): a run whose work folder holds a
  checkpoint of its own lineage (``model.pretrained_pth`` and the earlier stages it records) would replace it
  with its own ``iter_N.pth`` and ``last_checkpoint``; it stops before anything is built, naming both.
* **No run writes over an earlier run's checkpoints** (:func:`earlier_run_in_work_dir`): a new run (not a resume)
  into a work folder that holds ``iter_N.pth``/``epoch_N.pth`` or ``last_checkpoint`` would replace some of them
  with its own and point ``last_checkpoint`` at its own, leaving two runs mixed in one folder (a convert of the
  newest ``iter_N.pth`` could then take the other run's model); it stops, naming them. A resume, and a requeued
  Slurm job continuing its own checkpoints (``preempt.requeue_decision``), go on.
* A ``model.liger_kernel`` or ``model.attn_implementation='flex_attention'`` this machine cannot train with
  (:func:`liger_refusal`, :func:`attention_refusal`: no GPU) stops it there too, and so do preference pairs for a model
  without ``preference=`` (:func:`preference_data_refusal`), and so does
  a ``model.pretrained_pth`` that cannot load (:func:`pretrained_refusal`: not there, not a checkpoint) or whose
  vision geometry does not fit (:func:`geometry_refusal`), and a ``load_from`` that is not there or is a folder of
  another kind (:func:`load_from_refusal`).
"""

from __future__ import annotations

import os
import shutil
from typing import List, Mapping, Optional


#: the least free space a work folder's disk must have for a run to start (its log and config; checkpoints more)
LEAST_FREE = 16 * 2 ** 20


def _read_only(folder: str) -> bool:
    """Whether ``folder`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def work_dir_refusal(cfg: Mapping) -> Optional[str]:
    """Why the work folder cannot be one (a file, a symbolic link to nothing or a folder under one, under a file,
    not writable by this user, a model's source folder), found before anything is built: MMEngine's
    mkdir_or_exist raised FileExistsError / NotADirectoryError / PermissionError in a traceback, and a run in its
    LLM's folder saved checkpoints there that changed the folder the run records as its source (it no longer
    converted)."""
    work_dir = cfg.get('work_dir')
    if not isinstance(work_dir, str) or not work_dir:
        return None
    from xtuner_plugins.links import leads_nowhere
    nowhere = leads_nowhere(work_dir)   # (under one: MMEngine's makedirs failed in a FileNotFoundError traceback)
    if nowhere:
        return f'--work-dir {work_dir} {nowhere.words}; ' + ('a run never makes a link\'s target: make that folder '
                                                             'first, or give another --work-dir' if nowhere.missing
                                                             else 'give another --work-dir')
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        return f'--work-dir {work_dir} is a file, not a folder'
    above = os.path.abspath(work_dir)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f'--work-dir {work_dir} cannot be made: {above} is a file, not a folder'
    if not os.access(above, os.W_OK | os.X_OK):
        if _read_only(above):   # (root included: not a matter of permissions)
            ro = 'is on a read-only file system; give a --work-dir on a disk that can be written'
            return (f'--work-dir {work_dir} {ro}' if above == os.path.abspath(work_dir) else
                    f'--work-dir {work_dir} cannot be made: {above} {ro}')
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


_TRAINING_CHECKPOINT = ('give a checkpoint of training: work_dirs/<config>/iter_N.pth (a file, or the folder '
                        'DeepSpeed saves)')


def _checkpoint_path_problem(path: str, label: str) -> Optional[str]:
    """Why ``path`` (given as ``label``) is no checkpoint of training to load: not there, a folder that is neither
    a DeepSpeed checkpoint nor (a converted or downloaded model's, said how to start from it) one; None otherwise."""
    if not os.path.exists(path):
        return f'{label}={path}: no such file or folder; {_TRAINING_CHECKPOINT}'
    if not os.path.isdir(path):
        return None
    from xtuner_plugins.outcome import deepspeed_checkpoint
    if deepspeed_checkpoint(path):
        return None
    if os.path.isfile(os.path.join(path, 'config.json')):   # a converted (or downloaded) model folder
        return (f'{label}={path} is a model folder (a config.json), not a checkpoint of training: start from it with '
                f'model.official_checkpoint={path} (an InternVL folder: its vision tower, projector and LLM), '
                f'{label} left unset')
    return f'{label}={path} is a folder but not a DeepSpeed checkpoint (no *model_states.pt); {_TRAINING_CHECKPOINT}'


def pretrained_refusal(cfg: Mapping) -> Optional[str]:
    """Why ``model.pretrained_pth`` cannot be loaded (no such path, a folder that is no DeepSpeed checkpoint, a
    file torch cannot read), found before anything is built: the model's build said it only after the vision
    tower and the LLM had loaded, in a traceback. None: unset, or it reads."""
    model = cfg.get('model')
    path = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(path, str) or not path:
        return None
    problem = _checkpoint_path_problem(path, 'model.pretrained_pth')
    if problem or os.path.isdir(path):
        return problem
    from xtuner_plugins.models.checkpoint import read_meta
    try:
        read_meta(path)
    except (OSError, ValueError) as exc:
        return f'model.pretrained_pth: {exc}'
    return None


def load_from_refusal(cfg: Mapping) -> Optional[str]:
    """Why a ``load_from`` (a new run from a checkpoint's weights, not a resume: the resume's own checks say its
    problems) cannot be loaded: not there, or a folder that is no DeepSpeed checkpoint (a converted model's). MMEngine
    said it once the model was built, in a ``FileNotFoundError: ... can not be found`` traceback. A file's content
    is checked as it loads (``resume_load``: one line)."""
    path = cfg.get('load_from')
    if cfg.get('resume') is True or not isinstance(path, str) or not path:
        return None
    return _checkpoint_path_problem(path, 'load_from')


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


def attention_refusal(cfg: Mapping) -> Optional[str]:
    """A ``model.attn_implementation`` this machine cannot train with, or None: ``'flex_attention'`` without a CUDA
    device (PyTorch's FlexAttention has no backward on a CPU: the run stopped at its first backward in a
    NotImplementedError traceback); ``'flash_attention_2'`` without a CUDA device or the ``flash_attn`` package
    (transformers' ImportError traceback once the vision tower had loaded)."""
    model = cfg.get('model')
    attention = model.get('attn_implementation') if isinstance(model, Mapping) else None
    if attention not in ('flex_attention', 'flash_attention_2'):
        return None
    import torch
    instead = "use 'sdpa_segments' (packed rows: each sample's causal attention) or 'sdpa'"
    if attention == 'flex_attention':
        return None if torch.cuda.is_available() else (
            "model.attn_implementation='flex_attention' trains on a GPU only: PyTorch's FlexAttention has no backward "
            f'on a CPU; on a CPU {instead}')
    import importlib.util
    if not torch.cuda.is_available():
        return ("model.attn_implementation='flash_attention_2' runs on a CUDA GPU only (the flash_attn package's "
                f'kernels); on a CPU {instead}')
    if importlib.util.find_spec('flash_attn') is None:
        return ("model.attn_implementation='flash_attention_2' needs the flash_attn package, which is not installed "
                f"(pip install flash-attn, built for this torch and CUDA); or {instead}, or 'sdpa_varlen' (packed "
                "rows in one varlen_attn call)")
    return None


def _type_name(spec) -> str:
    kind = spec.get('type') if isinstance(spec, Mapping) else None
    return kind if isinstance(kind, str) else getattr(kind, '__name__', '')


def preference_data_refusal(cfg: Mapping) -> Optional[str]:
    """Preference pairs (``InternVLPreferenceDataset``, packed or not, or ``preference_collate_fn``) for a model
    without ``preference=``: the run built everything, then stopped at its first step in a ValueError traceback;
    None when the model has a preference setting or the data are not pairs."""
    model, loader = cfg.get('model'), cfg.get('train_dataloader')
    if not isinstance(model, Mapping) or not isinstance(loader, Mapping) or model.get('preference') is not None:
        return None
    names, spec = [_type_name(loader.get('collate_fn'))], loader.get('dataset')
    while isinstance(spec, Mapping):
        names.append(_type_name(spec))
        spec = spec.get('dataset')
    pairs = next((n.rpartition('.')[2] for n in names if n.rpartition('.')[2] in (
        'InternVLPreferenceDataset', 'preference_collate_fn')), None)
    if pairs is None:
        return None
    return (f'model.preference is None, but the data are preference pairs ({pairs}): a preference config needs '
            f'its loss, e.g. model.preference.beta=0.1 (DPO; docs/preference.md), or train SFT data with an SFT '
            f'config (finetune_*.py)')


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


def checkpoint_hook(cfg: Mapping) -> Mapping:
    hooks = cfg.get('default_hooks')
    hook = hooks.get('checkpoint') if isinstance(hooks, Mapping) else None
    return hook if isinstance(hook, Mapping) else {}


def checkpoint_dir(cfg: Mapping) -> Optional[str]:
    """The folder the run's checkpoints go to: the work folder, or MMEngine's ``out_dir/<the work folder's
    name>`` when ``default_hooks.checkpoint.out_dir`` is set."""
    work_dir, out_dir = cfg.get('work_dir'), checkpoint_hook(cfg).get('out_dir')
    if not isinstance(work_dir, str) or not work_dir:
        return None
    if isinstance(out_dir, str) and out_dir and '://' not in out_dir:
        return os.path.join(out_dir, os.path.basename(os.path.normpath(os.path.abspath(work_dir))))
    return work_dir


def checkpoint_names(names: List[str]) -> str:
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
                    f'holds the checkpoints of an earlier run ({checkpoint_names(names)}): this new run would write '
                    f'its own iter_N.pth over them and rotate them out. Continue that run with --cfg-options '
                    'resume=True, give this run a work folder of another name or another out_dir, or move them '
                    'away first')
    if not made:
        return None
    names = [os.path.basename(path) for path in find_checkpoints(work_dir)]
    pointer = os.path.join(work_dir, 'last_checkpoint')
    if not names and not os.path.isfile(pointer):
        return None
    shown = checkpoint_names(names)
    try:
        with open(pointer, encoding='utf-8') as f:
            shown += f'{"; " if shown else ""}last_checkpoint -> {f.read().strip()}'
    except OSError:
        pass
    return (f'the work folder {work_dir} holds the checkpoints of an earlier run ({shown}): this new run would '
            f'write its own iter_N.pth over them and leave two runs mixed in one folder. Continue that run with '
            f'--cfg-options resume=True (or --resume CHECKPOINT), give this run another --work-dir, or move them '
            f'away first')
