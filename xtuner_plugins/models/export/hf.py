"""``--format hf``: transformers' ``InternVLForConditionalGeneration`` with its processor (no remote code)."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD

from ..head import decoder_of, logit_transform, unwrapped
from ..internvl import VisionLanguageModel
from .files import Log, _print, frame_range, generation_config, part_config, save_tokenizer, write_weights
from .layouts import hf_state_dict
from .official import internvl_misfit, shuffle_arithmetic_misfit


def language_model_misfit(model) -> Optional[str]:
    """Why transformers' ``InternVLForConditionalGeneration`` and ``LlavaForConditionalGeneration`` would not run the
    LLM as it was trained, or None: they call its ``lm_head`` themselves, without what the LLM's own forward does to
    the logits after it (``head.logit_transform``: Gemma-2's soft-capping, 0.03 off on a tiny model; Granite's
    ``logits_scaling``, 8x; Cohere's ``logit_scale``; and every option's likelihood with them), and they pass its
    decoder keywords of theirs (``image_sizes``), which a decoder whose forward takes no others refuses at the first
    question (Qwen2-MoE's, OLMoE's: a TypeError in chat)."""
    reasons = []
    found = logit_transform(model.language_model)
    if found:
        reasons.append(f'{found[0]} {found[1]} (transformers\' vision-language classes call the LLM\'s lm_head '
                       f'themselves, without it)')
    decoder = decoder_of(unwrapped(model.language_model))
    takes = inspect.signature(decoder.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes):
        reasons.append(f'the LLM\'s {type(decoder).__name__} takes no keywords but its own (transformers\' '
                       f'vision-language classes pass it theirs)')
    return '; '.join(reasons) or None


def hf_misfit(model: VisionLanguageModel) -> Optional[str]:
    """Why transformers' ``InternVLForConditionalGeneration`` cannot run ``model`` as it was trained, or None: an
    InternVL model (:func:`~.official.internvl_misfit`) whose features are the last layer's (transformers 4.57's
    ``get_image_features`` reads an earlier layer through ``self.vision_model``, which its ``InternVLModel`` has
    not: an AttributeError at the first image) and whose ratio its pixel shuffle computes as training does."""
    misfit = internvl_misfit(model)
    if misfit:
        return misfit
    reasons = []
    if model.select_layer != -1:
        reasons.append(f'select_layer {model.select_layer} (transformers\' InternVL fails on a layer other than '
                       f'the last, -1)')
    language = language_model_misfit(model)
    if language:
        reasons.append(language)
    arithmetic = shuffle_arithmetic_misfit(model, float_modulo=True)
    if arithmetic:
        reasons.append(arithmetic)
    return '; '.join(reasons) or None


def hf_config(model: VisionLanguageModel, dtype: torch.dtype):
    """``InternVLConfig`` of transformers' native layout."""
    from transformers import InternVLConfig
    vision = part_config(model.vision_model.config)
    for key in ('drop_path_rate', 'use_flash_attn'):
        vision.pop(key, None)
    text = part_config(model.language_model.config)
    # use_cache: the LLM's KV cache on, as in the official folder (training turned it off in the config it holds)
    text.update(tie_word_embeddings=False, vocab_size=model.language_model.get_input_embeddings().weight.shape[0],
                use_cache=True)
    num_image_token = int(model.vision_model.config.image_size[0] // model.vision_model.config.patch_size[0]) ** 2
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=model.img_context_token_id,
                            image_seq_length=int(num_image_token * model.downsample_ratio ** 2),
                            downsample_ratio=model.downsample_ratio, projector_hidden_act='gelu',
                            vision_feature_layer=model.select_layer, vision_feature_select_strategy='default',
                            tie_word_embeddings=False, dtype=dtype)
    config.architectures = ['InternVLForConditionalGeneration']
    return config


def write_hf(model: VisionLanguageModel, tiling: dict, out_dir: str, dtype: torch.dtype, max_shard_size: str = '5GB',
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
    for key, value in frame_range(tiling).items():   # config.json's, as the official folder's: chat's frames note
        setattr(config, key, value)
    config.save_pretrained(out_dir)
    generation_config(model).save_pretrained(out_dir)
    save_tokenizer(model, out_dir, extra={'start_image_token': IMG_START_TOKEN, 'end_image_token': IMG_END_TOKEN,
                                          'context_image_token': IMG_CONTEXT_TOKEN, 'video_token': '<video>'},
                   system=system, image_text=IMG_CONTEXT_TOKEN + '\n')  # the processor wraps it in <img></img>
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    # the slow processor (Pillow's resize, as training's tiles): the fast one (torchvision's) was one 8-bit level
    # off on every image it resized; loaded as saved unless use_fast=True is asked for
    image_processor = GotOcr2ImageProcessor(
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
