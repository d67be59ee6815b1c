"""A next stage builds the model its previous stage trained, read from that stage's checkpoint, not typed again.

The stage configs build InternViT + Qwen2.5 with the pixel-shuffle projector. A model of other parts (a SigLIP or
CLIP tower, LLaVA's ``mlp`` projector, another LLM, an official InternVL folder) was given to its warm-up as
``--cfg-options``; its next stage, given ``model.pretrained_pth=iter_N.pth`` alone, was refused option by option
at start-up (the folders by their fingerprints, ``lineage.check_sources``; the projector and the image mode by the
geometry check, ``stages.geometry_problem``), each to be typed again as its first stage had it.

:func:`take_previous_settings` takes them from ``model.pretrained_pth``'s recorded config (``meta['cfg']``), where
the command line names none of them:

* the source folders (``model.vision_encoder``, ``llm``, ``tokenizer``, ``official_checkpoint``), as a resume takes
  them (``settings_taker.take_sources``): the recorded folder where it is still there (its absolute path first),
  a tower given as a dict of settings whole; a folder gone is said, and the config's kept (its fingerprint is then
  compared, as before);
* what shapes the features the projector learnt on (:data:`PARTS`, the vision tower's :data:`TOWER` settings): what
  the geometry check compares.

Only what those checks compare is taken (what a stage may not change): what the stage trains (freezing, LoRA, the
preference loss), how it computes and its data are its own. A setting named on the command line stays, and the checks refuse it where
it differs. A previous stage whose model is of another class than this config's gives nothing (said). What was
taken is said in the run's log (``resumed_settings.say_taken``) and recorded in this stage's checkpoints, its
converter's and a resume's source of the model.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional

from xtuner_plugins.engine.settings_taker import Taker, differs, kind_of, take_sources

#: the model's settings that shape the projector's input (``stages.vision_geometry``'s)
PARTS = ('projector', 'image_mode', 'downsample_ratio', 'ps_version', 'select_layer')
#: a vision tower's settings of the same kind (a dict with ``type``) taken beside its folder
TOWER = ('select_layer', 'mean', 'std')


def starts_from(cfg: Mapping) -> Optional[str]:
    """The previous stage a new run starts from (``model.pretrained_pth``, a file or folder that is there), or None:
    none, or a resume (its checkpoint's settings are taken whole, ``resumed_settings``)."""
    model = cfg.get('model')
    path = model.get('pretrained_pth') if isinstance(model, Mapping) else None
    if not isinstance(path, str) or not path or not os.path.exists(path):
        return None
    from xtuner_plugins.engine.loaded_lineage import loaded_checkpoint
    return None if cfg.get('resume') is True and loaded_checkpoint(cfg) else path


def take_previous_settings(cfg: dict, given: Iterable[str]) -> Taker:
    """Take the model's parts from ``model.pretrained_pth``'s recorded config into ``cfg`` (in place) where the
    command line (``given``: the keys it named) names none of them (module docstring); the taker holds what was
    taken and what was not, with why."""
    taker = Taker(given)
    path = starts_from(cfg)
    if path is None:
        return taker
    from xtuner_plugins.models.checkpoint import read_meta, recorded_model_config
    from xtuner_plugins.models.lineage import read_lineage
    try:
        meta = read_meta(path)
        then = recorded_model_config(path, meta)
        record = (read_lineage(path) or {}).get('sources') or {}
    except (OSError, ValueError):   # a checkpoint that does not read: pretrained_refusal says what is wrong with it
        return taker
    model = cfg['model']
    if not isinstance(then, dict):
        return taker
    if 'type' in then and 'type' in model and kind_of(then) != kind_of(model):
        taker.left.append(f'it trained the model {kind_of(then)}, and this config builds {kind_of(model)} (its '
                          'parts are not taken)')
        return taker
    take_sources(taker, model, then, record)
    for key in PARTS:
        if key in then and differs(then[key], model.get(key)):
            taker.take(model, key, then[key], f'model.{key}')
    tower, theirs = model.get('vision_encoder'), then.get('vision_encoder')
    if isinstance(tower, dict) and isinstance(theirs, dict) and kind_of(tower) == kind_of(theirs):
        for key in TOWER:
            if key in theirs and differs(theirs[key], tower.get(key)):
                taker.take(tower, key, theirs[key], f'model.vision_encoder.{key}')
    return taker
