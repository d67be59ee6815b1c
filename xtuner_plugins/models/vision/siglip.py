"""SigLIP's vision tower, as ``google/siglip-so400m-patch14-384`` publishes it (a whole ``SiglipModel``
folder; only ``vision_model.*`` is read) or a ``SiglipVisionModel`` folder.

No CLS token (27 x 27 = 729 tokens for 384 px tiles), mean/std 0.5 (from ``preprocessor_config.json`` when
the folder has one), the last encoder layer's hidden state by default (``hidden_states[-1]``, before the
post-LayerNorm, as transformers' LLaVA-OneVision takes it). The attention-pooling head is never used, and its
forward is skipped (its weights stay in the tower, so a saved tower is the published one): transformers runs it
in every forward, and with autograd on (a frozen tower in training) its key/value projection of the transposed
hidden states ran as a batched matmul with the weight broadcast over the 729 positions, a 3.9 GB transient for 8
so400m tiles (benchmarks/RESULTS.md).
"""

import torch
from torch import nn

from transformers import SiglipVisionModel

from .base import TransformersVisionEncoder, register_vision_encoder


@register_vision_encoder
class SiglipEncoder(TransformersVisionEncoder):
    name = 'siglip'
    model_types = ('siglip', 'siglip_vision_model')
    module_class = SiglipVisionModel
    # the base's defaults are SigLIP's: the last layer (-1), no CLS token, mean/std 0.5

    def features(self, module: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        module.vision_model.use_head = False   # the pooling head's output is never read (module docstring)
        return super().features(module, pixel_values)
