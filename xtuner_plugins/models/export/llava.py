"""A trained CLIP/SigLIP + LLaVA-MLP model written as transformers' ``LlavaForConditionalGeneration`` folder.

The layout vLLM and SGLang serve, loading with no remote code::

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image', 'image': img},
                                            {'type': 'text', 'text': 'What is shown?'}]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors='pt')
    answer = model.generate(**inputs, max_new_tokens=64)

It fits a model whose encoder is CLIP or SigLIP, whose projector is LLaVA's ``mlp`` and which sees one
image per ``<image>`` (``image_mode`` ``'resize'`` or ``'pad'``). The training prompt is kept token for token:
the chat template renders an image part as ``<img><IMG_CONTEXT></img>\\n`` and the processor expands its
``<IMG_CONTEXT>`` (the image token) into ``num_image_token`` copies, which is what the training data set
writes for ``<image>\\n``; the training system message is the template's default. Pixels: ``'resize'`` is
``CLIPImageProcessor`` resizing to exactly S x S (bicubic, no crop), ``'pad'`` is ``LlavaImageProcessor`` with
``do_pad`` (the mean colour, ``int(mean * 255)``, as the training's ``pad_to_square``), both with the encoder's
mean/std. Keys as transformers 4.x saves them: ``vision_tower.*``, ``multi_modal_projector.linear_{1,2}.*``,
``language_model.model.*``, ``language_model.lm_head.*`` (``layouts.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

from ..projector import BilinearProjector, LlavaProjector
from .files import Log, _print, generation_config, part_config, save_tokenizer, write_weights
from .hf import language_model_misfit
from .layouts import llava_state_dict

LLAVA_IMAGE_TEXT = f'{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN}{IMG_END_TOKEN}\n'


def llava_misfit(model) -> Optional[str]:
    """Why ``model`` cannot be written as transformers' LLaVA, or None when it can."""
    reasons = []
    if model.vision.name not in ('clip', 'siglip'):
        reasons.append(f'encoder {model.vision.name} (LLaVA takes clip or siglip)')
    if not isinstance(model.mlp1, LlavaProjector) or isinstance(model.mlp1, BilinearProjector):
        reasons.append(f'projector {type(model.mlp1).name} (LLaVA takes mlp)')
    if model.image_mode not in ('resize', 'pad'):
        reasons.append(f'image mode {model.image_mode} (LLaVA takes resize or pad: one tile per image)')
    language = language_model_misfit(model)
    if language:
        reasons.append(language)
    return '; '.join(reasons) or None


def llava_config(model, dtype: torch.dtype):
    from transformers import LlavaConfig
    text = part_config(model.language_model.config)
    # use_cache: the LLM's KV cache on, as in the official folder (training turned it off in the config it holds)
    text.update(tie_word_embeddings=False, vocab_size=model.language_model.get_input_embeddings().weight.shape[0],
                use_cache=True)
    config = LlavaConfig(vision_config=part_config(model.vision_model.config), text_config=text,
                         image_token_index=model.img_context_token_id, projector_hidden_act='gelu',
                         vision_feature_select_strategy='default' if model.vision.drop_cls else 'full',
                         vision_feature_layer=model.vision.select_layer, image_seq_length=model.num_image_token,
                         multimodal_projector_bias=True, tie_word_embeddings=False, dtype=dtype)
    config.architectures = ['LlavaForConditionalGeneration']
    return config


def llava_image_processor(model):
    """The processor step that makes the training's tiles: resize to S x S, or pad with the mean colour."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor
    size, mean, std = model.vision.image_size, list(model.vision.mean), list(model.vision.std)
    common = dict(image_mean=mean, image_std=std, resample=3, do_resize=True, do_rescale=True, do_normalize=True,
                  do_convert_rgb=True)
    if model.image_mode == 'pad':
        return LlavaImageProcessor(do_pad=True, size={'shortest_edge': size}, do_center_crop=True,
                                   crop_size={'height': size, 'width': size}, **common)
    return CLIPImageProcessor(size={'height': size, 'width': size}, do_center_crop=False, **common)


def write_llava(model, tiling: dict, out_dir: str, dtype: torch.dtype, max_shard_size: str = '5GB',
                log: Log = _print, system: Optional[str] = None) -> None:
    """Weights, ``LlavaConfig``, generation config, tokenizer and ``LlavaProcessor`` with the chat template
    (``tiling`` is unused: one tile per image, its size the encoder's)."""
    from transformers import AutoTokenizer, LlavaProcessor
    misfit = llava_misfit(model)
    if misfit:
        raise ValueError(f'this model does not fit transformers\' LLaVA layout: {misfit}; use --format remote')
    write_weights(llava_state_dict(model), out_dir, max_shard_size, log)
    llava_config(model, dtype).save_pretrained(out_dir)
    generation_config(model).save_pretrained(out_dir)
    template = save_tokenizer(model, out_dir, system=system, image_text=LLAVA_IMAGE_TEXT, video_text=None)
    processor = LlavaProcessor(image_processor=llava_image_processor(model),
                               tokenizer=AutoTokenizer.from_pretrained(out_dir), patch_size=model.vision.patch_size,
                               vision_feature_select_strategy='default' if model.vision.drop_cls else 'full',
                               num_additional_image_tokens=1 if model.vision.drop_cls else 0,
                               image_token=IMG_CONTEXT_TOKEN, chat_template=template)
    processor.save_pretrained(out_dir)
