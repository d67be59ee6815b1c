"""What every writer of a converted folder shares: safetensors shards, the tokenizer with a chat template that
renders as training did, the generation config. Shards are written from the model's own tensors (safetensors
writes from their memory, no copy).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable, Dict, Optional

import torch

from xtuner_plugins.data.template import get_template
from xtuner_plugins.data.token_ids import adds_bos

from ..internvl import VisionLanguageModel

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def write_weights(state: Dict[str, torch.Tensor], out_dir: str, max_shard_size: str = '5GB',
                  log: Log = _print) -> None:
    """safetensors shards (``model-0000i-of-0000n.safetensors`` + index), or one ``model.safetensors``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    for key, tensor in state.items():   # the checkpoint's were checked finite: a cast to the folder's dtype that
        # overflowed (fp16 ends at 65504) wrote inf into the folder without a word
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            hint = (' (float16 ends at 65504: convert with --dtype bf16, whose range is fp32\'s)'
                    if tensor.dtype == torch.float16 else '')
            raise ValueError(f'{key}: {bad} of its {tensor.numel()} values are not finite in {tensor.dtype} as they '
                             f'would be written{hint}; nothing was written')
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    total = len(split.filename_to_tensors)
    for i, (filename, keys) in enumerate(split.filename_to_tensors.items(), 1):
        start = time.time()
        try:
            save_file({k: state[k].contiguous() for k in keys}, os.path.join(out_dir, filename),
                      metadata={'format': 'pt'})
        except SafetensorError as exc:   # its I/O errors (a full disk) are not OSErrors: one line, as they are
            raise OSError(f'{os.path.join(out_dir, filename)}: {exc}') from None
        log(f'wrote {filename} ({i}/{total}, {len(keys)} tensors, {time.time() - start:.1f}s)')
    if split.is_sharded:
        index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in state.values())},
                 'weight_map': split.tensor_to_filename}
        with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
            json.dump(index, f, indent=2, sort_keys=True)


NO_VIDEO = ('this folder\'s format cannot hold a video (transformers\' LLaVA has no video input); convert to the '
            'official InternVL format or --format hf to ask about videos')


#: what :func:`chat_template` writes first for an LLM whose tokenizer adds a bos
BOS = '{{ bos_token }}'


def chat_template(template_name: str, default_system: Optional[str] = None, image_text: str = '<image>\n',
                  video_text: Optional[str] = '<video>\n', bos: bool = False) -> str:
    """A Jinja chat template for the tokenizer that renders what the training template renders (a leading
    ``system`` message replaces ``default_system``, by default the template's own).

    A message's content is a string, or a list of parts (``{'type': 'text', 'text': ...}``, ``{'type':
    'image'}``): each image part renders as ``image_text``, what the folder's processor expands into the
    image's tokens (LLaVA: ``<img><IMG_CONTEXT></img>\\n``, expanded to the training's ``<IMG_CONTEXT>`` run).
    A ``{'type': 'video'}`` part renders as ``video_text`` (``<video>\\n``: transformers' InternVL processor writes
    the frames' ``Frame{i}: <img>...</img>`` lines in its place, as training does); ``None``: a format that cannot
    hold a video, whose template refuses one with an error.

    ``bos``: the template starts with the tokenizer's bos (``{{ bos_token }}``), for an LLM whose tokenizer adds one
    (:func:`~xtuner_plugins.data.token_ids.adds_bos`: InternLM2's, Llama's): training puts it once at the start of a
    sample, and vLLM's chat and ``tokenizer.apply_chat_template(..., tokenize=True)`` add no special tokens to the
    rendered text, so only the template can give it (transformers' ``processor.apply_chat_template`` then adds none
    either; this project's own callers pass ``add_special_tokens=False``: ``prompt.py``'s ``encode_prompt``).
    Without a bos the template is what it always was.
    """
    template = get_template(template_name)
    if default_system is None:
        default_system = template.default_system

    def lit(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    sys_pre, _, sys_post = template.system.partition('{system}')
    user_pre, _, user_post = template.user.partition('{query}')
    bot_pre, bot_post = template.assistant_prefix, template.assistant_suffix
    system = ("{{ " + lit(sys_pre) + " + system + " + lit(sys_post) + " }}") if template.system else ''
    opened = ''   # what opens the first user turn: the system message, where the template has no system turn
    if template.system_in_user:
        system, opened = '', "{% if loop.first and system %}" + system + "{% endif %}"
    elif template.system and template.system_optional:   # no system turn for an empty system message
        system = "{% if system %}" + system + "{% endif %}"
    content = ("{% macro content(c) %}{% if c is string %}{{ c }}{% else %}{% for part in c %}"
               "{% if part['type'] == 'image' %}{{ " + lit(image_text) + " }}"
               "{% elif part['type'] == 'text' %}{{ part['text'] }}"
               + ("{% elif part['type'] == 'video' %}{{ " + lit(video_text) + " }}" if video_text is not None else
                  "{% elif part['type'] == 'video' %}{{ raise_exception(" + lit(NO_VIDEO) + ") }}")
               + "{% endif %}{% endfor %}{% endif %}{% endmacro %}")
    return (
        (BOS if bos else '') + content +
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = content(messages[0]['content']) %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = " + lit(default_system) + " %}"
        "{% set turns = messages %}{% endif %}" + system +
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        + ("{{ " + lit(user_pre) + " }}" + opened + "{{ " if opened else "{{ " + lit(user_pre) + " + ")
        + "content(message['content']) + " + lit(user_post) + " }}"
        "{% else %}{{ " + lit(bot_pre) + " + content(message['content']) + " + lit(bot_post) + " }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + lit(bot_pre) + " }}{% endif %}"
    )


#: the default system message in a chat template :func:`chat_template` wrote
_DEFAULT_SYSTEM = re.compile(r'\{% set system = ("(?:[^"\\]|\\.)*") %\}')


def template_system(template: str) -> Optional[str]:
    """The default system message of a chat template the converter wrote (None for another template)."""
    found = _DEFAULT_SYSTEM.search(template)
    return json.loads(found.group(1)) if found else None


def without_bos(template: str) -> str:
    """A chat template the converter wrote, without the bos it starts with (:func:`chat_template`'s ``bos``)."""
    return template[len(BOS):] if template.startswith(BOS) else template


def with_system(template: str, system: str) -> str:
    """A chat template the converter wrote, with ``system`` as its default system message."""
    return _DEFAULT_SYSTEM.sub(lambda m: '{% set system = ' + json.dumps(system, ensure_ascii=False) + ' %}',
                               template, count=1)


def save_tokenizer(model: VisionLanguageModel, out_dir: str, extra: Optional[dict] = None,
                    system: Optional[str] = None, image_text: str = '<image>\n',
                    video_text: Optional[str] = '<video>\n') -> str:
    """The model's tokenizer with a chat template rendering as training did (:func:`chat_template`, with the bos
    when the tokenizer adds one), and the stop word as its pad token when it has none;
    ``extra``: ``extra_special_tokens`` for ``tokenizer_config.json``. Every format's writer saves its tokenizer
    here; returns the chat template."""
    tokenizer = _padded(model)
    tokenizer.chat_template = chat_template(model.template, system, image_text, video_text, bos=adds_bos(tokenizer))
    tokenizer.save_pretrained(out_dir)
    # no token_type_ids (a bare PreTrainedTokenizerFast's default, as Llama 3's look-alike has): the converted
    # models take none, and transformers' processor handed them to generate ('model_kwargs are not used')
    names = [name for name in tokenizer.model_input_names if name != 'token_type_ids']
    if extra or names != list(tokenizer.model_input_names):
        config_path = os.path.join(out_dir, 'tokenizer_config.json')
        with open(config_path, encoding='utf-8') as f:
            tok_cfg = json.load(f)
        if extra:
            tok_cfg['extra_special_tokens'] = extra
        if names != list(tokenizer.model_input_names):
            tok_cfg['model_input_names'] = names
        with open(config_path, 'w', encoding='utf-8') as f:
            json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    return tokenizer.chat_template


def part_config(config) -> dict:
    """A part's config (the LLM's, the vision tower's) as a converted folder writes it: without
    ``quantization_config`` (its weights are written whole) and ``_name_or_path`` (the training machine's folder:
    a shared folder told where the trainer kept their models, and nothing reads it)."""
    part = config.to_dict()
    for key in ('quantization_config', '_name_or_path'):
        part.pop(key, None)
    return part


def frame_range(tiling: dict) -> dict:
    """The range training drew a video's frame count from (``min_num_frame``, ``max_num_frame``), for a folder's
    ``config.json``: chat and eval compare ``--frames`` with it. ``{}`` for a tiling that does not give it."""
    return {key: int(tiling[key]) for key in ('min_num_frame', 'max_num_frame') if key in tiling}


def generation_config(model: VisionLanguageModel):
    """Generation stops at the template's stop word (and the tokenizer's EOS)."""
    from transformers import GenerationConfig
    tokenizer = _padded(model)
    stop = tokenizer.convert_tokens_to_ids(get_template(model.template).stop_word)
    eos = [stop] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, stop) else [])
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _padded(model):
    """The model's tokenizer, given its template's stop word as its pad token when it has none (Llama 3's):
    batches pad (eval --batch-size, a processor's ``padding=True``) and generation pads as the folder says, without
    generate()'s warning at each call. The one rule for every writer, whichever file it writes first."""
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = get_template(model.template).stop_word
    return tokenizer
