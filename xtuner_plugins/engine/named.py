"""Which settings a run's command line named (``--cfg-options``), recorded in each of its checkpoints
(``meta['cfg_named']``), so that a resume tells a setting the run was given on its command line from one it took
from the config file then.

A resume goes on with the settings its checkpoint was trained with (``engine/resumed_settings.py``). Where one of
them came from the config file, and the file now says otherwise, the file was edited (or another config given)
since the run began: the run keeps what it trained with, and says so in a WARNING naming each such setting, where
it was an INFO line among the settings the run's command line had given (a user who raised ``max_iters`` in the
file, or changed ``save_every``, read nothing that said the edit was not taken). A checkpoint without the record
(an older one) is read as before: each setting taken is said in the INFO line.

A resumed run records the keys its own command line names and those the checkpoint it resumed recorded (the
command line of the run's start still holds for them); one that resumes a checkpoint recording none records none.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Optional

KEY = 'cfg_named'

#: this run's record, once its command line is read (:func:`remember`); None: not known (a runner built in code)
_NAMED: Optional[List[str]] = None


def recorded(meta: Mapping) -> Optional[List[str]]:
    """The keys a checkpoint's ``meta`` records as named on its run's command line, or None where it records none
    (an older checkpoint) or not a list of keys."""
    keys = meta.get(KEY)
    if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
        return keys
    return None


def remember(given: Iterable[str], then: Optional[Iterable[str]] = None) -> None:
    """This run's record: the keys its command line names (``given``) and those the checkpoint it resumes
    records (``then``)."""
    global _NAMED
    _NAMED = sorted(set(given) | set(then or ()))


def forget() -> None:
    """This run's record unknown: it resumes a checkpoint that records none (an older one), whose run's command line
    is not known; a record of this one's alone would take the keys that one named for the config file's."""
    global _NAMED
    _NAMED = None


def record(checkpoint: dict) -> None:
    """Write this run's record into a checkpoint being saved (``LineageHook``), where it is known."""
    if _NAMED is not None:
        checkpoint.setdefault('meta', {})[KEY] = list(_NAMED)
