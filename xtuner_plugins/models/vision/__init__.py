"""Vision encoders: InternViT in OpenGVLab's layout, loaded into transformers' ``InternVLVisionModel``."""

from .internvit import (OFFICIAL_AUTO_MAP, OFFICIAL_MODEL_TYPE, InternVLVisionLayerWithDropPath,
                        build_internvit_from_state_dict, hf_to_official_vision_config,
                        hf_to_official_vision_state_dict, interpolate_position_embeddings, load_internvit,
                        load_vision_encoder, official_to_hf_vision_config, official_to_hf_vision_state_dict,
                        set_drop_path, vision_features)

__all__ = [
    'OFFICIAL_AUTO_MAP', 'OFFICIAL_MODEL_TYPE', 'InternVLVisionLayerWithDropPath', 'build_internvit_from_state_dict',
    'hf_to_official_vision_config', 'hf_to_official_vision_state_dict', 'interpolate_position_embeddings',
    'load_internvit', 'load_vision_encoder', 'official_to_hf_vision_config', 'official_to_hf_vision_state_dict',
    'set_drop_path', 'vision_features',
]
