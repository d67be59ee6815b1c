"""Configuration of an InternVL chat model: InternViT + ``mlp1`` projector + a causal LM.

Written by the xtuner-plugins project to ship beside converted InternVL weights. The fields are those of
OpenGVLab's ``InternVLChatConfig``; ``llm_config`` may be any transformers causal-LM config (it is rebuilt
from its ``model_type``).
"""

from transformers import AutoConfig
from transformers.configuration_utils import PretrainedConfig

from .configuration_intern_vit import InternVisionConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = 'internvl_chat'
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version='v1', min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, InternVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        if isinstance(llm_config, PretrainedConfig):
            self.llm_config = llm_config
        else:
            llm_config = dict(llm_config or {'model_type': 'qwen2', 'architectures': ['Qwen2ForCausalLM']})
            self.llm_config = AutoConfig.for_model(llm_config.pop('model_type', 'qwen2'), **llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        # the LLM's lm_head is stored on its own, never tied to the input embeddings
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False

    def to_dict(self):
        output = super().to_dict()
        output['vision_config'] = self.vision_config.to_dict()
        output['llm_config'] = self.llm_config.to_dict()
        return output
