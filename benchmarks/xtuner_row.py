"""XTuner 0.2.0's own InternVL training path (``xtuner.model.InternVL_V1_5``) as a benchmark row: built on an
official folder written from our model (the same tensors), fed our batches in its input format
(:func:`xtuner_inputs`). ``bench_train.py``'s module docstring says what is the same and what stays XTuner's own.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from typing import Dict, Optional

import torch

from benchmarks.synthetic import TRAINED
from benchmarks.train_loop import trained_parameters
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles
from xtuner_plugins.models import VisionLanguageModel


# Relative tolerance of the loss / gradient check: fp32 (CPU) and bf16 autocast (GPU).


CHECK_TOLERANCE = {'cpu': 1e-4, 'cuda': 2e-2}


def write_official_folder(model: VisionLanguageModel, out_dir: str, image_size: int,
                          max_dynamic_patch: int = 12) -> str:
    """``model`` as it is now, as an official InternVL folder with remote code: the converter's writer
    (``export.write_official``) on the in-memory model, so every tensor is written as it is (its own dtype,
    any vocabulary resize included); nothing is rebuilt from a config."""
    from xtuner_plugins.models.export import write_official
    os.makedirs(out_dir, exist_ok=True)
    tiling = dict(image_size=image_size, min_dynamic_patch=1, max_dynamic_patch=max_dynamic_patch, use_thumbnail=True)
    write_official(model, tiling, out_dir, next(model.vision_model.parameters()).dtype, log=lambda m: None)
    return out_dir


def folder_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, in the dtype it was written in."""
    from safetensors.torch import load_file
    state: Dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(folder, '*.safetensors'))):
        state.update(load_file(path))
    if not state:
        raise FileNotFoundError(f'no safetensors weights in {folder}')
    return state


def ensure_process_group(folder: str) -> bool:
    """``InternVL_V1_5``'s forward calls ``torch.distributed.get_rank()``: create a single-process gloo group
    (rendezvous through a file in ``folder``) when none exists. Returns whether one was created."""
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    dist.init_process_group('gloo', init_method='file://' + os.path.join(folder, 'process_group'), rank=0,
                            world_size=1)
    return True


def build_xtuner_model(folder: str, device: str, *, grad_ckpt: bool, attn: str, trained: Optional[dict] = None):
    """XTuner 0.2.0's ``InternVL_V1_5`` on an official folder, training what ``trained`` (default
    ``synthetic.TRAINED``) trains, with the folder's exact tensors in their written dtypes.

    ``InternVL_V1_5`` loads every weight in bf16 and always trains ``mlp1`` (it has no setting to freeze it);
    it turns on the LLM's gradient checkpointing and asks for flash_attention_2 (the remote code falls back
    to SDPA without flash_attn or CUDA). Afterwards each tensor gets the dtype and value written in the
    folder, the LLM's gradient checkpointing is set to ``grad_ckpt`` (non-reentrant, as ours) and its
    attention to ``attn``.
    """
    from mmengine.logging import MMLogger
    from xtuner.model import InternVL_V1_5
    trained = TRAINED if trained is None else trained
    if trained['freeze_projector']:
        raise ValueError('InternVL_V1_5 always trains mlp1: it cannot run a setting with a frozen projector')
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs its whole module tree at INFO
    try:
        xt = InternVL_V1_5(model_path=folder, freeze_llm=trained['freeze_llm'],
                           freeze_visual_encoder=trained['freeze_vision'])
    finally:
        logger.setLevel(level)
    state = folder_state_dict(folder)
    own = xt.model.state_dict(keep_vars=True)
    if set(own) != set(state):
        raise ValueError(f'InternVL_V1_5 and the folder disagree on tensors: only in the model '
                         f'{sorted(set(own) - set(state))[:5]}, only in the folder {sorted(set(state) - set(own))[:5]}')
    for key, value in state.items():
        own[key].data = own[key].data.to(value.dtype)
    xt.model.load_state_dict(state, strict=True)
    lm = xt.model.language_model
    if grad_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    else:
        xt.activation_checkpointing_disable()
    if lm.config._attn_implementation != attn:
        lm.set_attn_implementation(attn)
    return xt.to(device).train()


def build_row(official: str, shared: str, attn: str, lora: Optional[dict]):
    """realsize's XTuner row: :func:`build_xtuner_model` on ``official`` (the LLM frozen under LoRA, whose
    adapters ``InternVL_V1_5._prepare_llm_for_lora`` adds from ``lora``: peft's settings, every linear layer), its
    trained tensors then set to the values our unpacked row saved before its first step (``shared/trained.pt``):
    both tools start each setting from the same weights, and the first step's losses are compared. Returns the
    model and its trained parameters by name."""
    ensure_process_group(shared)
    xt = build_xtuner_model(official, 'cpu', grad_ckpt=True, attn=attn,
                            trained=None if lora is None else dict(freeze_vision=True, freeze_projector=False,
                                                                   freeze_llm=True))
    if lora is not None:
        from peft import LoraConfig
        xt._prepare_llm_for_lora(LoraConfig(**{k: v for k, v in lora.items() if k != 'target_modules'},
                                            target_modules=None), use_activation_checkpointing=True)
        xt.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    ours = torch.load(os.path.join(shared, 'trained.pt'))
    own = trained_parameters(xt.model)
    with torch.no_grad():
        for key, value in ours.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))
    return xt, own


def xtuner_inputs(batch: dict) -> dict:
    """One of our collated unpacked batches (on its device) as ``InternVL_V1_5.forward`` reads it, as XTuner's
    ``InternVL_V1_5_Dataset`` + ``default_collate_fn`` would make it: ``pixel_values`` a list of each sample's
    tiles normalised to float32 (tiles of text-only samples all zero: XTuner's image flags are "pixel sum
    != 0"), ``input_ids``, ``labels``, ``attention_mask`` and ``position_ids`` 0..L-1 on every row."""
    if batch.get('seq_lens') is not None:
        raise ValueError("XTuner 0.2.0's InternVL path has no packed batches (its collate refuses images with "
                         'varlen attention)')
    pixels = normalize_tiles(batch['pixel_values'], IMAGENET_MEAN, IMAGENET_STD, dtype=torch.float32)
    pixels.masked_fill_((batch['image_flags'].to(pixels.device) != 1)[:, None, None, None], 0.0)
    ids = batch['input_ids']
    rows, length = ids.shape
    return dict(pixel_values=list(pixels.split(batch['num_tiles'].tolist())), input_ids=ids, labels=batch['labels'],
                attention_mask=batch['attention_mask'],
                position_ids=torch.arange(length, device=ids.device).unsqueeze(0).repeat(rows, 1))


def xtuner_loss(xt, batch: dict) -> torch.Tensor:
    """``InternVL_V1_5``'s training loss on one of our batches (its forward prints the ViT batch size every
    100 calls; that goes nowhere)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return xt(xtuner_inputs(batch), mode='loss')['loss']
