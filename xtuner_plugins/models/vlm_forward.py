"""The forward pass of :class:`~xtuner_plugins.models.internvl.VisionLanguageModel`: the projected tiles put in the
``<IMG_CONTEXT>`` slots of the token embeddings (:func:`embed_inputs`) and the LLM run over them (:func:`forward`):
the logits, or the loss, where it can at the supervised positions only (chunked, Liger's fused loss, a mixture of
experts' router loss); preference pairs go to ``preference.pair_loss``. The model's methods of the same names call
these.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN

from .attention import SEGMENTED, llm_attention, packed_rows, segment_bounds, sliding_window
from .cpu_attention import as_sdpa
from .loss import causal_lm_loss, decoder_chunked_loss, supervised_positions
from .moe import no_router_logits, real_tokens


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_flags: torch.Tensor,
                 parts: Optional[nn.ModuleDict] = None, features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:meth:`~xtuner_plugins.models.internvl.VisionLanguageModel.embed_inputs` of ``model``."""
    if features is None:
        features = model.tower_features(pixel_values, parts)
    vit_embeds = model.part('mlp1', parts)(features)
    embeds = model.part('language_model', parts).get_input_embeddings()(input_ids)
    real = vit_embeds[image_flags.to(vit_embeds.device) == 1]
    selected = input_ids == model.img_context_token_id
    n_slots, n_feats = int(selected.sum()), real.shape[0] * real.shape[1]
    if n_slots != n_feats:
        raise ValueError(
            f'the batch has {n_slots} {IMG_CONTEXT_TOKEN} tokens but {n_feats} image features '
            f'({real.shape[0]} tiles with image flag 1 x {real.shape[1]} tokens per tile); the data and '
            f'the model disagree on tiles or tokens per tile')
    embeds = embeds.clone()
    embeds[selected] = real.reshape(-1, real.shape[-1]).to(embeds.dtype)
    # Keep dummy tiles in the graph (zero gradient) so ZeRO sees the same parameters used on every rank.
    return embeds + vit_embeds.sum().to(embeds.dtype) * 0.0


def forward(model, data: Dict[str, torch.Tensor], data_samples=None, mode: str = 'loss'):
    """:meth:`~xtuner_plugins.models.internvl.VisionLanguageModel.forward` of ``model``: ``mode`` ``'loss'`` (a
    dict of losses), ``'tensor'`` (the logits) or ``'predict'`` (the logits and ``data_samples``)."""
    if mode not in ('loss', 'tensor', 'predict'):
        raise ValueError(f'unknown mode {mode!r}; use "loss", "tensor" or "predict"')
    if mode == 'loss' and data.get('num_pairs') is not None:
        from .preference import pair_loss
        return pair_loss(model, data)
    embeds = model.embed_inputs(data['input_ids'], data['pixel_values'], data['image_flags'])
    position_ids = data.get('position_ids')
    attention_mask, segments = llm_attention(data, embeds, as_sdpa(model.language_model.config._attn_implementation),
                                              sliding_window(model.language_model.config), model.llm_recurrent)
    kwargs, positions = no_router_logits(model.router), None
    if segments is not None and model.language_model.config._attn_implementation in SEGMENTED:
        kwargs['segment_bounds'] = segment_bounds(data['seq_lens'], embeds.shape[1])
    balance = mode == 'loss' and model.router is not None and model.router.coef > 0
    if mode == 'loss' and (model.loss_chunk or 'fused_loss' in model.liger_kernel or model.llm_keeps_logits
                           or balance):
        # lm_head and the cross-entropy run at the supervised positions only: image, system and question
        # tokens need no logits (with a 150k vocabulary those are most of the step's logits memory)
        positions = supervised_positions(data['labels'].to(embeds.device))
        if model.loss_chunk or 'fused_loss' in model.liger_kernel or balance:
            with packed_rows('segment_bounds' in kwargs):
                loss, aux = decoder_chunked_loss(
                    model.language_model, embeds, data['labels'], positions, model.loss_chunk,
                    model.loss_reduction, segments, fused='fused_loss' in model.liger_kernel,
                    compiled='llm' in model.compile_blocks, router=model.router if balance else None,
                    real=real_tokens(data, segments), attention_mask=attention_mask, position_ids=position_ids,
                    **kwargs)
            return {'loss': loss} if aux is None else {'loss': loss, 'router_aux_loss': aux}
        kwargs['logits_to_keep'] = positions
    with packed_rows('segment_bounds' in kwargs):
        out = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, return_dict=True, **kwargs)
    if mode == 'tensor':
        return out.logits
    if mode == 'predict':
        return out.logits, data_samples
    return {'loss': causal_lm_loss(out.logits, data['labels'], model.loss_reduction, segments=segments,
                                   positions=positions, compiled='llm' in model.compile_blocks)}
