"""Data pipeline: InternVL tiling, conversation templates, datasets and collation."""

from .collate import internvl_collate_fn
from .dataset import InternVLDataset
from .errors import SampleError, TooManyBadSamplesError
from .preference import InternVLPreferenceDataset, preference_collate_fn
from .template import (IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, INTERNVL_ADDED_TOKENS,
                       TEMPLATES, Template, add_internvl_tokens, get_template)
from .tile_grid import num_tiles
from .tiling import IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, normalize_tiles, tile_image
from .tokenize import tokenize_conversation

__all__ = [
    'InternVLDataset', 'internvl_collate_fn', 'InternVLPreferenceDataset', 'preference_collate_fn', 'SampleError',
    'TooManyBadSamplesError',
    'IGNORE_INDEX', 'IMG_CONTEXT_TOKEN', 'IMG_END_TOKEN', 'IMG_START_TOKEN', 'INTERNVL_ADDED_TOKENS',
    'TEMPLATES', 'Template', 'add_internvl_tokens', 'get_template', 'tokenize_conversation',
    'IMAGENET_MEAN', 'IMAGENET_STD', 'dynamic_preprocess', 'normalize_tiles', 'num_tiles', 'tile_image',
]
