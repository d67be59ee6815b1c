"""A trained :class:`InternVLModel` written as a Hugging Face folder: InternVL's official layout (remote
code) or transformers' native ``InternVLForConditionalGeneration`` layout.

``tools/convert_to_official.py`` drives it::

    model = build_for_export(cfg, checkpoint, torch.bfloat16)   # config's sources + the trained tensors
    merge_adapters(model)                                       # LoRA merged, a 4-bit base dequantised
    write_official(model, cfg, out_dir, torch.bfloat16)         # or write_hf(...)

Memory: the model is built once, directly in the output dtype; checkpoint tensors are read one at a time
(memory-mapped ``.pth``, DeepSpeed's lazy consolidation) and copied into it; shards are written from the
model's own tensors (safetensors writes from their memory, no copy). Peak memory is about the model's
size plus the largest tensor being converted.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from xtuner_plugins.data.template import (IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, get_template)
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from xtuner_plugins.remote_code import FILES as REMOTE_FILES
from xtuner_plugins.remote_code import FOLDER as REMOTE_FOLDER

from .internvl import InternVLModel
from .provenance import check_trained_settings
from .vision import hf_to_official_vision_config, hf_to_official_vision_state_dict

Log = Callable[[str], None]

OFFICIAL_AUTO_MAP = {
    'AutoConfig': 'configuration_internvl_chat.InternVLChatConfig',
    'AutoModel': 'modeling_internvl_chat.InternVLChatModel',
    'AutoModelForCausalLM': 'modeling_internvl_chat.InternVLChatModel',
}
# What the converted folder falls back to when the training config's data set does not say.
DEFAULT_TILING = dict(image_size=448, min_dynamic_patch=1, max_dynamic_patch=12, use_thumbnail=True)


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------ building
def _training_dataset(cfg) -> dict:
    """The training config's data set settings (the packed wrapper's inner one)."""
    dataset = cfg.get('train_dataloader', {}).get('dataset', {}) if hasattr(cfg, 'get') else {}
    if isinstance(dataset.get('dataset'), dict):
        dataset = dataset['dataset']
    return dataset


def tiling_settings(cfg) -> dict:
    """Tile size and tiling settings of the training config's data set."""
    dataset = _training_dataset(cfg)
    return {key: dataset.get(key, default) for key, default in DEFAULT_TILING.items()}


def training_system_message(cfg) -> Optional[str]:
    """The system message the training data set was given (``dataset.system``), or None for the template's."""
    return _training_dataset(cfg).get('system')


def build_for_export(cfg, checkpoint: Optional[str], dtype: torch.dtype, log: Log = _print) -> InternVLModel:
    """The config's model, every weight in ``dtype``, with the checkpoint's trained tensors loaded strictly.

    The frozen parts come from the config's sources (``vision_encoder``, ``llm``, ``official_checkpoint``)
    and from ``pretrained_pth`` (an earlier stage), as in training.
    """
    if checkpoint is not None:  # before the model is built: a mismatch is found in seconds
        check_trained_settings(cfg, checkpoint, log)
    model_cfg = copy.deepcopy(dict(cfg.model))
    model_type = model_cfg.pop('type')
    model_cfg.update(torch_dtype=dtype, trainable_fp32=False, zero3_init=False, llm_grad_ckpt=False,
                     vision_grad_ckpt=False, vision_drop_path=0.0,
                     preference=None)  # the reference policy of full preference training is not exported
    # training kernels: flash attention needs a GPU; flex attention is the packed rows' mask (torch.compile)
    if (model_cfg.get('attn_implementation') == 'flash_attention_2' and not torch.cuda.is_available()
            or model_cfg.get('attn_implementation') == 'flex_attention'):
        model_cfg['attn_implementation'] = 'sdpa'
    if isinstance(model_type, str) or not (isinstance(model_type, type) and issubclass(model_type, InternVLModel)):
        from mmengine.registry import MODELS
        model_cfg['type'] = model_type
        model = MODELS.build(model_cfg)
    else:
        model = model_type(**model_cfg)
    model.eval()
    if checkpoint is not None:
        log(f'loading trained tensors from {checkpoint}')
        model.load_pretrained(checkpoint, strict=True)
    return model


# ------------------------------------------------------------------------------------------ merging
def _dequantize(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace bitsandbytes 4-bit/8-bit linear layers by plain ``nn.Linear`` in ``dtype``; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, 'packing_format_for_cpu', False):
                # bitsandbytes repacks 4-bit weights (bf16 scales) at the first CPU inference forward
                raise RuntimeError(f'{name}: 4-bit weights were repacked by an inference forward on the CPU; '
                                   'dequantise a freshly loaded model')
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            raise NotImplementedError(f'{name}: 8-bit LLM weights cannot be converted; train QLoRA in 4-bit')
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                           device='meta')
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        count += 1
    return count


@torch.no_grad()
def _merge_peft(peft_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Add each LoRA layer's delta (peft's ``get_delta_weight``) to its base weight, dequantising a 4-bit
    base first; returns the plain model without adapters."""
    from peft.tuners.lora import LoraLayer
    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).to(torch.float32)
                    deltas[name] = deltas[name] + delta if name in deltas else delta
    base = peft_model.unload()  # the base model with its original layers back, adapters dropped
    _dequantize(base, dtype)
    prefix = 'base_model.model.'
    for name, delta in deltas.items():
        layer = base.get_submodule(name[len(prefix):] if name.startswith(prefix) else name)
        layer.weight.copy_((layer.weight.to(torch.float32) + delta).to(layer.weight.dtype))
    return base


def merge_adapters(model: InternVLModel, dtype: torch.dtype, log: Log = _print) -> None:
    """Merge LLM and vision LoRA adapters into their base weights and dequantise a 4-bit LLM (QLoRA)."""
    from peft import PeftModel
    for attr in ('language_model', 'vision_model'):
        module = getattr(model, attr)
        if isinstance(module, PeftModel):
            log(f'merging LoRA adapters of {attr}')
            setattr(model, attr, _merge_peft(module, dtype))
    count = _dequantize(model.language_model, dtype)
    if count:
        log(f'dequantised {count} 4-bit layers of language_model')
    for attr in ('quantization_config', '_pre_quantization_dtype'):
        if hasattr(model.language_model.config, attr):
            delattr(model.language_model.config, attr)
    for attr in ('is_quantized', 'is_loaded_in_4bit', 'is_loaded_in_8bit', 'hf_quantizer'):
        if hasattr(model.language_model, attr):
            try:
                delattr(model.language_model, attr)
            except AttributeError:
                pass
    for p in model.parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------------------ layouts
def official_state_dict(model: InternVLModel) -> Dict[str, torch.Tensor]:
    """``vision_model.*`` (InternViT's keys), ``mlp1.*``, ``language_model.*``."""
    vision = hf_to_official_vision_state_dict(nn.Module.state_dict(model.vision_model))
    state = {f'vision_model.{k}': v for k, v in vision.items()}
    state.update({f'mlp1.{k}': v for k, v in nn.Module.state_dict(model.mlp1).items()})
    state.update({f'language_model.{k}': v for k, v in nn.Module.state_dict(model.language_model).items()})
    return state


def hf_state_dict(model: InternVLModel) -> Dict[str, torch.Tensor]:
    """transformers' ``InternVLForConditionalGeneration`` keys."""
    state = {f'model.vision_tower.{k}': v for k, v in nn.Module.state_dict(model.vision_model).items()}
    names = {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}
    for key, value in nn.Module.state_dict(model.mlp1).items():
        index, _, leaf = key.partition('.')
        state[f'model.multi_modal_projector.{names[index]}.{leaf}'] = value
    state.update(composite_llm_state_dict(model, 'InternVL'))
    return state


def composite_llm_state_dict(model: InternVLModel, layout: str) -> Dict[str, torch.Tensor]:
    """The LLM's tensors as transformers' composite vision-language models (InternVL, LLaVA) key them:
    ``model.language_model.*`` for the decoder, ``lm_head.*``."""
    state = {}
    for key, value in nn.Module.state_dict(model.language_model).items():
        if key.startswith('model.'):
            state['model.language_model.' + key[len('model.'):]] = value
        elif key.startswith('lm_head.'):
            state[key] = value
        else:
            raise ValueError(f'language_model.{key}: no place for it in the transformers {layout} layout')
    return state


def chat_template(template_name: str, default_system: Optional[str] = None, image_text: str = '<image>\n') -> str:
    """A Jinja chat template for the tokenizer that renders what the training template renders (a leading
    ``system`` message replaces ``default_system``, by default the template's own).

    A message's content is a string, or a list of parts (``{'type': 'text', 'text': ...}``, ``{'type':
    'image'}``): each image part renders as ``image_text``, what the folder's processor expands into the
    image's tokens (LLaVA: ``<img><IMG_CONTEXT></img>\\n``, expanded to the training's ``<IMG_CONTEXT>`` run).
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
    content = ("{% macro content(c) %}{% if c is string %}{{ c }}{% else %}{% for part in c %}"
               "{% if part['type'] == 'image' %}{{ " + lit(image_text) + " }}"
               "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}")
    return (
        content +
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = content(messages[0]['content']) %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = " + lit(default_system) + " %}"
        "{% set turns = messages %}{% endif %}" + system +
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        "{{ " + lit(user_pre) + " + content(message['content']) + " + lit(user_post) + " }}"
        "{% else %}{{ " + lit(bot_pre) + " + content(message['content']) + " + lit(bot_post) + " }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + lit(bot_pre) + " }}{% endif %}"
    )


def write_weights(state: Dict[str, torch.Tensor], out_dir: str, max_shard_size: str = '5GB',
                  log: Log = _print) -> None:
    """safetensors shards (``model-0000i-of-0000n.safetensors`` + index), or one ``model.safetensors``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    total = len(split.filename_to_tensors)
    for i, (filename, keys) in enumerate(split.filename_to_tensors.items(), 1):
        start = time.time()
        save_file({k: state[k].contiguous() for k in keys}, os.path.join(out_dir, filename),
                  metadata={'format': 'pt'})
        log(f'wrote {filename} ({i}/{total}, {len(keys)} tensors, {time.time() - start:.1f}s)')
    if split.is_sharded:
        index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in state.values())},
                 'weight_map': split.tensor_to_filename}
        with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
            json.dump(index, f, indent=2, sort_keys=True)


def _save_tokenizer(model: InternVLModel, out_dir: str, extra: Optional[dict] = None,
                    system: Optional[str] = None, image_text: str = '<image>\n') -> None:
    tokenizer = model.tokenizer
    tokenizer.chat_template = chat_template(model.template, system, image_text)
    tokenizer.save_pretrained(out_dir)
    if extra:
        config_path = os.path.join(out_dir, 'tokenizer_config.json')
        with open(config_path, encoding='utf-8') as f:
            tok_cfg = json.load(f)
        tok_cfg['extra_special_tokens'] = extra
        with open(config_path, 'w', encoding='utf-8') as f:
            json.dump(tok_cfg, f, indent=2, ensure_ascii=False)


def generation_config(model: InternVLModel):
    from transformers import GenerationConfig
    tokenizer = model.tokenizer
    stop = tokenizer.convert_tokens_to_ids(get_template(model.template).stop_word)
    eos = [stop] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, stop) else [])
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def official_config(model: InternVLModel, tiling: dict, dtype: torch.dtype, system: Optional[str] = None) -> dict:
    """``config.json`` of an official InternVL folder (``InternVLChatConfig``).

    ``system``: the system message the model was trained with, when not the template's; stored as
    ``system_message``, which this project's remote code uses as the default of ``chat()`` (InternVL's own
    remote code ignores the key: set ``model.system_message`` there).
    """
    vision = hf_to_official_vision_config(model.vision_model.config)
    vision.update(drop_path_rate=0.0, torch_dtype=_dtype_name(dtype))
    llm = model.language_model.config.to_dict()
    llm.update(tie_word_embeddings=False, torch_dtype=_dtype_name(dtype), use_cache=True,
               vocab_size=model.language_model.get_input_embeddings().weight.shape[0])
    llm.pop('quantization_config', None)
    llm.pop('_name_or_path', None)
    llm['architectures'] = [type(model.language_model).__name__]
    import transformers
    config = {
        'architectures': ['InternVLChatModel'], 'auto_map': dict(OFFICIAL_AUTO_MAP), 'model_type': 'internvl_chat',
        'vision_config': vision, 'llm_config': llm, 'downsample_ratio': model.downsample_ratio,
        'template': model.template, 'ps_version': model.ps_version, 'select_layer': model.select_layer,
        'force_image_size': int(tiling['image_size']), 'dynamic_image_size': True,
        'use_thumbnail': bool(tiling['use_thumbnail']), 'min_dynamic_patch': int(tiling['min_dynamic_patch']),
        'max_dynamic_patch': int(tiling['max_dynamic_patch']), 'use_backbone_lora': 0, 'use_llm_lora': 0,
        'tie_word_embeddings': False, 'torch_dtype': _dtype_name(dtype),
        'transformers_version': transformers.__version__,
    }
    if system is not None:
        config['system_message'] = system
    return config


def write_official(model: InternVLModel, tiling: dict, out_dir: str, dtype: torch.dtype,
                   max_shard_size: str = '5GB', log: Log = _print, system: Optional[str] = None) -> None:
    """InternVL's official layout: weights, ``config.json`` with ``auto_map``, the remote-code files,
    tokenizer with chat template, ``generation_config.json`` and ``preprocessor_config.json``."""
    write_weights(official_state_dict(model), out_dir, max_shard_size, log)
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(official_config(model, tiling, dtype, system), f, indent=2, ensure_ascii=False)
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_FOLDER, name), os.path.join(out_dir, name))
    _save_tokenizer(model, out_dir, system=system)
    generation_config(model).save_pretrained(out_dir)
    size = int(tiling['image_size'])
    preprocessor = {'crop_size': size, 'do_center_crop': True, 'do_normalize': True, 'do_resize': True,
                    'feature_extractor_type': 'CLIPFeatureExtractor', 'image_mean': list(IMAGENET_MEAN),
                    'image_std': list(IMAGENET_STD), 'resample': 3, 'size': size}
    with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as f:
        json.dump(preprocessor, f, indent=2)


def hf_config(model: InternVLModel, dtype: torch.dtype):
    """``InternVLConfig`` of transformers' native layout."""
    from transformers import InternVLConfig
    vision = model.vision_model.config.to_dict()
    for key in ('drop_path_rate', 'use_flash_attn'):
        vision.pop(key, None)
    text = model.language_model.config.to_dict()
    text.pop('quantization_config', None)
    text.update(tie_word_embeddings=False, vocab_size=model.language_model.get_input_embeddings().weight.shape[0])
    num_image_token = int(model.vision_model.config.image_size[0] // model.vision_model.config.patch_size[0]) ** 2
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=model.img_context_token_id,
                            image_seq_length=int(num_image_token * model.downsample_ratio ** 2),
                            downsample_ratio=model.downsample_ratio, projector_hidden_act='gelu',
                            vision_feature_layer=model.select_layer, vision_feature_select_strategy='default',
                            tie_word_embeddings=False, dtype=dtype)
    config.architectures = ['InternVLForConditionalGeneration']
    return config


def write_hf(model: InternVLModel, tiling: dict, out_dir: str, dtype: torch.dtype, max_shard_size: str = '5GB',
             log: Log = _print, system: Optional[str] = None) -> None:
    """transformers' ``InternVLForConditionalGeneration`` layout with its processor (no remote code).

    ``system``: the system message the model was trained with; the chat template's default."""
    if model.ps_version != 'v2':
        raise ValueError(f'transformers InternVL implements pixel shuffle v2 only; this model uses {model.ps_version}')
    image_size = int(tiling['image_size'])
    if image_size != int(model.vision_model.config.image_size[0]):
        raise ValueError(f'the data tiles are {image_size} px but the vision config says '
                         f'{model.vision_model.config.image_size}; transformers InternVL uses the config size')
    write_weights(hf_state_dict(model), out_dir, max_shard_size, log)
    config = hf_config(model, dtype)
    config.save_pretrained(out_dir)
    generation_config(model).save_pretrained(out_dir)
    _save_tokenizer(model, out_dir, extra={'start_image_token': IMG_START_TOKEN, 'end_image_token': IMG_END_TOKEN,
                                           'context_image_token': IMG_CONTEXT_TOKEN, 'video_token': '<video>'},
                    system=system, image_text=IMG_CONTEXT_TOKEN + '\n')  # the processor wraps it in <img></img>
    from transformers import AutoTokenizer, GotOcr2ImageProcessorFast, InternVLProcessor, InternVLVideoProcessor
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    image_processor = GotOcr2ImageProcessorFast(
        crop_to_patches=True, min_patches=int(tiling['min_dynamic_patch']),
        max_patches=int(tiling['max_dynamic_patch']), size={'height': image_size, 'width': image_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_normalize=True, do_rescale=True,
        do_resize=True, do_convert_rgb=True)
    video_processor = InternVLVideoProcessor(size={'height': image_size, 'width': image_size},
                                             image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=config.image_seq_length,
                                  chat_template=tokenizer.chat_template)
    processor.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ the whole job
def load_config(config: str, cfg_options: Optional[dict] = None):
    """An MMEngine config file with ``--cfg-options``-style overrides."""
    from mmengine.config import Config
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config not found: {config}')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _inputs(cfg, checkpoint: Optional[str]):
    model = cfg.model
    vision = model.get('vision_encoder')
    paths = [checkpoint, vision.get('path') if isinstance(vision, dict) else vision, model.get('llm'),
             model.get('official_checkpoint'), model.get('pretrained_pth'), model.get('tokenizer')]
    return [os.path.realpath(p) for p in paths if isinstance(p, str) and os.path.exists(p)]


def check_out_dir(out_dir: str, inputs, overwrite: bool) -> None:
    """Refuse an output folder that is an input, holds an input, or is not empty (without ``overwrite``)."""
    out = os.path.realpath(out_dir)
    for path in inputs:
        if out == path or path.startswith(out + os.sep) or out.startswith(path + os.sep):
            raise ValueError(f'OUT_DIR {out_dir} is, holds or lies inside an input ({path}); choose another folder')
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'OUT_DIR {out_dir} exists and is not a folder')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f'OUT_DIR {out_dir} is not empty; pass --overwrite to replace its contents')


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FORMATS = ('auto', 'official', 'hf', 'llava', 'remote')


def internvl_misfit(model: InternVLModel) -> Optional[str]:
    """Why ``model`` is not an InternVL model (InternViT + pixel shuffle + tiles), or None."""
    from .projector import InternVLProjector
    reasons = []
    if model.vision.name != 'internvit':
        reasons.append(f'encoder {model.vision.name} (InternVL takes internvit)')
    if not isinstance(model.mlp1, InternVLProjector):
        reasons.append(f'projector {type(model.mlp1).name} (InternVL takes pixel_shuffle_mlp)')
    if model.image_mode != 'tile':
        reasons.append(f'image mode {model.image_mode} (InternVL tiles)')
    return '; '.join(reasons) or None


def choose_format(model: InternVLModel, fmt: str = 'auto') -> str:
    """``fmt`` checked against the model, or for ``'auto'`` the layout that fits: ``official`` for InternVL,
    ``llava`` for CLIP/SigLIP + LLaVA's MLP on one image, ``remote`` for any other combination."""
    from .llava_export import llava_misfit
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')
    misfit = {'official': internvl_misfit, 'hf': internvl_misfit, 'llava': llava_misfit}
    if fmt == 'auto':
        return next((f for f in ('official', 'llava') if misfit[f](model) is None), 'remote')
    if fmt in misfit and misfit[fmt](model):
        fits = [f for f in ('official', 'hf', 'llava') if misfit[f](model) is None] + ['remote']
        raise ValueError(f'--format {fmt} does not fit this model: {misfit[fmt](model)}; formats that fit: '
                         f'{", ".join(fits)}')
    return fmt


def writer_for(fmt: str):
    from .llava_export import write_llava
    from .remote_export import write_remote
    return {'official': write_official, 'hf': write_hf, 'llava': write_llava, 'remote': write_remote}[fmt]


def convert(config: str, checkpoint: Optional[str], out_dir: str, fmt: str = 'auto',
            dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, cfg_options: Optional[dict] = None,
            max_shard_size: str = '5GB', log: Log = _print) -> str:
    """Rebuild the config's model, load ``checkpoint``, merge adapters, write ``out_dir``; returns it.

    ``fmt``: ``'official'`` (InternVL's remote-code layout), ``'hf'`` (transformers' InternVL), ``'llava'``
    (transformers' LLaVA), ``'remote'`` (a self-contained remote-code folder for any family) or ``'auto'`` (the
    one that fits, see :func:`choose_format`). The folder is written next to ``out_dir`` and moved into place
    only when complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')
    start = time.time()
    cfg = load_config(config, cfg_options)
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    check_out_dir(out_dir, _inputs(cfg, checkpoint), overwrite)
    log(f'[1/4] building the model of {config} in {_dtype_name(dtype)}')
    model = build_for_export(cfg, checkpoint, dtype, log)
    fmt = choose_format(model, fmt)
    log(f'[2/4] merging adapters ({time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    merge_adapters(model, dtype, log)
    tmp = os.path.realpath(out_dir).rstrip(os.sep) + f'.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        log(f'[3/4] writing the {fmt} layout ({time.time() - start:.1f}s)')
        writer_for(fmt)(model, tiling_settings(cfg), tmp, dtype, max_shard_size, log,
                        system=training_system_message(cfg))
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f'[4/4] done: {out_dir} ({fmt} format; {time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    return out_dir
