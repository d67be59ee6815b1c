"""What a folder must hold before llama.cpp's converter reads it, checked without llama.cpp (so a bad input is said
before ``make gguf`` is asked for) and without loading the model:

* :func:`config_problem`: ``config.json`` is InternVL's official layout, and the fields the converter reads are
  there with JSON types it can use (a dict where a list of names belongs, or ``"two"`` as a layer count, came back
  as the converter's traceback, or a raw ``KeyError`` here);
* :func:`layer_problem`: the layer counts in ``config.json`` are those of the weights (a ``num_hidden_layers`` of
  10^9 made the converter allocate until the machine ran out of memory);
* :func:`tokenizer_problem`: the tokenizer holds InternVL's image tokens (without them the GGUF answered, but its
  prompts never carried the image);
* :func:`vocabulary_problem`: the converter can read the LLM's vocabulary (Phi-3's needs a SentencePiece
  ``tokenizer.model``, or a tokenizer named ``GPT2Tokenizer``: another one ended in its traceback);
* :func:`settings_misfit`: a checkpoint's recorded model is InternViT + pixel shuffle, read from its settings before
  the model is built (a SigLIP + LLaVA MLP checkpoint was told to run ``make gguf``, minutes, then refused).
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Optional

#: what the converter reads of the vision tower's config, and the JSON types it takes
VISION_FIELDS = ('image_size', 'patch_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                 'num_attention_heads', 'layer_norm_eps', 'hidden_act')
#: what it reads of the LLM's (each a positive integer)
LLM_FIELDS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
OTHER_LAYOUTS = {
    'llava': 'llama.cpp\'s converter reads LlavaForConditionalGeneration only with a Pixtral vision tower '
             '(conversion/llava.py); a CLIP or SigLIP LLaVA model is not read (its legacy llava scripts are not '
             'run here)',
    'internvl': 'transformers\' InternVL layout (--format hf) is not read by llama.cpp (tools/mtmd/README.md); '
                'convert the checkpoint with --format gguf, or give an official folder',
    'xtuner_vlm_chat': 'a remote-code folder of another encoder or projector: llama.cpp reads InternVL\'s official '
                       'layout only (InternViT + pixel shuffle)',
}
IMAGE_TOKENS = ('<img>', '</img>', '<IMG_CONTEXT>')


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def config_problem(config: dict) -> Optional[str]:
    """Why ``config`` (an official folder's ``config.json``) cannot go to the converter as it is, or None; what
    llama.cpp's graph does not implement is :func:`~.gguf.config_misfit`'s."""
    kind = config.get('model_type')
    if kind in OTHER_LAYOUTS:
        return OTHER_LAYOUTS[kind]
    if kind != 'internvl_chat':
        return f'model_type {kind!r}: llama.cpp reads InternVL\'s official layout (internvl_chat) only'
    vision, llm = config.get('vision_config'), config.get('llm_config')
    odd = [k for k, v in (('vision_config', vision), ('llm_config', llm)) if not isinstance(v, dict)]
    if odd:
        return f'its {" and ".join(odd)} in config.json {"is" if len(odd) == 1 else "are"} not a JSON object'
    reasons, missing = [], []
    for where, part, fields in (('vision_config', vision, VISION_FIELDS), ('llm_config', llm, LLM_FIELDS)):
        for key in fields:
            if key not in part:
                missing.append(f'{where}.{key}')
                continue
            value = part[key]
            ok = {'hidden_act': lambda v: isinstance(v, str), 'layer_norm_eps': _number,
                  'image_size': lambda v: _count(v) or (isinstance(v, list) and v and all(map(_count, v)))}.get(
                      key, _count)(value)
            if not ok:
                reasons.append(f'{where}.{key} is {json.dumps(value)[:40]}, not '
                               f'{"a name" if key == "hidden_act" else "a positive number"}')
        if 'architectures' in part and not _names(part['architectures']):
            reasons.append(f'{where}.architectures is {json.dumps(part["architectures"])[:60]}, not a list of names')
    if 'architectures' in config and not _names(config['architectures']):
        reasons.append(f'architectures is {json.dumps(config["architectures"])[:60]}, not a list of names')
    if 'downsample_ratio' not in config:
        missing.append('downsample_ratio')
    elif not _number(config['downsample_ratio']):
        reasons.append(f'downsample_ratio is {json.dumps(config["downsample_ratio"])[:40]}, not a positive number')
    if missing:
        reasons.append(f'no {", ".join(missing)} in config.json (the converter reads them)')
    return '; '.join(reasons) or None


def weight_names(folder: str) -> Optional[List[str]]:
    """The tensor names of ``folder``'s safetensors weights (the index's, else the files' headers); None for other
    weight files."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index, encoding='utf-8') as f:
            return list(json.load(f)['weight_map'])
    if not os.path.isfile(os.path.join(folder, 'model.safetensors')):
        return None
    from safetensors import safe_open
    with safe_open(os.path.join(folder, 'model.safetensors'), framework='pt') as f:
        return list(f.keys())


def layer_problem(folder: str, config: dict) -> Optional[str]:
    """Where ``config.json``'s layer counts are not the weights' (checked after :func:`config_problem`), or None."""
    names = weight_names(folder)
    if names is None:
        return None
    reasons = []
    for where, pattern in (('vision_config', r'vision_model\.encoder\.layers\.(\d+)\.'),
                           ('llm_config', r'language_model\.(?:model\.)?layers\.(\d+)\.')):
        found = {int(m.group(1)) for m in map(re.compile(pattern).match, names) if m}
        said = config[where]['num_hidden_layers']
        if said != len(found):
            reasons.append(f'{where}.num_hidden_layers is {said}, its weights hold {len(found)} layers')
    return '; '.join(reasons) or None


def tokenizer_problem(folder: str) -> Optional[str]:
    """Which of InternVL's image tokens the folder's tokenizer files do not add (``tokenizer.json``'s added tokens,
    ``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``), or None."""
    added = set()
    for name, read in (('tokenizer.json', lambda d: [t.get('content') for t in d.get('added_tokens') or []
                                                     if isinstance(t, dict)]),
                       ('added_tokens.json', lambda d: list(d)),
                       ('tokenizer_config.json', lambda d: [t.get('content') for t in
                                                            (d.get('added_tokens_decoder') or {}).values()
                                                            if isinstance(t, dict)])):
        try:
            with open(os.path.join(folder, name), encoding='utf-8') as f:
                data = json.load(f)
            added.update(read(data) if isinstance(data, dict) else [])
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    missing = [t for t in IMAGE_TOKENS if t not in added]
    if missing:
        return (f'its tokenizer has no {", ".join(missing)} (InternVL\'s image tokens): a tokenizer of another '
                f'model? The GGUF would answer without ever seeing the image')
    return None


def vocabulary_problem(architecture: Optional[str], tokenizer_class: Optional[str], sentencepiece: bool) \
        -> Optional[str]:
    """Why llama.cpp's converter cannot read the vocabulary of an LLM of ``architecture`` whose tokenizer is
    ``tokenizer_class`` (``Fast`` left off, as ``tokenizer_config.json`` names it), with a SentencePiece
    ``tokenizer.model`` or not; None where it can. Its Phi-3 reads ``tokenizer.model`` unless the class is
    ``GPT2Tokenizer`` (Phi-4's), and stopped with ``Missing .../tokenizer.model`` for any other."""
    if architecture != 'Phi3ForCausalLM' or sentencepiece or tokenizer_class == 'GPT2Tokenizer':
        return None
    return (f'its LLM is Phi-3 (Phi3ForCausalLM), whose vocabulary llama.cpp\'s converter reads from a SentencePiece '
            f'tokenizer.model, or as byte-level BPE for a tokenizer_class GPT2Tokenizer only; this tokenizer is '
            f'{tokenizer_class or "of no named class"}, without a tokenizer.model')


def folder_vocabulary_problem(folder: str, architecture: Optional[str]) -> Optional[str]:
    """:func:`vocabulary_problem` for an official folder whose LLM is of ``architecture``."""
    try:
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            tok_cfg = json.load(f)
    except (OSError, ValueError):
        tok_cfg = {}
    name = tok_cfg.get('tokenizer_class') if isinstance(tok_cfg, dict) else None
    return vocabulary_problem(architecture, name.removesuffix('Fast') if isinstance(name, str) else None,
                              os.path.isfile(os.path.join(folder, 'tokenizer.model')))


def settings_misfit(model_cfg) -> Optional[str]:
    """Why llama.cpp cannot take the model a run's settings (``cfg.model``) describe, as far as its encoder's type
    and its projector's name tell without building it; None where they do not tell (the built model is checked
    then, ``gguf.model_misfit``)."""
    from ..vision.base import encoder_type_for_folder
    spec = model_cfg.get('vision_encoder')
    kind, path = (spec.get('type'), spec.get('path')) if isinstance(spec, dict) else (None, spec)
    if kind is None and isinstance(path, str):
        try:
            kind = encoder_type_for_folder(path).name
        except (OSError, ValueError):   # the build names what is wrong with the folder
            return None
    if getattr(kind, 'name', kind) in ('clip', 'siglip'):
        return OTHER_LAYOUTS['llava']
    projector = model_cfg.get('projector', 'pixel_shuffle_mlp')
    if isinstance(projector, str) and projector != 'pixel_shuffle_mlp':
        return f'llama.cpp reads InternVL\'s official layout only: projector {projector} (InternVL takes ' \
               'pixel_shuffle_mlp)'
    return None
