"""Lineage: what a checkpoint was trained from, recorded in it and checked wherever it is used.

A checkpoint holds only what its stage trained; the rest comes back from elsewhere when it is used: the frozen
towers from their folders (``model.vision_encoder``, ``model.llm``, ``model.tokenizer``,
``model.official_checkpoint``) and everything earlier stages trained from their checkpoints
(``model.pretrained_pth``). Shapes alone do not tell another tower or another warm-up from the right one, so every
checkpoint records (``meta['lineage']``, written by ``LineageHook``) :func:`lineage_record`:

- ``sources``: each source folder with a fingerprint (``fingerprints.py``) of its weights, config and tokenizer
  files;
- ``pretrained``: the previous stage's checkpoint (the path as given, its absolute path, its fingerprint);
- ``llm_lora`` / ``vision_lora``: the adapters' settings (a later stage merges them, see below);
- ``from_scratch``: the stage was started without a previous stage on purpose.

:func:`resolve_chain` follows ``pretrained`` from the last checkpoint back to the first stage, checking each link's
fingerprint, so that a user passes the last checkpoint only. Building a model on a chain
(``VisionLanguageModel.load_stages``) loads the stages oldest first; a stage that trained LoRA adapters has them
merged into the weights before the next stage's fresh adapters go on top, so a preference stage's reference (the
model with its adapters off) is the fine-tuned model, not the one before fine-tuning. :func:`check_sources`
refuses a source folder whose fingerprint is not the one recorded, naming both paths and the files that differ.

Checkpoints written before lineage was recorded give what their recorded config says (paths and adapters, no
fingerprints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from xtuner_plugins.errors import Refused

from .fingerprints import fingerprint, fingerprint_differences

LINEAGE_VERSION = 1
SOURCE_KEYS = ('vision_encoder', 'llm', 'tokenizer', 'official_checkpoint')


def source_paths(vision_encoder=None, llm=None, tokenizer=None, official_checkpoint=None) -> Dict[str, str]:
    """The source folders a model is built from (a vision encoder given as ``dict(path=...)`` included)."""
    if isinstance(vision_encoder, dict):
        vision_encoder = vision_encoder.get('path')
    given = dict(vision_encoder=vision_encoder, llm=llm, tokenizer=tokenizer, official_checkpoint=official_checkpoint)
    return {k: v for k, v in given.items() if isinstance(v, str)}


def lineage_record(sources: Dict[str, str], pretrained_pth: Optional[str] = None, llm_lora: Optional[dict] = None,
                   vision_lora: Optional[dict] = None, from_scratch: bool = False) -> dict:
    """What a stage is trained from (module docstring); stored in each of its checkpoints."""
    pretrained = None
    if pretrained_pth:
        pretrained = dict(fingerprint(pretrained_pth, model_files_only=False) or {},
                          path=pretrained_pth, abspath=os.path.abspath(pretrained_pth))
    return dict(version=LINEAGE_VERSION,
                sources={k: fingerprint(p) or dict(path=p) for k, p in sources.items()},
                pretrained=pretrained, llm_lora=_plain(llm_lora), vision_lora=_plain(vision_lora),
                from_scratch=bool(from_scratch))


def _plain(value):
    """Settings as plain, picklable values (config dicts, tuples, classes by name)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, '__qualname__', str(value))


def read_lineage(checkpoint: str) -> Optional[dict]:
    """The lineage recorded in ``checkpoint``, checked (:func:`lineage_problem`); for one written before lineage
    was recorded, what its recorded config says (paths and adapters, no fingerprints, ``partial: True``); None
    when neither is there.

    Raises:
        ValueError: naming the checkpoint and the field, for a record that is not what training writes.
    """
    from .checkpoint import read_meta, recorded_model_config
    meta = read_meta(checkpoint)
    if meta.get('lineage') is not None:
        problem = lineage_problem(meta['lineage'])
        if problem:
            raise Refused(f"{checkpoint}: its recorded lineage (meta['lineage']) is not what training writes: "
                          f'{problem}; use a checkpoint as training wrote it')
        disagree = meta.get('cfg') and records_disagree(recorded_model_config(checkpoint, meta), meta['lineage'])
        if disagree:
            raise Refused(f"{checkpoint}: its training config and its lineage (meta['cfg'], meta['lineage']) "
                          f'disagree ({disagree}): changed after training; use the checkpoint as training wrote it')
        return meta['lineage']
    model = recorded_model_config(checkpoint, meta)
    if model is None:
        return None
    pretrained = model.get('pretrained_pth')
    if pretrained is not None and not isinstance(pretrained, str):
        raise Refused(f"{checkpoint}: meta['cfg'] (the training config) sets model.pretrained_pth to "
                      f'{pretrained!r}, not a path; use a checkpoint as training wrote it')
    return dict(version=0, partial=True, sources={},
                pretrained=dict(path=pretrained, abspath=None) if pretrained else None,
                llm_lora=_plain(model.get('llm_lora')), vision_lora=_plain(model.get('vision_lora')),
                from_scratch=False)


def records_disagree(model: dict, record: dict) -> Optional[str]:
    """Where a checkpoint's two records of its LoRA settings differ (``model``: its config's model settings, which the
    converter builds from; ``record``: its lineage, which a next stage merges its adapters by):
    ``'model.llm_lora.lora_alpha: 32 and 16'``, or None. One file edited so gave two models, by the tool that read
    it; :func:`read_lineage` refuses it for both."""
    from .provenance import comparable
    for key in ('llm_lora', 'vision_lora'):
        if key not in record:
            continue
        a, b = comparable(model.get(key)), comparable(record.get(key))
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = ({k: v for k, v in d.items() if k != 'type'} for d in (a, b))
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    return f'model.{key}.{k}: {a.get(k)!r} and {b.get(k)!r}'
        elif (a is None) != (b is None):
            return f'model.{key}: {a!r} and {b!r}'
    return None


def _kind(value) -> str:
    return f'{type(value).__name__} {value!r}'[:100]


def _fingerprint_problem(value, field: str) -> Optional[str]:
    """The problem of a recorded fingerprint (``fingerprints.fingerprint``: path, abspath, files), or None."""
    if not isinstance(value, dict):
        return f'{field}: expected a mapping, got {_kind(value)}'
    for key in ('path', 'abspath'):
        if value.get(key) is not None and not isinstance(value[key], str):
            return f'{field}.{key}: expected a path, got {_kind(value[key])}'
    if not isinstance(value.get('path'), str):
        return f'{field}.path: expected a path, got {_kind(value.get("path"))}'
    files = value.get('files')
    if files is None:
        return None
    if not isinstance(files, dict):
        return f'{field}.files: expected a mapping, got {_kind(files)}'
    for name, entry in files.items():
        if not (isinstance(name, str) and isinstance(entry, (list, tuple)) and len(entry) == 2
                and isinstance(entry[0], int) and not isinstance(entry[0], bool) and isinstance(entry[1], str)):
            return f'{field}.files[{name!r}]: expected [size, digest], got {_kind(entry)}'
    return None


def lineage_problem(record) -> Optional[str]:
    """What is wrong with a lineage record read from a checkpoint (field and value), or None: the types
    :func:`lineage_record` writes, so that a tampered or damaged record is named, not met deep in a traceback."""
    if not isinstance(record, dict):
        return f'expected a mapping, got {_kind(record)}'
    sources = record.get('sources', {})
    if not isinstance(sources, dict):
        return f'sources: expected a mapping of source folders, got {_kind(sources)}'
    for key, value in sources.items():
        problem = _fingerprint_problem(value, f'sources.{key}')
        if problem:
            return problem
    if record.get('pretrained') is not None:
        problem = _fingerprint_problem(record['pretrained'], 'pretrained')
        if problem:
            return problem
    for key in ('llm_lora', 'vision_lora'):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f'{key}: expected a mapping of LoRA settings or None, got {_kind(record[key])}'
    for key in ('from_scratch', 'partial'):
        if key in record and not isinstance(record[key], bool):
            return f'{key}: expected true or false, got {_kind(record[key])}'
    if 'version' in record and (not isinstance(record['version'], int) or isinstance(record['version'], bool)):
        return f'version: expected a whole number, got {_kind(record["version"])}'
    return None


@dataclass
class Stage:
    """One checkpoint of a chain and its recorded lineage (None: nothing recorded)."""
    path: str
    lineage: Optional[dict]

    def get(self, key: str, default=None):
        return (self.lineage or {}).get(key, default)


#: folders moved since training, as ``(OLD, NEW)`` path prefixes: the tools' ``--remap OLD=NEW``
#: (``runconfig.run_config`` sets them), applied to every recorded path this process looks up, the previous
#: stages' too (they are found while the model is built, far from the command line)
_REMAP: List[tuple] = []


def set_remap(pairs) -> None:
    """Set the process's ``--remap`` pairs (see :data:`_REMAP`)."""
    _REMAP[:] = list(pairs)


def moved(path: str) -> List[str]:
    """Where ``path`` is now under each ``--remap`` pair that covers it (empty when none does)."""
    out = []
    for old, new in _REMAP:
        if path == old or path.startswith(old.rstrip(os.sep) + os.sep):
            out.append(new + path[len(old):])
    return out


def locate_previous(record: dict, recorded_by: str, given: Optional[str] = None) -> str:
    """The previous stage's checkpoint that ``recorded_by`` names (``given``: one the user passed instead),
    checked against the recorded fingerprint: where it was recorded (its absolute path, then its path as given,
    which may be relative to another folder than the one it was trained in; each under ``--remap``), else beside
    ``recorded_by`` by its content. A file at a recorded path that is another checkpoint (a colleague's own
    ``work_dirs/pretrain_mlp/iter_N.pth``) is passed over for the right one beside it, and named when none is."""
    previous = record['pretrained']
    if given is not None:
        candidates = [given]
    else:
        candidates = [c for p in (previous.get('abspath'), previous.get('path')) if p for c in moved(p) + [p]]
    found, other = None, None
    for path in (p for p in candidates if os.path.exists(p)):
        diffs = fingerprint_differences(previous, fingerprint(path, model_files_only=False)) \
            if previous.get('files') else []
        if not diffs:
            found = path
            break
        other = other or (path, diffs)
    if found is None and given is None and previous.get('files'):   # moved with it: found beside it by content
        found = _beside(previous, recorded_by)
    if found is None and other is not None:
        advice = '' if given is not None else (
            f'; nor is it beside {os.path.basename(recorded_by)}: put it there (it is known by its content, under '
            f'any name), or give the tools --remap {other[0]}=THE_RIGHT_FILE')
        raise Refused(f'{other[0]} is not the checkpoint {recorded_by} was trained from '
                      f'({previous.get("abspath")}): {"; ".join(other[1])}{advice}')
    if found is None:
        raise Refused(f'{previous.get("path")}: the previous stage of {recorded_by} (recorded in it, at '
                      f'{previous.get("abspath")}) is not found, there or beside it; {recorded_by} holds only what '
                      f'its own stage trained, so the weights that stage started from (a warm-up\'s projector, LoRA '
                      f'merged before) are read from there: put it back or beside {os.path.basename(recorded_by)} '
                      f'(it is known by its content, under any name), or give the tools --remap OLD=NEW for a moved '
                      f'folder')
    return found


def _beside(previous: dict, recorded_by: str) -> Optional[str]:
    """The checkpoint in ``recorded_by``'s folder whose content is the recorded ``previous`` stage's (a chain moved
    together, its files renamed: ``runs/pre/iter_4.pth`` now ``moved/pre.pth``; the first by name where a copy or a
    link holds it too); said in the log. Sizes are compared before any content is read."""
    folder, own = os.path.dirname(os.path.abspath(recorded_by)), os.path.realpath(recorded_by)
    files = previous['files']
    sizes = {name: entry[0] for name, entry in files.items() if isinstance(entry, (list, tuple)) and entry}

    def same_sizes(path: str) -> bool:
        if os.path.isdir(path):
            return '' not in sizes and all(os.path.isfile(os.path.join(path, n)) and
                                           os.path.getsize(os.path.join(path, n)) == size for n, size in sizes.items())
        return list(sizes) == [''] and os.path.getsize(path) == sizes['']
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    matches = []
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith('.') or os.path.realpath(path) == own or not sizes:
            continue
        try:
            if same_sizes(path) and not fingerprint_differences(previous, fingerprint(path, model_files_only=False)):
                matches.append(path)
        except OSError:
            continue
    if not matches:   # several: the same content under several names (a copy, a link), any of them is it
        return None
    said = f'the previous stage of {recorded_by} (recorded at {previous.get("abspath")}): {matches[0]}, beside it ' \
           '(the same checkpoint by its content)'
    if said not in _SAID:   # (the chain is read more than once while a model is built)
        _SAID.add(said)
        from mmengine.logging import print_log
        print_log(said, logger='current')
    return matches[0]


_SAID: set = set()


def resolve_chain(path: str) -> List[Stage]:
    """The checkpoints a model is built from, oldest first, ending with ``path``."""
    chain, seen, current = [], set(), path
    while True:
        if not os.path.exists(current):
            raise FileNotFoundError(f'model.pretrained_pth: checkpoint not found: {current}')
        real = os.path.realpath(current)
        if real in seen:
            raise Refused(f'{current}: its recorded previous stages lead back to itself')
        seen.add(real)
        stage = Stage(current, read_lineage(current))
        chain.append(stage)
        if not stage.get('pretrained'):
            return chain[::-1]
        current = locate_previous(stage.lineage, current)


def check_sources(recorded: Optional[dict], sources: Dict[str, dict], what: str) -> None:
    """Refuse source folders other than the ones ``what`` recorded (fingerprints compared, paths may move)."""
    for key, then in (recorded or {}).get('sources', {}).items():
        now = sources.get(key)
        if now is None:
            raise Refused(f'{what} was trained with model.{key}={then.get("path")!r}, which the config does '
                          f'not set')
        if not then.get('files') or not now.get('files'):
            continue  # a hub id, or an old record: nothing to compare
        diffs = fingerprint_differences(then, now)
        if diffs:
            raise Refused(f'model.{key}: {now["path"]} is not the folder {what} was trained with '
                          f'({then.get("abspath")}): {"; ".join(diffs[:6])}')


def previous_stage_for(cfg_model, checkpoint: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The converter's ``model.pretrained_pth`` for ``checkpoint``: the recorded previous stage (checked), or the
    one the config gives when it is that checkpoint (its fingerprint compared); the config's source folders are
    compared with the recorded ones first."""
    record = read_lineage(checkpoint)
    given = cfg_model.get('pretrained_pth') or None
    if record is None:
        log(f'{checkpoint}: no lineage recorded in it; model.pretrained_pth and the source folders are taken from '
            f'the config unchecked')
        return given
    own = {k: fingerprint(p) or dict(path=p) for k, p in source_paths(
        *(cfg_model.get(k) for k in SOURCE_KEYS)).items()}
    check_sources(record, own, checkpoint)
    if not record.get('pretrained'):
        if given:
            raise Refused(f'{checkpoint} was trained without a previous stage, but the config gives '
                          f'model.pretrained_pth={given!r}; leave it out')
        return None
    found = locate_previous(record, checkpoint, given)
    if given is None:
        log(f'previous stage (recorded in {checkpoint}): {found}')
    return found


def recorded_inputs(checkpoint: str) -> List[str]:
    """Every file and folder on disk that ``checkpoint``'s lineage names: its previous stages, back to the first
    (as recorded, before any fingerprint check, and where each ``--remap`` pair moves them: :func:`moved`), and
    their source folders. What a conversion reads besides the command line: ``convert`` refuses to write over any of
    them."""
    def where(r: dict) -> List[str]:
        named = [p for p in (r.get('abspath'), r.get('path')) if p]
        return [p for p in [q for p in named for q in moved(p)] + named if os.path.exists(p)]

    found, seen, current = [], set(), checkpoint
    while current is not None and os.path.realpath(current) not in seen:
        seen.add(os.path.realpath(current))
        record = read_lineage(current)
        if record is None:
            break
        found += [p for r in [*record.get('sources', {}).values(), record.get('pretrained') or {}] for p in where(r)]
        current = next(iter(where(record.get('pretrained') or {})), None)
    return found
