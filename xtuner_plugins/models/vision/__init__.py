"""Vision encoders behind one seam (``base.py``): InternViT (OpenGVLab's layout, loaded into transformers'
``InternVLVisionModel``), SigLIP and CLIP (transformers' own vision models)."""

from .base import (VISION_ENCODERS, VisionEncoder, build_vision_encoder, encoder_type_for_folder,
                   register_vision_encoder)
from .clip import CLIPEncoder
from .internvit import (OFFICIAL_MODEL_TYPE, InternVLVisionLayerWithDropPath, InternViTEncoder,
                        build_internvit_from_state_dict, hf_to_official_vision_config,
                        hf_to_official_vision_state_dict, interpolate_position_embeddings, load_internvit,
                        official_to_hf_vision_config, official_to_hf_vision_state_dict, set_drop_path,
                        vision_features)
from .siglip import SiglipEncoder

__all__ = [
    'VISION_ENCODERS', 'VisionEncoder', 'build_vision_encoder', 'encoder_type_for_folder', 'register_vision_encoder',
    'CLIPEncoder', 'InternViTEncoder', 'SiglipEncoder',
    'OFFICIAL_MODEL_TYPE', 'InternVLVisionLayerWithDropPath', 'build_internvit_from_state_dict',
    'hf_to_official_vision_config', 'hf_to_official_vision_state_dict', 'interpolate_position_embeddings',
    'load_internvit', 'official_to_hf_vision_config', 'official_to_hf_vision_state_dict',
    'set_drop_path', 'vision_features',
]
