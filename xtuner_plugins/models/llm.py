"""Loading the language model and its tokenizer, and giving them InternVL's added tokens.

Any Hugging Face causal LM loads through ``AutoModelForCausalLM`` (no remote code). InternVL's nine
tokens are added to the tokenizer; the LLM's embeddings are then resized to ``len(tokenizer)`` (as
InternVL does: Qwen2.5's padded 151936-row matrix becomes 151674 rows) and the rows of the new tokens, in
the input embeddings and in ``lm_head``, are set to the mean of the rows of the existing tokens.
Tied input/output embeddings (Qwen2.5-0.5B/1.5B) are untied first, as in the official InternVL
checkpoints (``tie_word_embeddings`` false, ``lm_head`` saved on its own).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from xtuner_plugins.data.errors import from_pretrained_named, load_tokenizer_named
from xtuner_plugins.data.template import add_internvl_tokens

from .attention import SEGMENTED, check_softcap
from .moe import routing
from .zero3 import gathered, shape_of


def check_llm_folder(path: str, key: str = 'model.llm', attn: Optional[str] = None) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`, one line) an LLM folder that only its own modelling code
    loads: its ``config.json`` names a ``model_type`` transformers does not implement, with an ``auto_map`` to the
    folder's code (InternLM2 and 2.5's ``internlm2``), which nothing here runs (``trust_remote_code=False``).
    Called before the vision encoder loads: transformers' refusal came after it, with a traceback. A type transformers
    implements loads with transformers' own class, whatever its ``auto_map`` (Phi-3's). With ``attn`` (the attention
    implementation it would train under), also an LLM whose attention-logit cap it would drop
    (:func:`~xtuner_plugins.models.attention.check_softcap`), before minutes of loading a Gemma 2 9B or 27B."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from xtuner_plugins.errors import Refused
    try:
        with open(os.path.join(_folder_of(path), 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, TypeError, ValueError):   # no folder, no config: the loading says so
        return
    if not isinstance(config, dict):
        return
    if attn is not None:   # a vision-language folder's language model: its text_config
        text = config.get('text_config') if isinstance(config.get('text_config'), dict) else config
        check_softcap(text.get('attn_logit_softcapping'), attn)
    encoder = encoder_problem(config) or vision_language_problem(config)
    if encoder:
        raise Refused(f'{key}: {path}: {encoder}')
    kind = causal_lm_class(config.get('model_type')) if attn is not None else None
    if kind is not None and attn in ('sdpa', *SEGMENTED) and not getattr(kind, '_supports_sdpa', True):
        raise Refused(f"model.attn_implementation={attn!r}: {kind.__name__} has no SDPA attention in transformers; "
                      f"set model.attn_implementation='eager'")
    if kind is not None and attn in SEGMENTED and not getattr(kind, '_supports_attention_backend', False):
        raise Refused(f"model.attn_implementation={attn!r}: {kind.__name__} takes no attention but its own "
                      f"(transformers' attention interface), so it cannot run packed rows one sample at a time; "
                      f"set model.attn_implementation='sdpa' (a block mask per packed row)")
    if not config.get('auto_map'):
        return
    model_type = config.get('model_type')
    if model_type in CONFIG_MAPPING_NAMES:
        return
    if model_type == 'internvl_chat':
        raise Refused(f'{key}: {path} is an InternVL model, not an LLM: give it as model.official_checkpoint (its '
                      'vision encoder, projector and LLM together), and leave model.llm and model.vision_encoder unset')
    hint = (' (InternLM2 and 2.5: InternLM\'s tools/convert2llama.py writes a Llama folder of it)'
            if str(model_type).startswith('internlm') else '')
    named = f'model_type {model_type!r}' if model_type else 'no model_type'
    raise Refused(f'{key}: {path}: its config.json names {named}, which transformers does not implement: only '
                  f'the folder\'s own code (its auto_map) loads it, and this project runs none '
                  f'(trust_remote_code=False); use an LLM transformers implements (Qwen2.5, Qwen3, Llama, Phi-3, ...: '
                  f'docs/families.md), or the folder converted to such a layout{hint}')


def encoder_problem(config: dict) -> Optional[str]:
    """Why a ``config.json`` (a dict) is no LLM to train on: an encoder (BERT, RoBERTa, XLM-R, ...: a type
    transformers has both a masked-LM and a causal-LM class for, the latter only with ``is_decoder``), whose
    attention reads the text both ways; or None. ``AutoModelForCausalLM`` loads such a folder with a warning, and the
    planner planned it."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    model_type = config.get('model_type')
    if config.get('is_decoder') or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return None
    classes = ', '.join(config.get('architectures') or []) or 'no architectures'
    return (f'model_type {model_type!r} is an encoder ({classes}), whose attention reads the text both ways, not a '
            f'causal LLM that writes answers; '
            f'use a decoder LLM (Qwen2.5, Qwen3, Llama, Phi-3, ...: docs/families.md)')


#: what a mixture of experts' QLoRA keeps unquantised (bitsandbytes' skip list, by module name: it replaces
#: transformers' default, the LM head): the routers, each token's choice of experts (hidden x experts: a few MB at
#: Qwen3-30B-A3B's size), and Qwen2-MoE's shared-expert gate (one output, which bitsandbytes' CPU kernel refused)
UNQUANTIZED_MOE = ('lm_head', 'gate', 'shared_expert_gate')


def causal_lm_class(model_type) -> Optional[type]:
    """transformers' causal-LM class of ``model_type``, or None (not one it implements)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    import transformers
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ''), None)


def vision_language_problem(config: dict) -> Optional[str]:
    """Why a vision-language model's folder (a ``vision_config`` beside a ``text_config``) is no LLM to train on
    (its language model cannot load alone: transformers has no causal LM of its type, as for Qwen2.5-VL, Mistral 3,
    LLaVA: a ValueError listing 100 configuration classes), or None (a text LLM, or Gemma 3's, whose causal LM
    loads its language model: :func:`load_llm`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if 'vision_config' not in config or config.get('model_type') in (*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                                     'internvl_chat'):   # (its own line below)
        return None
    classes = ', '.join(config.get('architectures') or []) or f'model_type {config.get("model_type")!r}'
    return (f'a vision-language model ({classes}), whose language model does not load here alone; give the folder '
            f'of its text LLM (for Qwen2.5-VL, Qwen2.5; docs/families.md), or the vision-language model as a whole '
            f'only where it is InternVL\'s (model.official_checkpoint)')


def _folder_of(path: str) -> str:
    """``path``, or the folder of a Hugging Face cache name's ``config.json`` in the local cache (offline)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(path, 'config.json')
    except Exception:  # noqa: BLE001 -- not a repo id: the loading says what it is
        return path
    return os.path.dirname(found) if isinstance(found, str) else path


def load_tokenizer(path: str) -> Tuple[object, int]:
    """The LLM's tokenizer with InternVL's added tokens (offline; no remote code), and how many of those
    tokens were new to it (0 for a tokenizer saved with an InternVL checkpoint)."""
    tokenizer = load_tokenizer_named(path, 'model.tokenizer (or model.llm)')
    return tokenizer, add_internvl_tokens(tokenizer)


def load_llm(path: str, torch_dtype: torch.dtype = torch.float32, attn_implementation: str = 'sdpa',
             quantization: Optional[dict] = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` without remote code, with the model class's settings.

    ``quantization``: ``BitsAndBytesConfig`` arguments (QLoRA: ``load_in_4bit=True``,
    ``bnb_4bit_quant_type='nf4'``, ``bnb_4bit_use_double_quant=True``); the weights are quantised on this
    process's device (its GPU, or the CPU, where bitsandbytes >= 0.48 runs 4-bit too).
    """
    kwargs = {}
    if quantization is not None:
        kwargs['device_map'] = ({'': int(os.environ.get('LOCAL_RANK', 0))} if torch.cuda.is_available()
                                else 'cpu')

    def load(folder):
        from transformers import AutoConfig, BitsAndBytesConfig
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        text = _text_config(config)
        if quantization is not None:
            cfg = {k: v for k, v in dict(quantization).items() if k != 'type'}
            cfg.setdefault('bnb_4bit_compute_dtype', torch_dtype)
            if routing(text or config):
                cfg.setdefault('llm_int8_skip_modules', list(UNQUANTIZED_MOE))
            kwargs['quantization_config'] = BitsAndBytesConfig(**cfg)
        if text is None:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=False,
                                                        attn_implementation=attn_implementation, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=text, dtype=torch_dtype, trust_remote_code=False, attn_implementation=attn_implementation,
            output_loading_info=True, key_mapping=VLM_TEXT_KEYS, **kwargs)
        missing = [k for k in info['missing_keys'] if not (k.startswith('lm_head.') and text.tie_word_embeddings)]
        if missing:
            from xtuner_plugins.errors import Refused
            raise Refused(f'model.llm: {path} holds a vision-language model ({_described(config)}), and its language '
                          f'model\'s weights are not where {type(model).__name__} reads them ({len(missing)} missing, '
                          f'e.g. {missing[0]}): give the folder of a text LLM (docs/families.md)')
        print_log(f'model.llm: {path} holds a vision-language model ({_described(config)}): its language model is '
                  f'loaded alone as {type(model).__name__}; its vision tower and projector are left out',
                  logger='current')
        return model
    return from_pretrained_named(load, path, 'model.llm')


#: where a vision-language folder saved in transformers 5's layout keeps its language model's weights
#: (``model.language_model.*``); 4.x's layout (``language_model.model.*``) the text class reads as it is
VLM_TEXT_KEYS = {r'^model\.language_model\.': 'model.'}


def _described(config) -> str:
    """``model_type 'gemma3', Gemma3ForConditionalGeneration``: what a folder's config.json says it holds."""
    return ', '.join([f'model_type {config.model_type!r}', *(getattr(config, 'architectures', None) or [])])


def text_config_of(folder: str):
    """The text config of a vision-language model's folder that ``AutoModelForCausalLM`` would load whole (its
    class a ``...ForConditionalGeneration`` with a ``text_config``: Gemma 3 4B and up), so that its language model
    loads alone, as its own causal LM class (``Gemma3ForCausalLM`` reads the ``language_model.`` keys); None for a
    text LLM's folder."""
    from transformers import AutoConfig
    return _text_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))


def _text_config(config):
    """:func:`text_config_of` for a config already read."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    text = getattr(config, 'text_config', None)
    whole = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, 'model_type', None), '')
    if text is None or not whole.endswith('ForConditionalGeneration') \
            or text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    return text


def untie_embeddings(llm: PreTrainedModel) -> None:
    """Give ``lm_head`` its own copy of the embedding matrix and mark the config untied."""
    out, inp = llm.get_output_embeddings(), llm.get_input_embeddings()
    if out is not None and out.weight is inp.weight:
        with gathered([inp.weight]):
            weight = inp.weight.detach().clone()
        out.weight = nn.Parameter(weight, requires_grad=inp.weight.requires_grad)
    llm.config.tie_word_embeddings = False
    if hasattr(llm.config, 'get_text_config'):
        llm.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def fit_embeddings_to_tokenizer(llm: PreTrainedModel, tokenizer, num_old_tokens: Optional[int] = None) -> int:
    """Resize the LLM's embeddings to ``len(tokenizer)``; rows of tokens ``num_old_tokens..`` that the
    checkpoint did not train get the mean of the rows ``0..num_old_tokens``. Returns the new vocab size.

    ``num_old_tokens`` is the tokenizer length before InternVL's tokens were added (defaults to the
    embedding rows when the model is smaller than the tokenizer).
    """
    new_size = len(tokenizer)
    weight = llm.get_input_embeddings().weight
    old_rows = shape_of(weight)[0]
    # rows the checkpoint lacks (a tokenizer longer than the embedding even before InternVL's tokens) are new too:
    # resize_token_embeddings draws them at random, differently in every process that builds the model (a frozen
    # LLM's rows are in no checkpoint, so the converter's model had other rows than the trained one's)
    num_old_tokens = min(old_rows, new_size) if num_old_tokens is None else min(num_old_tokens, old_rows)
    if new_size != old_rows:
        llm.resize_token_embeddings(new_size, mean_resizing=False)
    if num_old_tokens < new_size:
        for emb in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            if emb is None:
                continue
            with gathered([emb.weight], modify=True):
                weight = emb.weight
                weight[num_old_tokens:new_size] = weight[:num_old_tokens].float().mean(0).to(weight.dtype)
    llm.config.vocab_size = new_size
    return new_size
