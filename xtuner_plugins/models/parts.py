"""The three parts of a :class:`~xtuner_plugins.models.internvl.VisionLanguageModel` and its tokenizer, built from
their sources: an official InternVL folder, or a vision encoder and a causal LM each from its own folder with a
new projector between them (:func:`build_parts`). Under DeepSpeed ZeRO-3 they are built partitioned
(``zero3.hf_zero3_init``). The tokenizer must fit the template, and the LLM's embeddings are untied and resized to
it (``llm.py``).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch
from mmengine.logging import print_log
from torch import nn

from xtuner_plugins.data.template import check_tokenizer_fits
from xtuner_plugins.data.tiling import IMAGE_MODES
from xtuner_plugins.errors import Refused

from .attention import ATTN_IMPLEMENTATIONS, check_softcap
from .llm import check_llm_folder, fit_embeddings_to_tokenizer, load_llm, load_tokenizer, untie_embeddings
from .lora import check_init
from .projector import InternVLProjector, build_projector
from .vision import InternViTEncoder, build_vision_encoder
from .loss import REDUCTIONS
from .zero3 import hf_zero3_init

__all__ = ['build_parts', 'check_settings']


def check_settings(*, attn_implementation: str, image_mode: str, loss_reduction: str, loss_chunk: int,
                   llm_quantization: Optional[dict], llm_lora: Optional[dict], freeze_llm: bool,
                   preference: Optional[dict] = None, vision_lora: Optional[dict] = None,
                   freeze_vision: bool = True) -> None:
    """The model's settings no part checks on its own, refused (:class:`~xtuner_plugins.errors.Refused`) before
    anything loads."""
    for name, value, valid in (('attn_implementation', attn_implementation, ATTN_IMPLEMENTATIONS),
                               ('image_mode', image_mode, IMAGE_MODES), ('loss_reduction', loss_reduction, REDUCTIONS)):
        if value not in valid:
            raise Refused(f'unknown {name} {value!r}; use one of {valid}')
    if llm_quantization is not None and (llm_lora is None or not freeze_llm):
        raise Refused('llm_quantization needs llm_lora and freeze_llm=True: a quantised LLM is trained '
                      'through LoRA adapters only (QLoRA)')
    for part, lora, frozen, name in (('llm', llm_lora, freeze_llm, "LLM's weights"),
                                     ('vision', vision_lora, freeze_vision, "vision tower's weights")):
        if lora is not None and not frozen:   # (peft's get_peft_model: requires_grad off but for the adapters)
            raise Refused(f'{part}_lora with freeze_{part}=False: peft freezes the {name} under its adapters, so '
                          f'only they would train: set freeze_{part}=True (LoRA), or {part}_lora=None (the whole '
                          f'{"LLM" if part == "llm" else "tower"} trained)')
    check_init(llm_lora, 'model.llm_lora', preference=preference is not None)
    check_init(vision_lora, 'model.vision_lora', preference=preference is not None)
    if not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise Refused(f'loss_chunk must be an integer >= 0 (0: off), got {loss_chunk!r}')
    if loss_chunk and preference is not None:
        raise Refused(f'loss_chunk={loss_chunk} with preference training: its loss takes the logits at the answers\' '
                      'positions whole (logits_to_keep), not in chunks; leave loss_chunk at 0 (lower the pairs per '
                      'device, or max_length, to save memory)')


def build_parts(vision_encoder: Union[str, nn.Module, None], llm: Union[str, nn.Module, None],
                tokenizer: Optional[str], official_checkpoint: Optional[str], projector: Union[str, dict], *,
                dtype: torch.dtype, attn_implementation: str, vision_attn: str, select_layer: Optional[int],
                downsample_ratio: float, ps_version: str, vision_drop_path: float, llm_quantization: Optional[dict],
                template: str, zero3: bool, init_seed: int):
    """``(vision_model, vision, mlp1, language_model, tokenizer)``: the tower, its encoder conventions
    (``vision/base.py``), the projector, the LLM and the tokenizer (``VisionLanguageModel``'s arguments of the
    same names; ``vision_attn``: the tower's attention implementation; ``zero3``: build under ZeRO-3's
    ``zero.Init``). A new projector is initialised from ``init_seed``, the seed the run started with, whatever the
    loading consumed (ZeRO-3 builds the LLM inside ``zero.Init``, which draws random numbers differently)."""
    with hf_zero3_init(zero3):
        if official_checkpoint is not None:
            if vision_encoder is not None or llm is not None:
                raise Refused('give either official_checkpoint or vision_encoder + llm, not both')
            from .official import load_official_parts
            vision_model, mlp1, language_model, official_layer = load_official_parts(
                official_checkpoint, dtype, attn_implementation, drop_path_rate=vision_drop_path,
                vision_attn_implementation=vision_attn)
            vision = InternViTEncoder(vision_model, official_layer if select_layer is None else select_layer)
            tokenizer_path = tokenizer or official_checkpoint
        else:
            if vision_encoder is None or llm is None:
                raise Refused('VisionLanguageModel needs vision_encoder and llm (or official_checkpoint)')
            if isinstance(llm, str):
                check_llm_folder(llm, attn=attn_implementation)   # before the vision encoder loads
            # drop path is set explicitly (default 0), never taken from the encoder's config.json
            vision_model, vision = build_vision_encoder(vision_encoder, dtype, vision_attn,
                                                        drop_path_rate=vision_drop_path, select_layer=select_layer)
            language_model = (load_llm(llm, dtype, attn_implementation, llm_quantization)
                              if isinstance(llm, str) else llm)
            tokenizer_path = tokenizer or (llm if isinstance(llm, str) else None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                if isinstance(projector, str) and projector == InternVLProjector.name:
                    projector = dict(type=projector, downsample_ratio=downsample_ratio, ps_version=ps_version)
                mlp1 = build_projector(projector, vision.hidden_size, language_model.config.hidden_size)
        # an official checkpoint's or a module's LLM (a folder's was checked before it loaded)
        check_softcap(getattr(language_model.config, 'attn_logit_softcapping', None), attn_implementation)
        if tokenizer_path is None:
            raise ValueError('tokenizer is required when llm is a module')
        tok, num_added = load_tokenizer(tokenizer_path)
        check_tokenizer_fits(tok, template, where=str(tokenizer_path))
        untie_embeddings(language_model)
        fit_embeddings_to_tokenizer(language_model, tok, len(tok) - num_added)
    return vision_model, vision, mlp1, language_model, tok


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Total and trainable parameter counts (a 4-bit weight stores two values per byte: its values count)."""
    def numel(p):
        return p.quant_state.shape.numel() if getattr(p, 'quant_state', None) is not None else p.numel()
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return dict(total=total, trainable=trainable)


def log_parameter_counts(model: nn.Module) -> None:
    counts = count_parameters(model)
    print_log(f'Parameters: {counts["total"]:,} total, {counts["trainable"]:,} trainable', logger='current',
              level=logging.INFO)
