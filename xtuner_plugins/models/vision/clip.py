"""CLIP's vision tower, as ``openai/clip-vit-large-patch14-336`` publishes it (a whole ``CLIPModel`` folder;
only ``vision_model.*`` is read) or a ``CLIPVisionModel`` folder.

LLaVA-1.5's conventions: the second-to-last layer's hidden state (``select_layer=-2``), the CLS token
dropped (24 x 24 = 576 tokens for 336 px tiles), OpenAI's CLIP mean/std (from ``preprocessor_config.json``
when the folder has one). This module is the worked example of adding an encoder: the class below and
its ``@register_vision_encoder`` are all it takes.
"""

from transformers import CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .base import TransformersVisionEncoder, register_vision_encoder


@register_vision_encoder
class CLIPEncoder(TransformersVisionEncoder):
    name = 'clip'
    model_types = ('clip', 'clip_vision_model')
    module_class = CLIPVisionModel
    default_select_layer = -2
    drop_cls = True
    default_mean = tuple(OPENAI_CLIP_MEAN)
    default_std = tuple(OPENAI_CLIP_STD)
