"""Configuration of InternViT, the vision encoder of InternVL (``model_type`` "intern_vit_6b").

Written by the xtuner-plugins project to ship beside converted InternVL weights; the fields and their
defaults are those of OpenGVLab's ``InternVisionConfig``, so the same ``config.json`` loads in both.
"""

import os
from typing import Union

from transformers.configuration_utils import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """InternViT: ``image_size`` / ``patch_size`` in pixels, ``norm_type`` "layer_norm" or "rms_norm",
    ``qk_normalization`` for the 6B variant's RMSNorm on queries and keys, ``initializer_factor`` the
    initial layer scale, ``drop_path_rate`` the stochastic depth of the last layer (linear from 0)."""

    model_type = 'intern_vit_6b'

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=True, hidden_act='gelu', norm_type='rms_norm', layer_norm_eps=1e-6,
                 dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                 initializer_factor=0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> 'PretrainedConfig':
        """Also accepts a whole InternVL folder: its ``vision_config`` is used."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if 'vision_config' in config_dict:
            config_dict = config_dict['vision_config']
        return cls.from_dict(config_dict, **kwargs)
