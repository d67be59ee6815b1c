"""A converted vision-language model of any family, with InternVL's ``chat`` / ``batch_chat`` / ``generate``.

Written by the xtuner-plugins project to ship beside converted weights (``--format remote``)::

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    response = model.chat(tokenizer, pixel_values, '<image>\\nWhat is shown?', dict(max_new_tokens=64))

``pixel_values`` are the image's tiles as ``config.image_mode`` says (``tile``: InternVL's dynamic tiling of
``force_image_size`` tiles; ``resize``; ``pad``: padded to a square with the mean colour first), normalised with
``config.image_mean``/``image_std``. Weight keys: ``vision_model.*`` (the transformers tower's own),
``mlp1.*`` (``projector.py``'s), ``language_model.*``. The prompt, embedding and generation code is
``InternVLChatModel``'s; only the tower, its features and the projector differ.
"""

import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel

from .configuration_intern_vit import InternVisionConfig  # noqa: F401
from .configuration_internvl_chat import InternVLChatConfig  # noqa: F401
from .configuration_vlm_chat import VLMChatConfig
from .conversation import get_conv_template
from .modeling_intern_vit import InternVisionModel  # noqa: F401
from .modeling_internvl_chat import InternVLChatModel, capped_attention
from .projector import build_projector

# (transformers copies a remote-code module's direct ``from .x import`` files into its module cache, not those
# of the modules they import: the F401 lines name what modeling_internvl_chat needs, so they are copied too.)


class VLMChatModel(InternVLChatModel):
    config_class = VLMChatConfig
    _no_split_modules = ['SiglipEncoderLayer', 'CLIPEncoderLayer', 'InternVLVisionLayer', 'LlamaDecoderLayer',
                         'Qwen2DecoderLayer', 'Qwen3DecoderLayer']

    def __init__(self, config: VLMChatConfig, vision_model=None, language_model=None):
        PreTrainedModel.__init__(self, config)
        self.select_layer = config.select_layer
        self.template = config.template
        self.num_image_token = config.num_image_token
        # the parts in the dtype from_pretrained was asked for (its default dtype now), not their sub-configs' one
        dtype = torch.get_default_dtype()
        self.vision_model = (vision_model if vision_model is not None
                             else AutoModel.from_config(config.vision_config, dtype=dtype))
        inner = getattr(self.vision_model, 'vision_model', None)
        if getattr(inner, 'use_head', False):   # SigLIP's attention-pooling head: its output is never read, and
            inner.use_head = False               # with autograd on it makes a large transient (weights kept)
        capped = dict(attn_implementation='eager') if capped_attention(config.llm_config) else {}
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.llm_config, dtype=dtype, **capped))
        self.mlp1 = build_projector(config.projector, config.vision_config.hidden_size, config.llm_config.hidden_size)
        self.img_context_token_id = None
        self.conv_template = get_conv_template(self.template)
        # the trained system message ('' too: none at all); None: the template's
        recorded = config.system_message
        self.system_message = self.conv_template.system_message if recorded is None else recorded
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from the checkpoint; nothing is initialised here."""

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``hidden_states[select_layer]`` of the tower, CLS dropped where the encoder has one."""
        tower = self.vision_model
        if self.config.vision_type == 'internvit':
            # transformers' InternVLVisionModel takes no output_hidden_states: run its layers up to the one chosen
            layers = tower.encoder.layer
            depth = self.select_layer % (len(layers) + 1)
            hidden, _ = tower.embeddings(pixel_values)
            for layer in layers[:depth]:
                hidden = layer(hidden)
        else:
            hidden = tower(pixel_values=pixel_values, output_hidden_states=True,
                           return_dict=True).hidden_states[self.select_layer]
        return hidden[:, 1:] if self.config.drop_cls else hidden

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised tiles ``[T, 3, S, S]`` -> projected tokens ``[T, num_image_token, H]``."""
        return self.mlp1(self.features(pixel_values))
