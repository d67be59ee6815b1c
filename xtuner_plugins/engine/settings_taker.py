"""How a resume takes a checkpoint's recorded settings into this run's config, setting by setting
(``engine/resumed_settings.py`` says which): :class:`Taker` walks the recorded config against this one, takes
each setting that differs where the command line names none of it, and keeps what it took, what it left (with why)
and what the run's config file gave then and says otherwise now (``engine/named.py``). What a run accepts and
lets pass (:data:`SAFETY`, :data:`CHECKS`) stays this run's, said; a file or folder gone (:data:`PATHS`) is not
taken, said. A next stage takes its model's parts from its previous stage alike (``engine/previous_settings.py``).
"""

from __future__ import annotations

import copy
import os
from typing import Iterable, List, Mapping, Optional

#: the data set's settings that stay this run's: its cache, and what input it accepts (:data:`SAFETY`, said where
#: the checkpoint's differs: a run that relaxed one gives it again)
SAFETY = ('allow_links_outside', 'max_image_pixels', 'allow_control_text', 'max_bad_fraction')
#: the hooks' settings of what the run lets pass (a changed data set, non-finite steps, an eval's low reliance):
#: this run's, said where the checkpoint's differ, as :data:`SAFETY`: one resume that relaxed one does not relax
#: every later one
CHECKS = ('on_data_change', 'policy', 'max_skipped', 'min_reliance', 'on_low_reliance')
#: settings that name files or folders (the data set's, an evaluation hook's), taken only where they are there
PATHS = ('data_files', 'image_folders', 'shards', 'data_file', 'image_folder')
#: two names of one setting: the command line naming either keeps both
SAME = {'save_every': 'default_hooks.checkpoint.interval', 'default_hooks.checkpoint.interval': 'save_every'}


def named_by(key: str, keys: Iterable[str]) -> bool:
    """Whether the command line named ``key``, a part of it, or a setting that holds it."""
    return any(k == key or k.startswith(key + '.') or key.startswith(k + '.') for k in keys)


def differs(a, b) -> bool:
    from xtuner_plugins.models.provenance import comparable
    return comparable(a) != comparable(b)


def takeable(recorded, now) -> bool:
    """Whether a recorded value (read as data) can stand where ``now`` is: the same kind (a number for a number, a
    list for a tuple), or None on either side; a class or a dtype the config names is read as its text."""
    if recorded is None or now is None or isinstance(recorded, type(now)):
        return True
    kinds = ((int, float), (list, tuple))
    return any(isinstance(recorded, k) and isinstance(now, k) and not isinstance(now, bool) for k in kinds)


def either_form(now: Mapping, key: str, recorded) -> bool:
    """Whether ``recorded`` and this config's value of ``key`` are a number and a list of numbers, for a setting that
    takes either (``repeat_times``: one number for every file, or one per file). A run given
    ``--cfg-options train_dataloader.dataset.repeat_times=[4]`` over the config's ``1.0`` resumed with its files but
    not their repeats, and was refused for its data ('repeat_time 4.0 -> 1.0, used 16 -> 4')."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def numbers(v) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and all(number(x) for x in v)
    mine = now.get(key)
    if not (number(recorded) and numbers(mine) or numbers(recorded) and number(mine)):
        return False
    from xtuner_plugins.engine.signatures import parameter
    param = parameter(now.get('type'), key)
    text = str(param.annotation) if param is not None and param.annotation is not param.empty else ''
    return any(word in text for word in ('Sequence', 'List', 'list', 'Tuple', 'tuple')) and \
        any(word in text for word in ('float', 'int'))


def takes(now: Mapping, key: str) -> bool:
    """Whether the component ``now`` configures takes ``key`` (one it holds already, or its class's argument)."""
    if key in now or 'type' not in now:
        return True
    from xtuner_plugins.engine.signatures import accepted
    names = accepted(now['type'])
    return names is None or key in names


def kind_of(node: Mapping) -> str:
    from xtuner_plugins.models.provenance import comparable
    return str(comparable(node.get('type'), 'type'))


def shown(node: Mapping, key: str) -> str:
    """The config's value of ``key`` as said: 'its default' where it sets none."""
    return repr(node[key]) if key in node else 'its default'


def missing(value) -> Optional[str]:
    """The first path of a file setting's value that is not there, or None."""
    paths = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
    return next((p for p in paths if isinstance(p, str) and not os.path.exists(p)), None)


class Taker:
    def __init__(self, given: Iterable[str], named_then: Optional[List[str]] = None):
        # named_then: the keys the run's command line named (engine/named.py), None where the checkpoint records none
        self.given, self.named_then, self.taken, self.left, self.edited = list(given), named_then, [], [], []
        self.resumed = False   # a checkpoint's recorded config was read

    def take(self, node: dict, key: str, value, name: str, given_as: Optional[str] = None) -> None:
        given_as = given_as or SAME.get(name)
        if named_by(name, self.given) or (given_as and named_by(given_as, self.given)):
            return
        self.note(f'{name}={value!r} (the config: {shown(node, key)})', (name, given_as))
        node[key] = copy.deepcopy(value)

    def note(self, entry: str, names: Iterable[Optional[str]]) -> None:
        """``entry`` taken; where the run's command line named none of ``names``, its config file gave it then, and
        says otherwise now (:attr:`edited`)."""
        self.taken.append(entry)
        if self.named_then is not None and not any(n and named_by(n, self.named_then) for n in names):
            self.edited.append(entry)

    def walk(self, then: dict, now: dict, prefix: str, skip=()) -> None:
        """Take each setting of ``then`` (the recorded) that ``now`` (this run's) holds otherwise, setting by setting
        into nested ones; a class (``type``) and a setting named in ``skip`` (by its last name, or whole) stay, and
        a component of another class keeps its own."""
        if 'type' in then and 'type' in now and kind_of(then) != kind_of(now):
            self.left.append(f'{prefix}: trained as {kind_of(then)}, this config builds {kind_of(now)} (its settings '
                             'are not taken)')
            return
        for key, value in then.items():
            name, mine = f'{prefix}.{key}', now.get(key)
            if key == 'type':
                continue
            if isinstance(value, dict) and isinstance(mine, dict):
                self.walk(value, mine, name, skip)
            elif isinstance(value, dict) or isinstance(mine, dict) or not differs(value, mine) \
                    or named_by(name, self.given):
                continue
            elif key in SAFETY + CHECKS and key in skip:
                what = 'what input a run accepts' if key in SAFETY else 'what a run lets pass'
                self.left.append(f'{name}={value!r} ({what} is its own: this one has {shown(now, key)}; '
                                 'name it to keep it)')
            elif key in skip or name in skip or not (takeable(value, mine) or either_form(now, key, value)):
                continue
            elif not takes(now, key):
                self.left.append(f'{name}={value!r} (not a setting of {now["type"]!r} now)')
            elif key in PATHS and missing(value):
                self.left.append(f'{name}: {missing(value)} not found (the config\'s {mine!r} is used)')
            else:
                self.take(now, key, value, name)


def _other_form(mine, theirs) -> bool:
    """Whether the recorded source setting (``theirs``) is of another form than this config's: a folder alone
    (``--cfg-options model.vision_encoder=DIR``, its type read from its ``config.json``) where the config gives a
    dict of settings, or the other way round, or a dict of another class. Its path alone, taken into the config's
    form, built another encoder than the run's: the config's type on the run's folder (a SigLIP folder as ``clip``:
    refused), or the config's settings (``select_layer``) in place of the run's."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return kind_of(mine) != kind_of(theirs)
    return isinstance(mine, dict) != isinstance(theirs, dict) and isinstance(theirs, (str, dict))


def take_sources(taker: Taker, model: dict, then: dict, record: Mapping) -> None:
    """Take the recorded source folders (``then``: a recorded model config; ``record``: its lineage's sources, for
    their absolute paths) into ``model`` where the command line names none of them, a resume's
    (``resumed_settings``) and a next stage's (``previous_settings``): the recorded folder where it is there (its
    absolute path first), a tower of another form whole, None where the run had none; one gone is said."""
    from xtuner_plugins.models.lineage import SOURCE_KEYS
    for key in SOURCE_KEYS:
        mine, theirs = model.get(key), then.get(key)
        whole = _other_form(mine, theirs)   # then taken whole, as the run had it
        node, name = (mine, 'path') if isinstance(mine, dict) and not whole else (model, key)
        recorded = theirs.get('path') if isinstance(theirs, dict) else theirs
        if key not in then or recorded == node.get(name) or not isinstance(recorded, (str, type(None))):
            continue
        label = f'model.{key}.path' if node is mine else f'model.{key}'
        if recorded is None:   # the run had none (an official checkpoint's model, the LLM's tokenizer)
            if node is model:
                taker.take(model, key, None, label)
            continue
        found = next((p for p in ((record.get(key) or {}).get('abspath'), recorded)
                      if isinstance(p, str) and os.path.exists(p)), None)
        if found is None:
            if not named_by(label, taker.given):
                taker.left.append(f'{label}: {recorded} not found (the config\'s {node.get(name)!r} is used)')
        elif whole:
            taker.take(node, name, dict(theirs, path=found) if isinstance(theirs, dict) else found, label)
        elif found != node.get(name):
            taker.take(node, name, found, label)
