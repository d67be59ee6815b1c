"""What a non-strict load of a checkpoint brought back, in words: the one INFO line (tensors loaded, frozen
parameters left out by design), the WARNINGs for trained parameters the checkpoint lacks and for its tensors that
match nothing or have another shape, and the refusals of a resume into another model and of a ``load_from`` that
loaded nothing or whose tensors have other shapes. ``checkpointing.py`` wraps MMEngine's ``load_state_dict`` and
calls these.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

from xtuner_plugins.errors import Refused

SHOWN_NAMES = 10  # names listed in a warning about unexpected keys, then a count of the rest


def _named(keys: Sequence[str]) -> str:
    more = f' ... and {len(keys) - SHOWN_NAMES} more' if len(keys) > SHOWN_NAMES else ''
    return ', '.join(keys[:SHOWN_NAMES]) + more


def _groups(keys: Sequence[str]) -> str:
    """``vision_model.*, language_model.*``: the top-level modules the keys belong to, in order of appearance."""
    return ', '.join(dict.fromkeys(k.split('.')[0] + ('.*' if '.' in k else '') for k in keys))


def load_report(model, loaded: int, missing: Sequence[str], unexpected: Sequence[str],
                source: Optional[Tuple[str, str]] = None, mismatched: Sequence[str] = ()) -> List[Tuple[int, str]]:
    """``(level, line)``s on a non-strict load into ``model``: one INFO line with the tensors loaded and the frozen
    parameters and buffers left out by design; a WARNING for trained parameters missing from the checkpoint and
    one for the checkpoint's tensors that match nothing. ``source``: ``(verb, path)`` (``('resumed from', X)``)."""
    trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = [k for k in missing if 'num_batches_tracked' not in k]
    trained_missing = [k for k in missing if k in trained]
    frozen = [k for k in missing if k in params and k not in trained]
    buffers = [k for k in missing if k not in params]
    verb, where = source or ('loaded', 'a state dict')
    line = f'{verb} {where}: {loaded} tensors loaded'
    if frozen or buffers:
        line += (f'; {len(frozen)} frozen parameters' + (f' and {len(buffers)} buffers' if buffers else '')
                 + f' not in checkpoints by design ({_groups(frozen + buffers)})')
    lines = [(logging.INFO, line)]
    if trained_missing:
        lines.append((logging.WARNING, f'{len(trained_missing)} TRAINED parameters are NOT in {where}: they keep '
                      f'the values they had before this load ({_groups(trained_missing)}): '
                      f'{_named(trained_missing)}'))
    if unexpected:
        lines.append((logging.WARNING, f'{len(unexpected)} tensors of {where} match no parameter of the model and '
                      f'were not loaded ({_groups(unexpected)}): {_named(unexpected)}'))
    if mismatched:  # ``NAME [checkpoint shape] vs [model shape]``: a checkpoint of another config
        lines.append((logging.WARNING, f'{len(mismatched)} tensors of {where} have another shape than the model\'s '
                      f'and were NOT loaded (a checkpoint of another config?): {_named(mismatched)}'))
    return lines


def shape_mismatches(model, state_dict) -> List[str]:
    """``NAME [checkpoint shape] vs [model shape]`` of each tensor the load skips for its shape (MMEngine says it
    only in the message a non-strict load keeps quiet)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    return [f'{k} {list(v.shape)} vs {list(own[k].shape)}' for k, v in state_dict.items()
            if k in own and hasattr(v, 'shape') and own[k].numel() and tuple(v.shape) != tuple(own[k].shape)]


def refuse_resume_into_another_model(model, where: str, missing: Sequence[str], mismatched: Sequence[str]) -> None:
    """``Refused`` for a resume whose checkpoint does not hold every trained tensor of ``model`` at its shape (a
    LoRA rank changed: a larger one crashed in the fused AdamW step on the saved state of another size, a smaller
    one went on with its adapters reset and that state misread). Raised before the optimizer's state loads."""
    trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    lacking = [k for k in missing if k in trained]
    if not lacking and not mismatched:
        return
    what = (f'{len(mismatched)} of its tensors have another shape than this run\'s model ({_named(mismatched)})'
            if mismatched else f'{len(lacking)} trained parameters of this run are not in it ({_named(lacking)})')
    raise Refused(f'resume: {where} is not a checkpoint of this run\'s model: {what}; the settings differ from the '
                  'ones it was trained with (a LoRA rank, the trained parts?). Resume with its settings, or start a '
                  'new run from its weights (load_from=PATH, resume=False, another --work-dir)')


def refuse_load_from(where: str, unexpected: Sequence[str], mismatched: Sequence[str], loaded: int = 0) -> None:
    """``Refused`` for a ``load_from`` checkpoint none of whose tensors went into the model (another model's file:
    the run trained on from where it stood, saying only that the tensors were left out), or some of whose tensors
    have another shape than the model's (another LoRA rank, another projector width: what they held was dropped,
    said only in a warning; transformers' ``from_pretrained`` refuses such a load too)."""
    if loaded and not mismatched:
        return
    if loaded:
        raise Refused(f'load_from={where}: {len(mismatched)} of its tensors have another shape than this run\'s model '
                      f'({_named(mismatched)}): a checkpoint of other settings (a LoRA rank, a projector\'s width?), '
                      'whose tensors would be dropped. Train with its settings, or start from it as '
                      'model.pretrained_pth (a previous stage: its LoRA adapters merged, this run\'s on top)')
    what = (f'{len(mismatched)} of its tensors have another shape than the model\'s ({_named(mismatched)})'
            if mismatched else f'its {len(unexpected)} tensors match no parameter of the model ({_groups(unexpected)})')
    raise Refused(f'load_from={where}: not a checkpoint of this model, nothing in it was loaded: {what}. Give a '
                  'checkpoint this config trained (iter_N.pth), or model.pretrained_pth for a previous stage\'s')
