"""Configuration of a converted vision-language model of any family: a transformers vision tower (InternViT
as ``InternVLVisionModel``, ``SiglipVisionModel``, ``CLIPVisionModel``), a projector (``projector.py``) and
a causal LM.

Written by the xtuner-plugins project to ship beside converted weights (``--format remote``). ``vision_config``
and ``llm_config`` are transformers configs rebuilt from their ``model_type``; the rest records how the model
was trained: the feature layer, whether a CLS token is dropped, the projector, tokens per tile, the image mode
and tiling, the pixel mean/std, the chat template and the system message.
"""

from transformers import AutoConfig
from transformers.configuration_utils import PretrainedConfig


def _config(value, default_type):
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value or {'model_type': default_type})
    return AutoConfig.for_model(value.pop('model_type', default_type), **value)


class VLMChatConfig(PretrainedConfig):
    model_type = 'xtuner_vlm_chat'
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, vision_type='siglip', select_layer=-1, drop_cls=False,
                 projector=None, num_image_token=256, image_mode='tile', force_image_size=448,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), dynamic_image_size=True,
                 use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12, template='internvl2_5',
                 system_message=None, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = _config(vision_config, 'siglip_vision_model')
        self.llm_config = _config(llm_config, 'qwen2')
        self.vision_type = vision_type
        self.select_layer = select_layer
        self.drop_cls = drop_cls
        self.projector = dict(projector or {'type': 'mlp'})
        self.num_image_token = num_image_token
        self.image_mode = image_mode
        self.force_image_size = force_image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.template = template
        self.system_message = system_message
        # the LLM's lm_head is stored on its own, never tied to the input embeddings
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False

    def to_dict(self):
        output = super().to_dict()
        output['vision_config'] = self.vision_config.to_dict()
        output['llm_config'] = self.llm_config.to_dict()
        return output
