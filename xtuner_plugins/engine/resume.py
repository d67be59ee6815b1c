"""``WORK_DIR/last_checkpoint``, the pointer ``resume=True`` follows: written atomically, read against the work
folder it is in.

* **Written atomically.** MMEngine's checkpoint hook writes it with a plain ``open`` after each save: a kill during
  that write leaves it empty or cut. The one ``open`` of ``mmengine.hooks.checkpoint_hook`` is this module's, which
  writes the pointer through ``checkpointing.atomic_write`` (temporary file, fsync, rename) and opens anything
  else as before.
* **Read against its work folder.** The pointer holds the absolute path MMEngine wrote: in a work folder moved
  elsewhere it names a file that is gone (resume failed on it), in a copied one the original folder's checkpoint,
  which ``resume=True`` loaded without a word. :func:`resume_target` reads it: a path in the work folder (or in the
  checkpoint hook's ``out_dir``) as it is, a relative one against the work folder; one outside it is replaced by
  the work folder's own file of that name, with a warning; when there is none (or the pointer is empty, or names
  a file that is gone), start-up stops with one line (``train: refused: resume=True: ...``, exit code 2).
* **What a resume keeps and replaces.** A config whose learning rate differs from the checkpoint's is a warning
  (:func:`lr_change_note`: MMEngine loads the saved optimizer and schedule over it, so the new one is not used);
  so is a schedule whose length changed (:func:`schedule_change_note`: the saved one goes on);
  ``--resume PATH`` of a checkpoint older than others in the work folder is refused (this run's saves would
  replace them: :func:`later_checkpoints`, by kind: ``iter_N.pth`` or ``epoch_N.pth``), and ``resume=True``
  whose pointer is behind the newest file of its kind (a stop between a save and its pointer) takes the newest,
  with a warning;
  ``--resume PATH`` from another folder into a work folder holding checkpoints is refused before anything loads
  (:func:`another_run_here`: another run's, which this run's saves and rotation would replace or delete).

Applied when ``runtime`` is imported (:func:`apply_resume_patches`), with the other runner patches.
"""

from __future__ import annotations

import contextvars
import functools
import io
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from mmengine.logging import print_log

from xtuner_plugins.engine.checkpointing import atomic_write
from xtuner_plugins.errors import Refused
from xtuner_plugins.outcome import checkpoint_number, deepspeed_checkpoint, find_checkpoints

__all__ = ['POINTER', 'ResumeError', 'apply_resume_patches', 'checkpoint_dirs', 'find_latest_checkpoint',
           'resume_target', 'resume_words']

_PATCH_MARK = '_xtuner_plugins_resume_patch'
_applied: List[str] = []
POINTER = 'last_checkpoint'


class _AtomicPointer(io.StringIO):
    """What MMEngine's checkpoint hook gets from ``open(WORK_DIR/last_checkpoint, 'w')``
    (``with open(...) as f: f.write(path)``): written when its ``with`` ends without an error, and only then. A
    pointer a stop left unfinished (between the ``open`` and the write, or inside the write) is not written by a later
    ``close()``, the garbage collector's included, which could come after the run's closing line had named the
    checkpoint before it."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __exit__(self, kind, *args) -> None:
        try:
            if kind is None and not self.closed:  # (an error in the with: the old pointer stays)
                atomic_write(self.getvalue(), self.path)
        finally:
            self.close()


def _pointer_open(file, mode='r', *args, **kwargs):
    if isinstance(file, (str, Path)) and os.path.basename(str(file)) == POINTER and mode == 'w':
        return _AtomicPointer(str(file))
    return open(file, mode, *args, **kwargs)


def _patch_pointer_write() -> bool:
    """The one ``open`` of ``mmengine.hooks.checkpoint_hook`` writes the pointer: that module's name ``open``
    is this project's, which writes ``last_checkpoint`` atomically and opens anything else as before."""
    from mmengine.hooks import checkpoint_hook
    if getattr(checkpoint_hook.__dict__.get('open'), _PATCH_MARK, False):
        return False
    setattr(_pointer_open, _PATCH_MARK, True)
    checkpoint_hook.open = _pointer_open
    return True


# the runner whose load_or_resume is under way in this thread (its checkpoint hook's out_dir is a checkpoint's
# legitimate place outside the work folder)
_RESUMING: contextvars.ContextVar = contextvars.ContextVar('xtuner_plugins_resuming', default=None)


class ResumeError(Refused):
    """``resume=True`` cannot tell which checkpoint to load (the message says what to do)."""


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resume_target(work_dir: str, out_dirs: Sequence[str] = ()) -> Tuple[Optional[str], str]:
    """``(checkpoint, note)``: what ``WORK_DIR/last_checkpoint`` names, read against ``work_dir`` (module
    docstring); ``(None, '')`` without a pointer and checkpoints (checkpoints without it: refused, a resume from
    nothing would write over them); ``note`` says when a checkpoint of the same name in the work
    folder replaced one outside it, or that a newer checkpoint than the one named was taken (a stop between a
    save and its pointer: a resume of the one named would replace it). ``out_dirs``: other folders the run saves
    its checkpoints to.
    Raises :class:`ResumeError` when the pointer names nothing that can be loaded."""
    pointer = os.path.join(work_dir, POINTER)
    if not os.path.isfile(pointer):
        from xtuner_plugins.engine.refusals import checkpoint_names
        saved = sorted((c for d in (work_dir, *out_dirs) for c in find_checkpoints(d)),
                       key=lambda c: checkpoint_number(c)[1])
        if saved:   # a resume from nothing would write its own iter_N.pth over them
            names = checkpoint_names([os.path.basename(c) for c in saved])
            raise ResumeError(f'resume=True: {work_dir} holds checkpoints ({names}) but no {POINTER}, the pointer '
                              f'resume=True follows; give the one to resume from with --resume PATH (the newest: '
                              f'{saved[-1]}), or move them away (or give another --work-dir) to start this run over')
        return None, ''
    restart = (f'give the checkpoint to resume from with --resume PATH, or delete {pointer} (and move away the '
               'checkpoints beside it) to start this run over')
    try:
        with open(pointer, encoding='utf-8') as f:
            named = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:   # damaged, or another program's file
        raise ResumeError(f'resume=True: {pointer} is not a path that can be read ({exc}); {restart}') from None
    if not named:
        raise ResumeError(f'resume=True: {pointer} is empty; {restart}')
    if not os.path.isabs(named):
        found, note = os.path.join(work_dir, named), ''
    elif any(_same_dir(os.path.dirname(named), d) for d in (work_dir, *out_dirs)):
        found, note = named, ''
    else:
        found = os.path.join(work_dir, os.path.basename(named))
        if not os.path.exists(found):
            raise ResumeError(f'resume=True: {pointer} names {named}, which is not in this work folder ({work_dir}; '
                              f'moved or copied from elsewhere?), and {work_dir} has no {os.path.basename(named)}; '
                              f'{restart}')
        note = (f'{pointer} names {named}, outside this work folder (it was moved or copied): resuming from '
                f'{found}, its own checkpoint of that name')
    if not os.path.exists(found):
        raise ResumeError(f'resume=True: {pointer} names {found}, which does not exist; {restart}')
    number = checkpoint_number(found)
    later = later_checkpoints((work_dir, *out_dirs), *number) if number else []
    if later:   # a stop between a save and its pointer's write: the save is whole (written under a temporary name)
        note = '; '.join(filter(None, [note, (
            f'{pointer} names {os.path.basename(found)}, and {later[-1]} is newer (the run stopped between its save '
            f'and the pointer\'s write; checkpoints are written whole): resuming from {later[-1]}, which this run\'s '
            'saves would otherwise have replaced')]))
        found = later[-1]
    return found, note


def checkpoint_dirs(runner) -> List[str]:
    """Where ``runner``'s checkpoint hooks save other than its work folder (their ``out_dir``: before training
    as configured, MMEngine adds the work folder's name when training starts: both)."""
    from mmengine.hooks import CheckpointHook
    dirs = []
    for hook in getattr(runner, '_hooks', []) if runner is not None else []:
        out = getattr(hook, 'out_dir', None) if isinstance(hook, CheckpointHook) else None
        if isinstance(out, str) and not _same_dir(out, runner.work_dir):
            dirs += [out, os.path.join(out, os.path.basename(runner.work_dir.rstrip(os.sep)))]
    return dirs


def find_latest_checkpoint(path: str) -> Optional[str]:
    """MMEngine's ``find_latest_checkpoint`` for ``resume=True``, through :func:`resume_target`; a pointer that
    names nothing loadable stops the run with one line (``train: refused: ...``, exit code 2)."""
    from xtuner_plugins.engine.runstart import refuse
    try:
        found, note = resume_target(path, checkpoint_dirs(_RESUMING.get()))
    except ResumeError as exc:
        refuse(str(exc))
    if found is None:
        print_log('Did not find last_checkpoint to be resumed.', logger='current')
    if note:
        print_log(note, logger='current', level=logging.WARNING)
    return found


def _patch_resume_pointer() -> bool:
    from mmengine.runner import FlexibleRunner, Runner, _flexible_runner
    from mmengine.runner import runner as runner_module
    if getattr(runner_module.find_latest_checkpoint, _PATCH_MARK, False):
        return False
    setattr(find_latest_checkpoint, _PATCH_MARK, True)
    runner_module.find_latest_checkpoint = _flexible_runner.find_latest_checkpoint = find_latest_checkpoint
    for cls in (Runner, FlexibleRunner):
        original = cls.load_or_resume

        @functools.wraps(original)
        def load_or_resume(self, _original=original):
            token = _RESUMING.set(self)
            try:
                return _original(self)
            finally:
                _RESUMING.reset(token)

        cls.load_or_resume = load_or_resume
    return True


def _base_lrs(runner) -> List[float]:
    """Each parameter group's learning rate before any schedule (``initial_lr``); [] where there is none to read
    (an optimizer wrapper without param_groups, as DeepSpeed's may be)."""
    try:
        groups = runner.optim_wrapper.param_groups
        return [float(g.get('initial_lr', g['lr'])) for g in groups]
    except (AttributeError, KeyError, TypeError, ValueError):
        return []


def lr_change_note(filename: str, configured: Sequence[float], saved: Sequence[float]) -> Optional[str]:
    """The warning for a resume whose checkpoint brought other learning rates than this run's config gives
    (``configured``, read before the load; ``saved``, after it), or None."""
    if not configured or len(configured) != len(saved):
        return None
    changed = [(c, s) for c, s in zip(configured, saved) if abs(c - s) > 1e-12 * max(abs(c), abs(s), 1.0)]
    if not changed:
        return None
    mine, theirs = changed[0]
    return (f'resumed from {filename}: its optimizer and schedule go on with the learning rate they were saved with '
            f'({theirs:g}{", and others" if len(changed) > 1 else ""}), not this run\'s ({mine:g}, '
            'optim_wrapper.optimizer.lr): a resume continues the saved run as it was; to train with the new '
            'learning rate, start a new run from the checkpoint\'s weights (load_from=PATH, resume=False, '
            'another --work-dir)')


def later_checkpoints(dirs: Sequence[str], kind: str, number: int) -> List[str]:
    """The checkpoints of ``dirs`` of ``kind`` (``iter``: ``iter_N.pth``, ``epoch``: ``epoch_N.pth``) with N above
    ``number``, oldest first: what a run resumed from the checkpoint ``kind_number`` would write over."""
    later = [(checkpoint_number(c), c) for d in dict.fromkeys(dirs) for c in find_checkpoints(d)]
    return [c for (k, n), c in sorted(later) if k == kind and n > number]


def _schedule_ends(runner) -> List[Tuple[str, int]]:
    """Each parameter scheduler's class and end (iterations, or epochs for one by epoch): what a resume loads over
    the ones this run's length built."""
    schedulers = getattr(runner, 'param_schedulers', None) or []
    if isinstance(schedulers, dict):
        schedulers = [s for group in schedulers.values() for s in group]
    return [(type(s).__name__, int(getattr(s, 'end', 0))) for s in schedulers if hasattr(s, 'end')]


def schedule_change_note(filename: str, configured: Sequence[Tuple[str, int]],
                         saved: Sequence[Tuple[str, int]]) -> Optional[str]:
    """The warning for a resume whose checkpoint's schedule ends elsewhere than this run's (``max_iters`` or
    ``max_epochs`` changed: MMEngine goes on with the saved schedule, whose decay ended or ends at its old length),
    or None."""
    changed = [(c, s) for c, s in zip(configured, saved) if c[0] == s[0] and c[1] != s[1]]
    if not changed or len(configured) != len(saved):
        return None
    (name, mine), (_, theirs) = changed[-1]
    return (f'resumed from {filename}: its learning-rate schedule goes on as it was saved, {name} ending at '
            f'{theirs}, not at this run\'s {mine} (max_iters or max_epochs changed): a resume continues the saved '
            f'run, so the decay does not follow the new length (past {theirs} the rate stays where the schedule '
            'ended); to train with a schedule of the new length, start a new run from the checkpoint\'s weights '
            '(load_from=PATH, resume=False, another --work-dir)')


def another_run_here(work_dir: str, filename: str) -> List[str]:
    """The checkpoints of ``work_dir`` when ``filename`` (given to ``--resume``) is not among them: another run's,
    which this run's saves and their rotation would replace (a resume from elsewhere into a folder of older work,
    ``work_dirs/CONFIG`` when ``--work-dir`` is left out)."""
    if not filename or not os.path.isdir(work_dir):
        return []
    here = os.path.realpath(work_dir)
    if os.path.realpath(os.path.dirname(os.path.abspath(str(filename)))) == here:   # the file may link elsewhere
        return []
    return find_checkpoints(work_dir)


def setting_conflicts(filename: str, cfg) -> List[str]:
    """``'key: trained A, given B'`` for each setting that shapes the model or its inputs (``runconfig``'s: the
    LoRA scaling, the projector, tiling, template, system message, frame prefix) that the run resumed from
    ``filename`` was trained with otherwise than ``cfg`` gives. A resume with another ``lora_alpha`` went on
    without a word, and its later checkpoints merged adapters trained at two scalings."""
    from xtuner_plugins.models.checkpoint import config_settings, read_meta
    from xtuner_plugins.models.runconfig import setting_conflicts as conflicts
    try:
        text = read_meta(filename).get('cfg') if cfg is not None else None
        recorded = config_settings(text, f"{filename}: meta['cfg'] (the training config)") if text else None
    except (OSError, ValueError):   # a checkpoint that does not read: the load says what is wrong with it
        return []
    return conflicts(recorded, cfg) if recorded else []   # none recorded (before MMEngine stored it): nothing to say


def saved_kind_refusal(filename: str, strategy, said: Optional[str] = None) -> Optional[str]:
    """Why ``filename`` cannot be resumed by this run: a DeepSpeed checkpoint (a folder of partitions) without
    ``--deepspeed``, or a plain one (a file) under it, or a folder DeepSpeed did not save, or one of another ZeRO
    stage or number of ranks (``zero_layout.py``); None when it fits.
    ``said``: how the message names the resume (:func:`resume_words`)."""
    said = said or f'--resume {filename}'
    deepspeed = type(strategy).__name__ == 'DeepSpeedStrategy'
    if os.path.isdir(filename) and not deepspeed_checkpoint(filename):
        return (f'{said}: a folder that holds no checkpoint (a DeepSpeed checkpoint holds '
                '*model_states.pt; other checkpoints are one file); resume from another checkpoint')
    if os.path.isdir(filename) and deepspeed:   # another ZeRO stage, or another number of ranks
        from mmengine.dist import get_world_size
        from xtuner_plugins.engine.zero_layout import zero_refusal
        return zero_refusal(filename, strategy, get_world_size(), said)
    if os.path.isdir(filename) == deepspeed or not os.path.exists(filename):
        return None
    if deepspeed:
        return (f'{said}: a checkpoint saved without DeepSpeed (one file), and this run trains under '
                '--deepspeed, which resumes only its own checkpoints (a folder of partitions); resume it without '
                '--deepspeed, or start a new run from its weights (model.pretrained_pth=PATH, another --work-dir)')
    return (f'{said}: a DeepSpeed checkpoint (a folder of partitions), and this run trains without '
            '--deepspeed; resume it with the --deepspeed it was saved with, or start a new run from its weights '
            '(model.pretrained_pth=PATH, another --work-dir)')


def check_resumed_sources(filename: str, model, said: Optional[str] = None) -> None:
    """Refuse (:class:`Refused`) a resume whose model is built from other source folders (the LLM, the vision
    encoder, the tokenizer, an official checkpoint) than the checkpoint's lineage records, fingerprints compared as
    the converter compares them: adapters trained on one LLM went on over another without a word, and the later
    checkpoints recorded only the new one (so they converted onto it)."""
    from xtuner_plugins.engine.nonfinite import unwrap_model
    from xtuner_plugins.models.lineage import check_sources, read_lineage
    sources = (getattr(unwrap_model(model), 'lineage', None) or {}).get('sources')
    if not sources:
        return
    try:
        recorded = read_lineage(filename)
    except (OSError, ValueError):   # a checkpoint that does not read: the load says what is wrong with it
        return
    check_sources(recorded, sources, said or f'--resume {filename}')


def resume_words(load_from, filename) -> str:
    """How a message names the resume of ``filename``: ``--resume PATH`` where it was given (``load_from``, which
    ``--resume PATH`` sets), else ``resume=True (PATH)``, the checkpoint the work folder's pointer led to (a user who
    typed resume=True was told of a --resume they never gave)."""
    return f'--resume {filename}' if load_from else f'resume=True ({filename})'


def _patch_resume_lr() -> bool:
    """A resume with another learning rate in the config said in a warning (:func:`lr_change_note`): MMEngine
    loads the optimizer's and the schedulers' state, learning rates included, over the config's without a word."""
    from mmengine.runner import FlexibleRunner, Runner
    if getattr(Runner.resume, _PATCH_MARK, False):
        return False
    for cls in (Runner, FlexibleRunner):
        original = cls.resume

        @functools.wraps(original)
        def resume(self, filename, *args, _original=original, **kwargs):
            others = another_run_here(self.work_dir, filename) if getattr(self, '_load_from', None) else []
            if others:   # before anything is loaded
                raise Refused(f'--resume {filename}: this work folder ({self.work_dir}) holds another run\'s '
                              f'checkpoints ({", ".join(os.path.basename(p) for p in others[-3:])}), which this '
                              'run\'s saves and their rotation (max_keep_ckpts) would replace or delete; give this '
                              'run another --work-dir (the checkpoint is read where it is), or resume in its own '
                              'folder')
            said = resume_words(getattr(self, '_load_from', None), filename)
            kind = saved_kind_refusal(str(filename), getattr(self, 'strategy', None), said)
            if kind:   # DeepSpeed's loader asserted on a file, MMEngine's said a folder 'can not be found'
                raise Refused(kind)
            check_resumed_sources(str(filename), getattr(self, 'model', None), said)   # before anything is loaded
            problems = setting_conflicts(str(filename), getattr(self, 'cfg', None))
            if problems:   # before anything is loaded
                raise Refused(f'{said}: it was trained with other settings than this run\'s config '
                              f'gives: {"; ".join(problems)}. A resume goes on with that run: give its settings '
                              '(the checkpoint records them), or start a new run from its weights (--cfg-options '
                              'load_from=PATH, without --resume, another --work-dir)')
            configured, ends = _base_lrs(self), _schedule_ends(self)
            result = _original(self, filename, *args, **kwargs)
            end = getattr(getattr(self, '_train_loop', None), 'max_iters', None)
            if isinstance(end, int) and self.iter > end:   # the loop would end at once, 'done', nothing saved
                raise Refused(f'{said}: its iteration {self.iter} is past this run\'s last, {end} '
                              f'(max_iters, or max_epochs x the batches of an epoch: a shorter schedule or less '
                              f'data than it was trained with): nothing would be trained. Give the schedule it '
                              f'was trained with, or a longer one, to go on; the checkpoint itself is usable as it '
                              f'is (tools/convert_to_official.py)')
            for note in (lr_change_note(str(filename), configured, _base_lrs(self)),
                         schedule_change_note(str(filename), ends, _schedule_ends(self))):
                if note:
                    print_log(note, logger='current', level=logging.WARNING)
            # --resume PATH of an older checkpoint (resume=True took the newest of its kind: resume_target)
            number = checkpoint_number(str(filename)) or ('iter', self.iter)   # one renamed: where it loaded
            later = later_checkpoints([self.work_dir], *number) if getattr(self, '_load_from', None) else []
            if later:
                raise Refused(f'--resume {filename} (iteration {self.iter}): this work folder holds later '
                              f'checkpoints ({", ".join(os.path.basename(p) for p in later)}) that this run\'s '
                              'saves would replace; give this run another --work-dir (the checkpoint is read '
                              'where it is), or move them away to go on here')
            return result

        setattr(resume, _PATCH_MARK, True)
        cls.resume = resume
    return True


def apply_resume_patches() -> List[str]:
    """Apply the patches once (module docstring); returns the names newly applied."""
    newly = [p.__name__.lstrip('_') for p in (_patch_pointer_write, _patch_resume_pointer, _patch_resume_lr)
             if p()]
    _applied.extend(newly)
    return newly
