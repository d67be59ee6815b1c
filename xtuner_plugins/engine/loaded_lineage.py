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
"""

from __future__ import annotations

import os
from typing import Mapping, Optional


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
    what = f'--resume {path}' if resuming else f'load_from={path}'
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
