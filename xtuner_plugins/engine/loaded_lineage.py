"""The previous stage of the checkpoint a run resumes (``--resume PATH``, ``resume=True``) or starts from
(``load_from=PATH``), read from that checkpoint's lineage (``models/lineage.py``) before the model is built.

A checkpoint holds only what its own stage trained: its LoRA adapters, for one, are deltas over the model its
previous stages left (``model.pretrained_pth``, their adapters merged). A resume or a ``load_from`` that built the
model over another previous stage put the adapters on another base without a word, and the later checkpoints
recorded the new parent. So (:func:`previous_stage_of_loaded`):

* ``model.pretrained_pth`` unset: the checkpoint's recorded previous stage is taken (found where it was recorded,
  under ``--remap``, or beside the checkpoint by its content), said in the log: what a checkpoint was trained from
  is read from it, not typed again (a resume without it was refused as a stage starting from nothing);
* set to another checkpoint (its fingerprint not the recorded one): refused naming both;
* set where a resumed checkpoint records none (trained from scratch or from an official folder): refused.

A preference model (``model.preference``) builds its reference policy (the model with its LoRA adapters off, or
frozen copies of the trained parts) from ``model.pretrained_pth`` when it is built, before MMEngine loads
``load_from``'s weights into the policy. A ``load_from`` (not a resume) of another stage's checkpoint (an SFT's)
trained against that checkpoint's previous stage (the warm-up: rewards not 0 at the first step), and what it loaded
into frozen parts or under other keys (a LoRA SFT's projector, a full SFT's LLM under LoRA) was lost:
:func:`load_from_other_stage` refuses it, and a checkpoint of a stage that trained other parts (LoRA / whole) in any
run, before anything is built; ``model.pretrained_pth=PATH`` builds the model and its reference from it.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple


def loaded_checkpoint(cfg: Mapping) -> Optional[str]:
    """The checkpoint the run loads: ``load_from`` (``--resume PATH`` sets it), or with ``resume=True`` alone the
    one the work folder's ``last_checkpoint`` names; None: none, or one the resume's own checks refuse."""
    load_from = cfg.get('load_from')
    if isinstance(load_from, str) and load_from:
        return load_from if os.path.exists(load_from) else None
    work_dir = cfg.get('work_dir')
    if cfg.get('resume') is not True or not isinstance(work_dir, str):
        return None
    from xtuner_plugins.engine.resume import ResumeError, resume_target
    try:
        return resume_target(work_dir)[0]
    except ResumeError:   # said by the resume itself
        return None


def previous_stage_of_loaded(cfg: Mapping) -> Optional[str]:
    """Why the run's ``model.pretrained_pth`` is not the previous stage of the checkpoint it loads (module
    docstring), or None; fills it in (in place, said in the log) where it is unset and the checkpoint records one."""
    from xtuner_plugins.errors import Refused
    from xtuner_plugins.models.fingerprints import fingerprint, fingerprint_differences
    from xtuner_plugins.models.lineage import locate_previous, read_lineage
    model = cfg.get('model')
    path = loaded_checkpoint(cfg) if isinstance(model, Mapping) else None
    if path is None:
        return None
    resuming = cfg.get('resume') is True
    from xtuner_plugins.engine.resume import resume_words
    what = resume_words(cfg.get('load_from'), path) if resuming else f'load_from={path}'
    try:
        record = read_lineage(path)
    except (OSError, ValueError):   # a checkpoint that does not read: its load says what is wrong with it
        return None
    previous = (record or {}).get('pretrained')
    given = model.get('pretrained_pth') or None
    if record is None or record.get('partial') and not previous:   # nothing recorded to go by
        return None
    if not previous:
        if given and resuming:
            return (f'{what} was trained from no previous stage (model.pretrained_pth unset when it was trained), '
                    f'this run gives model.pretrained_pth={given}: its weights would go on over another model than '
                    'they were trained on; leave model.pretrained_pth out')
        return None
    if not given:
        try:
            found = locate_previous(record, path)
        except Refused as exc:
            return f'{what}: {exc}'
        model['pretrained_pth'] = found
        from mmengine.logging import print_log
        print_log(f'model.pretrained_pth: {found}, the previous stage {path} records (what it was trained from)',
                  logger='current')
        return None
    if not previous.get('files') or not os.path.exists(given):   # an old record; a missing file is said later
        return None
    diffs = fingerprint_differences(previous, fingerprint(given, model_files_only=False))
    if not diffs:
        return None
    return (f'{what} was trained from {previous.get("path")} (its recorded previous stage, at '
            f'{previous.get("abspath")}), and this run gives model.pretrained_pth={given}, another checkpoint '
            f'({"; ".join(diffs[:3])}): what it trained (its LoRA adapters, its projector) would go on over another '
            'model than it was trained on; leave model.pretrained_pth out (the recorded one is taken) or give that '
            'one')


# (part, its LoRA key, its freeze key, that key's default in VisionLanguageModel)
_TRAINED_PARTS = (('the LLM', 'llm_lora', 'freeze_llm', True),
                  ('the vision tower', 'vision_lora', 'freeze_vision', True),
                  ('the projector', None, 'freeze_projector', False))


def trained_parts(model: Mapping) -> Tuple[str, ...]:
    """What a model config trains, in words (``'LoRA adapters on the LLM'``, ``'the projector'``), by
    ``VisionLanguageModel``'s settings and their defaults."""
    words = []
    for part, lora, freeze, frozen in _TRAINED_PARTS:
        if lora and model.get(lora):
            words.append(f'LoRA adapters on {part}')
        elif not model.get(freeze, frozen):
            words.append(f'{part} whole' if lora else part)
    return tuple(words)


def _listed(parts: Tuple[str, ...]) -> str:
    return ' and '.join([', '.join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts) or 'nothing'


def load_from_other_stage(cfg: Mapping) -> Optional[str]:
    """Why a run's ``load_from`` (without a resume) must be its ``model.pretrained_pth`` instead, or None (a
    checkpoint that records no config too). ``load_from`` loads a checkpoint into this run's model as it stands: one
    of a stage that trained other parts (a full SFT's into a LoRA config: its LLM under other keys; a LoRA SFT's
    into a full one; an SFT's into the warm-up: weights into frozen parts, which its checkpoints do not hold) lost what
    that stage trained, said only in warnings. A preference run's reference policy is built from
    ``model.pretrained_pth`` before ``load_from`` loads (module docstring): a checkpoint of a stage without a
    preference is refused for it too."""
    model = cfg.get('model')
    load_from = cfg.get('load_from')
    if (not isinstance(model, Mapping) or cfg.get('resume') is True or not isinstance(load_from, str)
            or not os.path.isfile(load_from) and not os.path.isdir(load_from)):
        return None
    from xtuner_plugins.models.checkpoint import recorded_model_config
    try:
        then = recorded_model_config(load_from)
    except (OSError, ValueError):   # a checkpoint that does not read: its load says what is wrong with it
        return None
    if then is None:
        return None
    instead = f'give it as model.pretrained_pth={load_from} {{}}and leave load_from out'
    if model.get('preference') is not None and then.get('preference') is None:
        reference = ('the model with its LoRA adapters off' if model.get('llm_lora')
                     else 'frozen copies of the trained parts')
        return (f'load_from={load_from} is a checkpoint of another stage (its recorded config trains no '
                f'model.preference), and this preference run builds its reference policy ({reference}) from '
                f'model.pretrained_pth ({model.get("pretrained_pth") or "the previous stage it records"}) before '
                f'load_from\'s weights load: it would train against that model, not {load_from}, and weights '
                'loaded into frozen parts are not saved; ' + instead.format('(the reference model is built from it) '))
    now_parts, then_parts = trained_parts(model), trained_parts(then)
    if now_parts == then_parts:
        return None
    return (f'load_from={load_from} is a checkpoint of another stage: it trained {_listed(then_parts)}, and this run '
            f'trains {_listed(now_parts)}; load_from puts a checkpoint into this run\'s model as it stands, so what '
            'that stage trained would be lost (tensors under other keys are not loaded; weights loaded into parts this '
            'run does not train are not in its checkpoints); ' + instead.format('')
            + ' (a previous stage: loaded first, its LoRA adapters merged)')
