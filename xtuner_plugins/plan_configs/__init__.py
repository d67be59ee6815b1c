"""The published ``config.json`` of the towers and LLMs the planner documents, so that a plan needs no download.

Each folder here holds one model's ``config.json`` (``models.json`` says which hub repository it is, where the
file was read and which fields it keeps); ``tools/plan.py --vision NAME --llm NAME`` plans from them, and
``--vision DIR --llm DIR`` from any folder holding a ``config.json``. No weights, no tokenizer: the planner needs
the shapes only. The vocabulary the LLM is resized to in training is the tokenizer's length plus InternVL's
tokens it lacks; without a tokenizer it is the published tokenizer's length where ``models.json`` records it
(Qwen2.5's), else ``config.json``'s ``vocab_size`` (:func:`planned_vocabulary`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'vocab.json')
# the fields the planner reads, per part, and what each is (for the one-line error)
REQUIRED = {
    'llm': {'hidden_size': 'its width', 'intermediate_size': 'its MLP width', 'num_hidden_layers': 'its layers',
            'num_attention_heads': 'its attention heads', 'vocab_size': 'its vocabulary'},
    'vision': {'hidden_size': 'its width', 'intermediate_size': 'its MLP width', 'num_hidden_layers': 'its layers',
               'num_attention_heads': 'its attention heads', 'image_size': 'its tile size',
               'patch_size': 'its patch size'},
}
# fields the planner reads where a config has them (else the model class's default), each a whole number > 0
OPTIONAL = {'llm': ('num_key_value_heads', 'head_dim')}
KINDS = {'llm': 'an LLM', 'vision': 'a vision tower'}
# where a multi-part config.json keeps the part (CLIP/SigLIP, InternVL's chat config, a VLM's text model)
NESTED = {'llm': ('llm_config', 'text_config'), 'vision': ('vision_config',)}


def shipped() -> Dict[str, dict]:
    """``models.json``: name -> ``kind`` ('vision' or 'llm'), ``hub``, ``source``, ``fields``, and for some LLMs
    ``tokenizer_length``."""
    with open(os.path.join(HERE, 'models.json'), encoding='utf-8') as f:
        return json.load(f)


def resolve(spec: str, kind: str, option: str) -> str:
    """The folder ``spec`` names for a ``kind`` part: an existing folder, or a shipped name (``qwen2.5-7b``) or its
    hub repository (``Qwen/Qwen2.5-7B-Instruct``, case-insensitive). ValueError naming ``option`` otherwise."""
    if os.path.isdir(spec):
        return spec
    models = shipped()
    key = spec.lower()
    name = next((n for n, e in models.items() if key in (n, e['hub'].lower(), e['hub'].split('/')[-1].lower())),
                None)
    if name is None:
        names = ', '.join(n for n, e in models.items() if e['kind'] == kind)
        raise ValueError(f'{option} {spec!r}: no such folder, nor a shipped model ({names})')
    if models[name]['kind'] != kind:
        raise ValueError(f'{option} {spec!r} is {KINDS[models[name]["kind"]]}, not {KINDS[kind]}')
    return os.path.join(HERE, name)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_part_config(folder: str, kind: str, option: str) -> dict:
    """The ``kind`` part's fields of ``folder/config.json``, checked: ValueError with one line naming the file and
    the missing or unusable field (the model classes would silently take their defaults)."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise ValueError(f'{option}: {folder} has no config.json')
    try:
        with open(path, encoding='utf-8') as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f'{option}: {path} is not readable JSON ({exc})') from None
    if not isinstance(cfg, dict):
        raise ValueError(f'{option}: {path} holds {type(cfg).__name__}, not a JSON object')
    part = next((cfg[k] for k in NESTED[kind] if isinstance(cfg.get(k), dict)), cfg)
    where = path if part is cfg else f'{path} ({next(k for k in NESTED[kind] if cfg.get(k) is part)})'
    for field, meaning in REQUIRED[kind].items():
        value = part.get(field)
        if field in ('image_size', 'patch_size') and isinstance(value, list) and len(value) == 2:
            value = value[0] if value[0] == value[1] else value
        if field not in part:
            raise ValueError(f'{where} has no {field!r} ({meaning}), which the planner needs')
        if not _positive_int(value):
            raise ValueError(f'{where}: {field!r} must be a whole number > 0, got {part[field]!r}')
    for field in OPTIONAL.get(kind, ()):   # null or left out: the model class's default
        if part.get(field) is not None and not _positive_int(part[field]):
            raise ValueError(f'{where}: {field!r} must be a whole number > 0 (or null), got {part[field]!r}')
    if kind == 'llm':   # the planner builds it with transformers' own classes (no remote code)
        from transformers import CONFIG_MAPPING, __version__
        model_type = part.get('model_type')
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f'{where}: ' + (f'model_type {model_type!r} is not one transformers {__version__} '
                                             'knows' if model_type else "no 'model_type' (the LLM's family)"))
        heads, groups = part['num_attention_heads'], part.get('num_key_value_heads')
        if groups is not None and heads % groups:
            raise ValueError(f'{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads '
                             f'{groups}')
    return part


def has_tokenizer(folder: Optional[str]) -> bool:
    return isinstance(folder, str) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def planned_vocabulary(folder: str, added: int) -> Tuple[int, str]:
    """``(rows, where from)`` of the LLM's embeddings after training's resize, for a folder without a tokenizer:
    the published tokenizer's length plus ``added`` (InternVL's tokens) for a shipped model that records it, else
    ``config.json``'s ``vocab_size`` as it is."""
    entry = next((e for n, e in shipped().items()
                  if os.path.abspath(folder) == os.path.join(HERE, n)), None)
    if entry is not None and entry.get('tokenizer_length'):
        n = int(entry['tokenizer_length'])
        return n + added, f"{entry['hub']}'s tokenizer ({n:,} tokens) + InternVL's {added}"
    part = read_part_config(folder, 'llm', 'model.llm')
    where = f"{entry['hub']}'s" if entry is not None else os.path.join(folder, 'config.json') + "'s"
    return int(part['vocab_size']), (f"{where} vocab_size; no tokenizer: training resizes to the tokenizer's "
                                     f"length + InternVL's {added} tokens")


def model_vocabulary(cfg: dict) -> Tuple[Optional[int], str]:
    """``(rows, where from)`` for a model config (``VisionLanguageModel``'s arguments) whose LLM folder has no
    tokenizer (:func:`planned_vocabulary`), else ``(None, where from)``: the tokenizer is loaded as training loads
    it. Checks the towers' ``config.json`` first: a missing or unusable field is a ValueError naming it and the
    file."""
    from xtuner_plugins.data.template import INTERNVL_ADDED_TOKENS
    if cfg.get('official_checkpoint') is not None:
        return None, f"the tokenizer of {cfg.get('tokenizer') or cfg['official_checkpoint']}"
    vision, llm = cfg.get('vision_encoder'), cfg.get('llm')
    vision = vision.get('path') if isinstance(vision, dict) else vision
    if isinstance(vision, str):
        read_part_config(vision, 'vision', 'model.vision_encoder')
    if not isinstance(llm, str):
        return None, 'the tokenizer given'
    read_part_config(llm, 'llm', 'model.llm')
    if cfg.get('tokenizer') is not None or has_tokenizer(llm):
        return None, f"the tokenizer of {cfg.get('tokenizer') or llm} + InternVL's tokens it lacks"
    return planned_vocabulary(llm, len(INTERNVL_ADDED_TOKENS))
