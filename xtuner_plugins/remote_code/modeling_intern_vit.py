"""InternViT, the vision encoder of InternVL, with OpenGVLab's module and weight names.

Written by the xtuner-plugins project to ship beside converted InternVL weights. Weight keys:
``embeddings.{class_embedding, patch_embedding, position_embedding}`` and per layer
``encoder.layers.N.{norm1, attn.qkv, attn.q_norm, attn.k_norm, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}``.

A layer is ``x + drop_path(ls1 * proj(attn(norm1(x))))`` then ``x + drop_path(ls2 * mlp(norm2(x)))``;
``attn.qkv`` is one linear layer whose output rows are [q; k; v]; there is no final norm. Attention runs
through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel

from .configuration_intern_vit import InternVisionConfig


class InternRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


NORM2FN = {'rms_norm': InternRMSNorm, 'layer_norm': nn.LayerNorm}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a whole sample's residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _get_pos_embed(self, pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Patch position embeddings resized bicubically (in float32) to a ``height x width`` patch grid."""
        grid = self.image_size // self.patch_size
        target_dtype = pos_embed.dtype
        pos_embed = pos_embed.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos_embed = F.interpolate(pos_embed, size=(height, width), mode='bicubic', align_corners=False)
        return pos_embed.reshape(1, -1, height * width).permute(0, 2, 1).to(target_dtype)

    def forward(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))  # [N, C, h, w]
        batch_size, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = torch.cat([
            self.position_embedding[:, :1, :],
            self._get_pos_embed(self.position_embedding[:, 1:, :], height, width),
        ], dim=1)
        return embeddings + position_embedding.to(target_dtype)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f'hidden_size {self.embed_dim} is not divisible by num_heads {self.num_heads}')
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, channels = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, length, head_dim]
        if self.qk_normalization:
            q = self.q_norm(q.transpose(1, 2).flatten(2)).view(batch, length, self.num_heads, -1).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(2)).view(batch, length, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, length, channels)
        return self.proj_drop(self.proj(out))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.norm_type = config.norm_type
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.norm2 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.FloatTensor]:
        hidden_states = hidden_states + drop_path(
            self.attn(self.norm1(hidden_states).to(hidden_states.dtype)) * self.ls1, self.drop_path_rate,
            self.training)
        hidden_states = hidden_states + drop_path(
            self.mlp(self.norm2(hidden_states).to(hidden_states.dtype)) * self.ls2, self.drop_path_rate,
            self.training)
        return hidden_states


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.num_hidden_layers)]
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rates[i])
                                     for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, BaseModelOutput]:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        all_states = (inputs_embeds,) if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, all_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_states)


class InternVisionModel(PreTrainedModel):
    main_input_name = 'pixel_values'
    config_class = InternVisionConfig
    _no_split_modules = ['InternVisionEncoderLayer']
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, InternRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, InternVisionEmbeddings):
            module.class_embedding.data.normal_(mean=0.0, std=std)
            module.position_embedding.data.normal_(mean=0.0, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            module.ls1.data.fill_(self.config.initializer_factor)
            module.ls2.data.fill_(self.config.initializer_factor)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None):
        self.encoder.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.encoder.gradient_checkpointing = True

    def resize_pos_embeddings(self, old_size: int, new_size: int, patch_size: int) -> None:
        """Resize the stored position embeddings for ``new_size`` px images (InternVL's ``force_image_size``)."""
        pos_emb = self.embeddings.position_embedding
        _, num_positions, embed_dim = pos_emb.shape
        cls_emb = pos_emb[:, :1, :]
        old, new = old_size // patch_size, new_size // patch_size
        pos = pos_emb[:, 1:, :].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=new, mode='bicubic', align_corners=False)
        pos = pos.to(cls_emb.dtype).reshape(1, embed_dim, -1).permute(0, 2, 1)
        self.embeddings.position_embedding = nn.Parameter(torch.cat([cls_emb, pos], dim=1))
        self.embeddings.image_size = new_size
        self.config.image_size = new_size

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values: Optional[torch.FloatTensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, pixel_embeds: Optional[torch.FloatTensor] = None,
                ) -> Union[Tuple, BaseModelOutputWithPooling]:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if pixel_values is None and pixel_embeds is None:
            raise ValueError('give pixel_values or pixel_embeds')
        if pixel_embeds is not None:
            hidden_states = pixel_embeds
        elif pixel_values.ndim == 4:
            hidden_states = self.embeddings(pixel_values)
        else:
            raise ValueError(f'pixel_values must be [N, 3, H, W], got shape {tuple(pixel_values.shape)}')
        encoder_outputs = self.encoder(inputs_embeds=hidden_states, output_hidden_states=output_hidden_states,
                                       return_dict=return_dict)
        last_hidden_state = encoder_outputs.last_hidden_state if return_dict else encoder_outputs[0]
        pooled_output = last_hidden_state[:, 0, :]
        if not return_dict:
            return (last_hidden_state, pooled_output) + tuple(encoder_outputs[1:])
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output,
                                          hidden_states=encoder_outputs.hidden_states)
