"""InternVL chat model: InternViT + pixel shuffle + ``mlp1`` projector + a causal LM, with ``chat``.

Written by the xtuner-plugins project to ship beside converted InternVL weights, compatible with the
official usage::

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    response = model.chat(tokenizer, pixel_values, '<image>\\nWhat is shown?', dict(max_new_tokens=64))

``pixel_values`` are the image's tiles, normalised with the ImageNet mean and std, as InternVL's
``load_image`` makes them. Weight keys: ``vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.*``.
"""

import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import get_conv_template
from .modeling_intern_vit import InternVisionModel

logger = logging.get_logger(__name__)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def capped_attention(llm_config) -> bool:
    """Whether the LLM caps its attention logits (Gemma 2's ``attn_logit_softcapping``), which transformers' SDPA
    drops: such an LLM runs eager attention here, as it was trained."""
    return bool(getattr(llm_config, 'attn_logit_softcapping', None))


def _pad_id(tokenizer, stop: int) -> int:
    """The pad id generation fills finished rows with: the tokenizer's, or the stop word's for an LLM without one
    (Llama 3's), as the folder's generation_config.json says (generate() otherwise warns at every call)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = 'pixel_values'
    _no_split_modules = ['InternVisionModel', 'LlamaDecoderLayer', 'Qwen2DecoderLayer', 'Qwen3DecoderLayer',
                         'InternLM2DecoderLayer', 'Phi3DecoderLayer']
    _supports_flash_attn_2 = True
    _supports_flash_attn = True
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None, use_flash_attn=None):
        super().__init__(config)
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size = patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        if use_flash_attn is None:
            use_flash_attn = _flash_attn_available()
        attn = 'flash_attention_2' if use_flash_attn else 'eager' if capped_attention(config.llm_config) else 'sdpa'
        config.llm_config._attn_implementation = attn

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        if language_model is not None:
            self.language_model = language_model
        else:
            # in the dtype from_pretrained was asked for (its default dtype now), not llm_config's recorded one
            self.language_model = AutoModelForCausalLM.from_config(config.llm_config, attn_implementation=attn,
                                                                   dtype=torch.get_default_dtype())

        vit_hidden_size = config.vision_config.hidden_size
        llm_hidden_size = config.llm_config.hidden_size
        in_features = vit_hidden_size * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.img_context_token_id = None
        self.conv_template = get_conv_template(self.template)
        # a converted model trained with its own system message records it in the config ('' too: none at all)
        recorded = getattr(config, 'system_message', None)
        self.system_message = self.conv_template.system_message if recorded is None else recorded
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config.llm_config, 'initializer_range', 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    # ------------------------------------------------------------------------------ embeddings
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------------------ vision
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """``[N, h, w, C] -> [N, h*r, w*r, C/r^2]``; in ``v2`` token (i, j) holds the channels of inputs
        (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)."""
        n, h, w, c = x.size()
        x = x.reshape(n, h, int(w * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(w * scale_factor), int(h * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version == 'v1':
            warnings.warn("ps_version 'v1' leaves the token grid transposed")
        else:
            x = x.permute(0, 2, 1, 3)
        return x.contiguous()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[T, 3, S, S]`` -> projected vision tokens ``[T, num_image_token, H]``."""
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False,
                                           return_dict=True).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           return_dict=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _embed(self, input_ids: torch.Tensor, vit_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        if vit_embeds is None:
            return input_embeds
        if self.img_context_token_id is None:
            raise ValueError('set model.img_context_token_id (the id of <IMG_CONTEXT>) before a forward with images')
        batch, length, channels = input_embeds.shape
        input_embeds = input_embeds.reshape(batch * length, channels).clone()
        selected = input_ids.reshape(batch * length) == self.img_context_token_id
        vit_embeds = vit_embeds.reshape(-1, channels).to(input_embeds.dtype)
        if int(selected.sum()) != vit_embeds.shape[0]:
            raise ValueError(f'the text has {int(selected.sum())} <IMG_CONTEXT> tokens but the tiles give '
                             f'{vit_embeds.shape[0]} vision tokens ({self.num_image_token} per tile)')
        input_embeds[selected] = vit_embeds
        return input_embeds.reshape(batch, length, channels)

    # ------------------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.LongTensor] = None,
                image_flags: Optional[torch.LongTensor] = None, past_key_values=None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        vit_embeds = None
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            if image_flags is not None:
                vit_embeds = vit_embeds[image_flags.reshape(-1) == 1]
        input_embeds = self._embed(input_ids, vit_embeds)
        outputs = self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=True)
        logits = outputs.logits
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits.float(), shift_labels)
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.past_key_values, outputs.hidden_states,
                                                   outputs.attentions) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ------------------------------------------------------------------------------ chat
    def _image_query(self, query: str, num_patches_list: List[int], start: str, end: str, context: str) -> str:
        for num_patches in num_patches_list:
            if '<image>' not in query:
                raise ValueError(f'{len(num_patches_list)} images given but the prompt has fewer <image> tags')
            query = query.replace('<image>', start + context * self.num_image_token * num_patches + end, 1)
        return query

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, IMG_START_TOKEN='<img>', IMG_END_TOKEN='</img>',
             IMG_CONTEXT_TOKEN='<IMG_CONTEXT>', verbose=False):
        """One turn of a conversation. ``num_patches_list``: tiles per image when ``pixel_values`` holds
        several images (one ``<image>`` tag each in ``question``); ``history``: [(question, answer)]."""
        if history is None and pixel_values is not None and '<image>' not in question:
            question = '<image>\n' + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise ValueError(f'pixel_values has {len(pixel_values)} tiles but num_patches_list sums to '
                             f'{sum(num_patches_list)}')
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)

        template = get_conv_template(self.template)
        template.system_message = self.system_message
        eos_token_id = tokenizer.convert_tokens_to_ids(template.sep.strip())
        history = [] if history is None else history
        for old_question, old_answer in history:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = self._image_query(template.get_prompt(), num_patches_list, IMG_START_TOKEN, IMG_END_TOKEN,
                                  IMG_CONTEXT_TOKEN)
        if verbose and pixel_values is not None:
            print(f'dynamic ViT batch size: {pixel_values.shape[0]}')

        model_inputs = tokenizer(query, return_tensors='pt')
        generation_config = dict(generation_config)
        generation_config['eos_token_id'] = eos_token_id
        generation_config.setdefault('pad_token_id', _pad_id(tokenizer, eos_token_id))
        output = self.generate(pixel_values=pixel_values, input_ids=model_inputs['input_ids'].to(self.device),
                               attention_mask=model_inputs['attention_mask'].to(self.device), **generation_config)
        response = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
        response = response.split(template.sep.strip())[0].strip()
        history.append((question, response))
        if verbose:
            shown = query.replace(IMG_CONTEXT_TOKEN, '').replace(f'{IMG_START_TOKEN}{IMG_END_TOKEN}', '<image>')
            print(shown, response)
        return (response, history) if return_history else response

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None,
                   history=None, return_history=False, IMG_START_TOKEN='<img>', IMG_END_TOKEN='</img>',
                   IMG_CONTEXT_TOKEN='<IMG_CONTEXT>', verbose=False, image_counts=None):
        """One question per entry of ``num_patches_list`` (the tiles of that question's image), answered
        in one left-padded batch. Multi-turn history is not supported here (use ``chat``)."""
        if history is not None or return_history:
            raise NotImplementedError('batch_chat answers single questions; use chat() for multi-turn history')
        if image_counts is not None:
            num_patches_list = image_counts
        if num_patches_list is None:
            raise ValueError('batch_chat needs num_patches_list: the number of tiles of each question\'s image')
        if len(num_patches_list) != len(questions):
            raise ValueError(f'{len(questions)} questions but {len(num_patches_list)} entries in num_patches_list')
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and '<image>' not in question:
                question = '<image>\n' + question
            template = get_conv_template(self.template)
            template.system_message = self.system_message
            template.append_message(template.roles[0], question)
            template.append_message(template.roles[1], None)
            queries.append(self._image_query(template.get_prompt(), [num_patches] if pixel_values is not None
                                             else [], IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
        stop = tokenizer.convert_tokens_to_ids(template.sep.strip())
        padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
        tokenizer.padding_side = 'left'
        if pad_token is None:   # an LLM without one (Llama 3's) pads with the stop word
            tokenizer.pad_token = template.sep.strip()
        try:
            model_inputs = tokenizer(queries, return_tensors='pt', padding=True)
        finally:
            tokenizer.padding_side = padding_side
            if pad_token is None:
                tokenizer.pad_token = None
        generation_config = dict(generation_config)
        generation_config['eos_token_id'] = stop
        generation_config.setdefault('pad_token_id', _pad_id(tokenizer, stop))
        output = self.generate(pixel_values=pixel_values, input_ids=model_inputs['input_ids'].to(self.device),
                               attention_mask=model_inputs['attention_mask'].to(self.device), **generation_config)
        responses = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [response.split(template.sep.strip())[0].strip() for response in responses]

    @torch.no_grad()
    def generate(self, pixel_values: Optional[torch.FloatTensor] = None, input_ids: Optional[torch.LongTensor] = None,
                 attention_mask: Optional[torch.LongTensor] = None, visual_features: Optional[torch.FloatTensor] = None,
                 generation_config: Optional[GenerationConfig] = None, output_hidden_states: Optional[bool] = None,
                 **generate_kwargs) -> torch.LongTensor:
        """The LLM's ``generate`` on the embedded prompt; returns the new tokens only."""
        vit_embeds = None
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(
                pixel_values.to(self.device, next(self.mlp1.parameters()).dtype))
        input_embeds = self._embed(input_ids, vit_embeds)
        return self.language_model.generate(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                            generation_config=generation_config,
                                            output_hidden_states=output_hidden_states, use_cache=True,
                                            **generate_kwargs)
