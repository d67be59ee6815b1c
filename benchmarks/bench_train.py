"""Training throughput and MFU: packed against unpacked batches, on the same samples in the same run.

Usage::

    .venv/bin/python benchmarks/bench_train.py                                    # tiny models on the CPU: ratios only
    .venv/bin/python benchmarks/bench_train.py --real --device cuda               # GPU: InternViT-300M + Qwen2.5-0.5B
    .venv/bin/python benchmarks/bench_train.py --real --llm 1.5b --device cuda    # GPU: InternViT-300M + Qwen2.5-1.5B
    .venv/bin/python benchmarks/bench_train.py --real --llm 1.5b --dry-run        # shapes and FLOPs per step only
    .venv/bin/python benchmarks/bench_train.py --paths packed --workdir W --json W/packed.json   # one row
    .venv/bin/python benchmarks/bench_train.py --precision-check 4                # bf16 against fp32, no timing

``--paths`` picks the rows, ``--workdir`` keeps the written models and data for the next run (``benchmarks/gpu.py``
runs each row in its own process on one folder), ``--json`` writes the raw figures.

It writes a synthetic data set (every image has an aspect ratio that InternVL's dynamic tiling maps to a
12-tile grid, so each image is 12 tiles plus a thumbnail; answers of varied length) and trains the full
fine-tuning setting (projector + LLM; the vision tower frozen) for ``--steps`` steps each way: unpacked
(``--batch`` samples per step, padded) and packed (one pack of up to ``--max-tokens`` tokens per step).
Both see the same samples. Reported per path: tokens/s counting real (non-padding) tokens, samples/s, model
FLOPs per step and achieved TFLOPS (see :func:`train_step_flops` for how they are counted from the model
shapes), MFU (achieved / peak; the peak comes from ``--peak-tflops`` or, on a GPU, from
:data:`PEAK_TFLOPS` by device name), the share of step time spent waiting for data, the share of padding in
the rows and the peak memory (``torch.cuda.max_memory_allocated`` on a GPU; the process's peak resident set
size on a CPU, which never decreases, so the second path's figure includes the first's).

``--real`` writes randomly initialised checkpoints with the real shapes (InternViT-300M-448px-V2_5 and
Qwen2.5-0.5B or -1.5B) and trains them in bf16 autocast with LLM gradient checkpointing, with InternVL's real vocabulary of
151674 rows in the embeddings and ``lm_head`` (the texts come from the project's tiny tokenizer, so only the
first few hundred rows are ever looked up; the LM head computes all 151674 logits, at the supervised
positions only, and at every token in XTuner's path).
``--dry-run`` builds the configs, the data set and the model modules on PyTorch's ``meta`` device (shapes,
no memory), checks the FLOPs formula's matmul sizes against those modules and prints the FLOPs per step of
both paths without training; it works on a CPU at the real sizes.

XTuner 0.2.0's own InternVL training path (``xtuner.model.InternVL_V1_5``) is the third row, ``xtuner``,
trained on exactly the unpacked path's batches (same samples, same order, same padding). Our model, as
built and before any step, is written as an official InternVL folder with remote code by the converter's
writer (``xtuner_plugins.models.export.write_official`` on the in-memory model: the same tensors, so the
``--real`` vocabulary resize is included); ``InternVL_V1_5(model_path=folder, freeze_visual_encoder=True,
freeze_llm=False)`` loads it (it always trains ``mlp1``, so it trains what ours trains: projector + LLM).
XTuner loads every weight in bf16 (hard-coded); the bench then gives each tensor the dtype and the exact
value it has in our model (fp32 on a CPU; on a GPU the frozen ViT in bf16 and the trained parts in fp32,
as ours keeps them) and sets the LLM's gradient checkpointing (on with ``--real``, off otherwise) and
attention implementation as ours. Same optimizer (AdamW over the trained parameters), same steps, same
bf16 autocast on a GPU. Its inputs are our data pipeline's tokenised samples and tiles ("the same
inputs"; XTuner's ``InternVL_V1_5_Dataset`` tokenises with its own template code, so it would not give
the same tokens): each batch is converted in the timed step, on the device, to what ``InternVL_V1_5.forward``
reads (tiles normalised to float per sample, as XTuner's data set makes them; ``position_ids`` 0..L-1 as
XTuner's ``default_collate_fn`` makes them). XTuner has no packed multimodal batches (its collate refuses
images with varlen attention). Differences that remain are XTuner's own: its remote-code ViT runs SDPA
(ours runs ``--attn``), its forward computes the image flags from pixel sums and clones the embeddings.

Before timing, a check on one batch (the first ``--batch`` samples, before training): XTuner's loss must
equal ours (both are the token mean of the shifted cross-entropy) and the gradient norm of every trained
tensor must match, within 1e-4 relative in fp32 on a CPU and 2e-2 under bf16 autocast on a GPU; the
result is printed, and a failed check marks the ratios as not comparable. XTuner's forward calls
``torch.distributed.get_rank()``, so a single-process gloo group is created when none exists. If XTuner's
path cannot run, the reason is printed instead of its numbers (``--no-xtuner`` leaves it out).

On a CPU with tiny models only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import importlib.util
import io
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_memory import write_models  # noqa: E402
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn  # noqa: E402
from xtuner_plugins.data.packing import PackedInternVLDataset  # noqa: E402
from xtuner_plugins.data.template import IGNORE_INDEX  # noqa: E402
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles  # noqa: E402
from xtuner_plugins.models import VisionLanguageModel  # noqa: E402
from xtuner_plugins.models.attention import SEGMENT_ATTENTION  # noqa: E402

# (cols, rows) grids of exactly 12 tiles; an image of 448*cols x 448*rows px is tiled into that grid (its
# ratio is matched exactly; 6x2 and 2x6 tie with 3x1 and 1x3 and win the tie by area), plus a thumbnail.
GRIDS = [(4, 3), (3, 4), (6, 2), (2, 6)]

# Real shapes (OpenGVLab/InternViT-300M-448px-V2_5; Qwen/Qwen2.5-{0.5B,1.5B}-Instruct config.json).
INTERNVIT_300M = dict(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                      intermediate_size=4096)
REAL_LLMS = {
    '0.5b': dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    '1.5b': dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
}
REAL_VOCAB = 151674  # Qwen2.5's 151665 tokens + InternVL's 9 added ones: the rows InternVL resizes to
# What is trained: the full fine-tuning setting (finetune_full): projector + LLM, the vision tower frozen.
TRAINED = dict(freeze_vision=True, freeze_projector=False, freeze_llm=False)

# The rows: ours on padded batches, ours on packs, XTuner 0.2.0's InternVL_V1_5 on the padded batches.
PATHS = ('unpacked', 'packed', 'xtuner')

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = [('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('A100', 312.0)]


# ---------------------------------------------------------------------------------------------------------
# FLOPs from the model shapes
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The sizes the FLOPs depend on (see :func:`model_shapes`)."""
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_intermediate: int
    patch_size: int
    image_size: int
    num_channels: int
    downsample_ratio: float
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab_size: int

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vit_tokens_per_tile(self) -> int:
        """Patches plus the CLS token (1025 for a 448 px tile with 14 px patches)."""
        return self.patches_per_tile + 1

    @property
    def image_tokens_per_tile(self) -> int:
        """LLM tokens per tile after the pixel shuffle (256 for 448 px, 14 px patches, ratio 0.5)."""
        return int(self.patches_per_tile * self.downsample_ratio ** 2)

    @property
    def projector_in(self) -> int:
        """``mlp1``'s input width: the ViT width times ``(1 / ratio)^2`` (4096 for InternViT-300M)."""
        return self.vit_hidden * round(1 / self.downsample_ratio) ** 2


def _field(config, name):
    value = config[name] if isinstance(config, dict) else getattr(config, name)
    if isinstance(value, (list, tuple)):  # transformers' InternVLVisionConfig keeps sizes as [s, s]
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'{name} must be square, got {list(value)}')
        value = value[0]
    return value


def model_shapes(vision_config, llm_config, downsample_ratio: float = 0.5,
                 vocab_size: Optional[int] = None) -> ModelShapes:
    """Read the shapes from the configs of a built model (``model.vision_model.config``,
    ``model.language_model.config``, ``model.downsample_ratio``) or from config dicts with the same field
    names. ``vocab_size`` overrides the LLM config's (the rows of ``lm_head``)."""
    heads = _field(llm_config, 'num_attention_heads')
    hidden = _field(llm_config, 'hidden_size')
    head_dim = (llm_config.get('head_dim') if isinstance(llm_config, dict)
                else getattr(llm_config, 'head_dim', None)) or hidden // heads
    return ModelShapes(
        vit_hidden=_field(vision_config, 'hidden_size'), vit_layers=_field(vision_config, 'num_hidden_layers'),
        vit_heads=_field(vision_config, 'num_attention_heads'),
        vit_intermediate=_field(vision_config, 'intermediate_size'), patch_size=_field(vision_config, 'patch_size'),
        image_size=_field(vision_config, 'image_size'), num_channels=_field(vision_config, 'num_channels'),
        downsample_ratio=downsample_ratio, llm_hidden=hidden,
        llm_intermediate=_field(llm_config, 'intermediate_size'), llm_layers=_field(llm_config, 'num_hidden_layers'),
        llm_heads=heads, llm_kv_heads=_field(llm_config, 'num_key_value_heads'), llm_head_dim=head_dim,
        vocab_size=vocab_size or _field(llm_config, 'vocab_size'))


def matmul_parameters(s: ModelShapes) -> Dict[str, int]:
    """Weights that multiply activations, per part (biases, norms, layer scales and embeddings excluded).

    * ``patch_embed``: the Conv2d, ``C * 3 * p^2`` (one matmul per patch);
    * ``vit_layer`` (one layer): q, k, v, out ``4 C^2`` + MLP ``2 C I``;
    * ``projector``: ``mlp1`` ``4C * H + H * H``;
    * ``llm_layer`` (one layer): q ``H * a * d``, k and v ``2 * H * kv * d``, o ``a * d * H``, MLP (gate, up,
      down) ``3 H F``; ``a`` heads, ``kv`` key/value heads, ``d`` head dim;
    * ``lm_head``: ``H * V``.
    """
    c, i = s.vit_hidden, s.vit_intermediate
    h, f, d = s.llm_hidden, s.llm_intermediate, s.llm_head_dim
    return dict(
        patch_embed=c * s.num_channels * s.patch_size ** 2,
        vit_layer=4 * c * c + 2 * c * i,
        projector=s.projector_in * h + h * h,
        llm_layer=h * s.llm_heads * d + 2 * h * s.llm_kv_heads * d + s.llm_heads * d * h + 3 * h * f,
        lm_head=h * s.vocab_size)


def _train_multipliers(trainable: bool, upstream_trainable: bool) -> Tuple[int, int]:
    """(weight matmuls, attention matmuls): training FLOPs of a part as multiples of its forward FLOPs."""
    if trainable:
        return 3, 3  # forward + input gradients + weight gradients
    if upstream_trainable:
        return 2, 3  # weights: forward + input gradients; attention: dQ, dK, dV, dP all needed
    return 1, 1  # no gradient reaches this part: forward only


def train_step_flops(s: ModelShapes, seq_lens: Sequence[int], tiles: Sequence[int], *,
                     freeze_vision: bool = True, freeze_projector: bool = False,
                     freeze_llm: bool = False, supervised: Optional[int] = None) -> Dict[str, int]:
    """Model FLOPs of one training step (forward + backward), from the shapes alone.

    The batch is described per sample: ``seq_lens[k]`` tokens (text plus its image tokens) and ``tiles[k]``
    tiles (thumbnail included). Only real tokens count: padding in unpacked rows is not useful work and
    is left out, and so are dummy tiles of text-only samples (the bench derives ``tiles`` from the image
    tokens). Packed or unpacked makes no difference: a pack's attention is block-diagonal causal (a sample
    never attends to another), so its useful attention is the sum over its samples of causal attention on
    the sample's own length, exactly what the same samples cost in separate rows. MFU computed from these
    FLOPs therefore credits both paths with the same work and shows what padding and dense masks waste.

    Forward FLOPs (a multiply-add is 2 FLOPs; ``n = 1 + (S/p)^2`` ViT tokens per tile, ``t = n - 1`` patches,
    ``m = t * r^2`` LLM tokens per tile, ``T`` tiles in the step, ``L_k`` sample lengths, ``N = sum L_k``;
    the parameter counts are :func:`matmul_parameters`'):

    * patch embedding: ``2 * (C * 3 * p^2) * t * T``;
    * ViT matmuls: ``2 * vit_layers * (4 C^2 + 2 C I) * n * T`` (CLS token included);
    * ViT attention, bidirectional: ``QK^T`` and ``AV`` are ``2 n^2 C`` each, so ``4 * n^2 * C`` per layer
      and tile: ``vit_layers * 4 * n^2 * C * T``;
    * projector: ``2 * (4C * H + H^2) * m * T``;
    * LLM matmuls: ``2 * llm_layers * llm_layer * N``;
    * LLM attention, causal: half the full ``4 * L^2 * a * d`` (the usual convention, e.g. FlashAttention's
      benchmarks; exact would be ``L (L + 1) / 2`` score entries): ``llm_layers * 2 * a * d * sum L_k^2``;
      grouped key/value heads do not reduce it, every query head attends;
    * LM head: ``2 * H * V * N_s`` with ``N_s = supervised``, the supervised tokens of the step: the only
      logits the loss needs, and the only ones this project's model computes (``logits_to_keep``); XTuner's
      path computes every token's, work the same samples do not need, so it is not credited. ``None``:
      every token (``N``), an upper bound for callers that know only lengths.

    Training multiplies each part's forward FLOPs (:func:`_train_multipliers`):

    * trainable part: 3x (backward = input gradients + weight gradients, each as large as the forward);
      the patch embedding is 2x when the ViT trains, as no gradient is needed for the pixels;
    * frozen part with a trainable part before it (the gradient flows through it, e.g. the frozen LLM in
      MLP warm-up): 2x for weight matmuls (input gradients only) and 3x for attention score/value matmuls,
      which have no weights and need gradients for both operands;
    * frozen part with nothing trainable before it (the frozen ViT in every stage but 1.5 and full+vision):
      1x, forward only. LoRA adapters are not modelled (their matmuls are small; the frozen base they sit
      in counts as a frozen part the gradient flows through).

    Only matmuls count (the MFU convention): norms, activations, softmax, rotary embeddings, the embedding
    lookup, the loss and the optimizer step are left out, and so is the recomputation of gradient
    checkpointing (model FLOPs, not hardware FLOPs).

    Returns:
        ``vision``, ``projector``, ``llm`` (layers), ``lm_head``: training FLOPs per part; ``total``; and
        ``forward``: the forward FLOPs of all parts.
    """
    if len(seq_lens) != len(tiles):
        raise ValueError(f'{len(seq_lens)} sequence lengths but {len(tiles)} tile counts')
    per_tile = s.image_tokens_per_tile
    for n, t in zip(seq_lens, tiles):
        if n < t * per_tile:
            raise ValueError(f'a sample of {n} tokens cannot hold {t} tiles of {per_tile} image tokens')
    p = matmul_parameters(s)
    total_tiles, tokens = sum(tiles), sum(seq_lens)
    n = s.vit_tokens_per_tile
    attn_dim = s.llm_heads * s.llm_head_dim
    fwd = dict(
        patch_embed=2 * p['patch_embed'] * s.patches_per_tile * total_tiles,
        vit_matmul=2 * s.vit_layers * p['vit_layer'] * n * total_tiles,
        vit_attention=s.vit_layers * 4 * n * n * s.vit_hidden * total_tiles,
        projector=2 * p['projector'] * per_tile * total_tiles,
        llm_matmul=2 * s.llm_layers * p['llm_layer'] * tokens,
        llm_attention=s.llm_layers * 2 * attn_dim * sum(L * L for L in seq_lens),
        lm_head=2 * p['lm_head'] * (tokens if supervised is None else supervised))
    vision_trains, projector_trains, llm_trains = not freeze_vision, not freeze_projector, not freeze_llm
    vit_w, vit_a = _train_multipliers(vision_trains, False)
    proj_w, _ = _train_multipliers(projector_trains, vision_trains)
    llm_w, llm_a = _train_multipliers(llm_trains, vision_trains or projector_trains)
    out = dict(
        vision=(2 if vision_trains else 1) * fwd['patch_embed'] + vit_w * fwd['vit_matmul']
        + vit_a * fwd['vit_attention'],
        projector=proj_w * fwd['projector'],
        llm=llm_w * fwd['llm_matmul'] + llm_a * fwd['llm_attention'],
        lm_head=llm_w * fwd['lm_head'])
    out['total'] = sum(out.values())
    out['forward'] = sum(fwd.values())
    return out


def batch_samples(batch: dict, img_context_token_id: int, image_tokens_per_tile: int) -> Tuple[List[int], List[int]]:
    """Per-sample token counts and tiles of a collated batch (packed rows are split by ``seq_lens``, unpacked
    rows lose their padding); tiles are the sample's ``<IMG_CONTEXT>`` tokens over the tokens per tile."""
    ids, mask = batch['input_ids'], batch['attention_mask']
    seq_lens, tiles = [], []
    for row in range(ids.shape[0]):
        lengths = ([int(n) for n in batch['seq_lens'][row]] if batch.get('seq_lens') is not None
                   else [int(mask[row].sum())])
        start = 0
        for n in lengths:
            image_tokens = int((ids[row, start:start + n] == img_context_token_id).sum())
            if image_tokens % image_tokens_per_tile:
                raise ValueError(f'a sample has {image_tokens} image tokens, not a multiple of '
                                 f'{image_tokens_per_tile} per tile')
            seq_lens.append(n)
            tiles.append(image_tokens // image_tokens_per_tile)
            start += n
    return seq_lens, tiles


def default_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a known GPU from its name (:data:`PEAK_TFLOPS`), else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------

def real_configs(llm: str):
    """``(vision config, LLM config)`` of InternViT-300M + Qwen2.5-``llm`` as the model holds them after
    loading (transformers' ``InternVLVisionConfig``; ``Qwen2Config`` with InternVL's vocabulary, untied)."""
    from transformers import Qwen2Config

    from xtuner_plugins.models.vision import official_to_hf_vision_config
    v, q = INTERNVIT_300M, REAL_LLMS[llm]
    vision = official_to_hf_vision_config(dict(
        image_size=v['image_size'], patch_size=v['patch_size'], hidden_size=v['hidden_size'],
        num_hidden_layers=v['num_layers'], num_attention_heads=v['num_heads'],
        intermediate_size=v['intermediate_size'], qkv_bias=True, qk_normalization=False, norm_type='layer_norm'))
    text = Qwen2Config(vocab_size=REAL_VOCAB, hidden_size=q['hidden_size'], intermediate_size=q['intermediate_size'],
                       num_hidden_layers=q['num_layers'], num_attention_heads=q['num_heads'],
                       num_key_value_heads=q['num_kv_heads'], tie_word_embeddings=False)
    return vision, text


def folder_configs(models: dict):
    """``(vision config, LLM config)`` of written model folders, with the vocabulary the model resizes to."""
    from transformers import AutoConfig

    from xtuner_plugins.models.llm import load_tokenizer
    from xtuner_plugins.models.vision import official_to_hf_vision_config
    with open(os.path.join(models['internvit'], 'config.json')) as f:
        vision = official_to_hf_vision_config(json.load(f))
    text = AutoConfig.from_pretrained(models['llm'])
    text.vocab_size = len(load_tokenizer(models['llm'])[0])
    text.tie_word_embeddings = False
    return vision, text


def write_real_models(out: str, llm: str, weights: bool = True) -> dict:
    """InternViT-300M + Qwen2.5-``llm`` with random weights (``weights=False``: the tokenizer only, for a
    dry run). The LLM is written with the tiny tokenizer's vocabulary; :func:`main` resizes it to
    :data:`REAL_VOCAB` after loading (VisionLanguageModel resizes the embeddings to the tokenizer's length)."""
    from xtuner_plugins.tiny.llm import write_tiny_qwen2
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    from xtuner_plugins.tiny.vision import write_tiny_internvit
    llm_dir = os.path.join(out, 'llm')
    if not weights:
        build_tiny_tokenizer(add_internvl_tokens=False).save_pretrained(llm_dir)
        return dict(internvit=None, llm=llm_dir, image_size=INTERNVIT_300M['image_size'])
    return dict(internvit=write_tiny_internvit(os.path.join(out, 'internvit'), **INTERNVIT_300M),
                llm=write_tiny_qwen2(llm_dir, **REAL_LLMS[llm]), image_size=INTERNVIT_300M['image_size'])


def prepare(work: str, real: bool, llm: str, samples: int, weights: bool = True) -> Tuple[dict, str]:
    """The models and the data set in ``work`` (``models/``, ``data/``) as ``(models, data.jsonl path)``,
    written once and reused by later runs with the same settings (``prepared.json`` records them)."""
    key = dict(real=real, llm=llm if real else None, samples=samples, weights=weights)
    marker = os.path.join(work, 'prepared.json')
    if os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved['key'] != key:
            raise SystemExit(f'{work} holds models and data for {saved["key"]}, not {key}: use another --workdir')
        return saved['models'], saved['data']
    models = (write_real_models(os.path.join(work, 'models'), llm, weights=weights) if real
              else write_models(os.path.join(work, 'models'), False))
    data = write_data(os.path.join(work, 'data'), samples, models['image_size'])
    with open(marker + '.tmp', 'w') as f:
        json.dump(dict(key=key, models=models, data=data), f)
    os.replace(marker + '.tmp', marker)
    return models, data


def meta_matmul_parameters(vision_config, llm_config, downsample_ratio: float = 0.5) -> Dict[str, int]:
    """The :func:`matmul_parameters` parts counted in modules built from the configs on the ``meta`` device
    (no memory): nn.Linear / Conv2d weights only."""
    from transformers import AutoModelForCausalLM, InternVLVisionModel

    from xtuner_plugins.models.projector import InternVLProjector
    with torch.device('meta'):
        vit = InternVLVisionModel(vision_config)
        lm = AutoModelForCausalLM.from_config(llm_config)
        mlp1 = InternVLProjector(vision_config.hidden_size, llm_config.hidden_size, downsample_ratio)
    return module_matmul_parameters(vit, mlp1, lm)


def module_matmul_parameters(vision_model, mlp1, language_model) -> Dict[str, int]:
    """nn.Linear and Conv2d weight elements of the three towers, summed as :func:`matmul_parameters`'
    parts (``vit_layers``/``llm_layers``: all layers together)."""
    def linear(module, skip=None):
        return sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and m is not skip)
    head = language_model.get_output_embeddings()
    return dict(patch_embed=vision_model.embeddings.patch_embeddings.projection.weight.numel(),
                vit_layers=linear(vision_model), projector=linear(mlp1),
                llm_layers=linear(language_model, skip=head), lm_head=head.weight.numel())


def write_data(folder: str, n: int, tile: int, seed: int = 0) -> str:
    """``n`` samples, each one image of a 12-tile grid (:data:`GRIDS`, ``tile`` px tiles) and an answer of
    5 to 119 words."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    path = os.path.join(folder, 'data.jsonl')
    with open(path, 'w') as f:
        for i in range(n):
            cols, rows = GRIDS[i % len(GRIDS)]
            Image.fromarray(rng.integers(0, 256, (rows * tile, cols * tile, 3), dtype=np.uint8)).save(
                os.path.join(folder, 'images', f'{i}.jpg'))
            answer = ' '.join(['word'] * int(rng.integers(5, 120)))
            f.write(json.dumps({'image': f'{i}.jpg', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': answer}]}) + '\n')
    return path


# ---------------------------------------------------------------------------------------------------------
# XTuner 0.2.0's InternVL training path
# ---------------------------------------------------------------------------------------------------------

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
    :data:`TRAINED`) trains, with the folder's exact tensors in their written dtypes.

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


def ours_loss(model, batch: dict) -> torch.Tensor:
    return model(batch, mode='loss')['loss']


def trained_parameters(module: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Trained parameters by name (``VisionLanguageModel`` and ``InternVL_V1_5.model``, the official
    ``InternVLChatModel``, share the names of ``mlp1.*`` and ``language_model.*``)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def check_step(loss_fn, params: Dict[str, torch.nn.Parameter], batch: dict, device: str,
               autocast: Optional[bool] = None) -> dict:
    """One forward and backward as in training, without an optimizer step: the loss and the gradient norm of
    every trained tensor (gradients are cleared afterwards). ``autocast``: bf16 autocast (default: on cuda)."""
    for p in params.values():
        p.grad = None
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda' if autocast is None else autocast):
        loss = loss_fn(batch)
    loss.backward()
    result = checked(loss, params)
    for p in params.values():
        p.grad = None
    return result


def checked(loss: torch.Tensor, params: Dict[str, torch.nn.Parameter]) -> dict:
    """:func:`check_step`'s record of a backward that has run: the loss and each trained tensor's gradient norm,
    in fp32 a block at a time (no fp32 copy of a whole gradient: the embedding's is 0.5 GB at 151k x 896, and
    :func:`run` takes this inside a step whose memory is measured)."""
    norms = {}
    for name, p in params.items():
        if p.grad is not None:
            blocks = p.grad.detach().reshape(-1).split(1 << 22)
            norms[name] = math.sqrt(sum(float(b.float().square().sum()) for b in blocks))
    return dict(loss=float(loss.detach()), grad_norms=norms, trained=sorted(params))


def compare_checks(ours: dict, theirs: dict, tolerance: float) -> dict:
    """Whether two :func:`check_step` results are the same computation: the same trained tensors, losses within
    ``tolerance`` relative, and every tensor's gradient norm within ``tolerance`` of the largest norm."""
    same_trained = ours['trained'] == theirs['trained'] and set(ours['grad_norms']) == set(theirs['grad_norms'])
    loss_diff = abs(ours['loss'] - theirs['loss'])
    loss_rel = loss_diff / max(abs(ours['loss']), 1e-12)
    common = set(ours['grad_norms']) & set(theirs['grad_norms'])
    scale = max([ours['grad_norms'][k] for k in common] + [1e-12])
    grad_rel = max([abs(ours['grad_norms'][k] - theirs['grad_norms'][k]) for k in common] + [0.0]) / scale
    ok = same_trained and bool(common) and loss_rel <= tolerance and grad_rel <= tolerance
    return dict(ok=ok, loss_ours=ours['loss'], loss_xtuner=theirs['loss'], loss_diff=loss_diff, loss_rel=loss_rel,
                grad_rel=grad_rel, tensors=len(common), trained_ours=len(ours['trained']),
                trained_xtuner=len(theirs['trained']), same_trained=same_trained, tolerance=tolerance)


def format_check(c: dict) -> str:
    trained = (f'the same {c["trained_ours"]} trained tensors' if c['same_trained'] else
               f'DIFFERENT trained tensors (ours {c["trained_ours"]}, xtuner {c["trained_xtuner"]})')
    return (f'loss check (first batch, before training): ours {c["loss_ours"]:.6f}, xtuner {c["loss_xtuner"]:.6f} '
            f'(|diff| {c["loss_diff"]:.2e}, rel {c["loss_rel"]:.2e}); gradient norms of {c["tensors"]} tensors: '
            f'max diff {c["grad_rel"]:.2e} of the largest; {trained} -> {"OK" if c["ok"] else "FAILED"} '
            f'(tolerance {c["tolerance"]:g})')


# ---------------------------------------------------------------------------------------------------------
# bf16 against an fp32 reference
# ---------------------------------------------------------------------------------------------------------

# Relative tolerances of bf16 autocast against fp32: each step's loss; the first step's gradient norms (of the
# largest norm).
PRECISION_TOLERANCE = dict(loss=5e-3, grad=5e-2)


def precision_check(model, batches: Sequence[dict], device: str, tolerance: Optional[dict] = None) -> dict:
    """Trains ``model`` (built in fp32) one step per batch twice from its current weights: the fp32 reference
    (every weight fp32, no autocast, no TF32) and then as the timed rows train (frozen parts cast to bf16,
    trained parts fp32, bf16 autocast; on a CPU too). Before the first step each run's loss and gradient norms
    on the first batch are taken (:func:`check_step`) and compared (:func:`compare_checks`). ``ok``: those
    agree, and every step's loss is finite and within ``tolerance`` relative of the reference's."""
    tolerance = dict(PRECISION_TOLERANCE, **(tolerance or {}))
    params = trained_parameters(model)  # the frozen ones do not change (the fp32 run goes first)
    initial = {k: v.detach().to('cpu', copy=True) for k, v in params.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    runs = {}
    for name, bf16 in (('fp32', False), ('bf16', True)):
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(initial[k])
        if bf16:
            for module, frozen in ((model.vision_model, model.freeze_vision), (model.mlp1, model.freeze_projector),
                                   (model.language_model, model.freeze_llm)):
                if frozen:
                    module.to(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16 and tf32[0]
        try:
            check = check_step(lambda b: ours_loss(model, b), params, batches[0], device, autocast=bf16)
            opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
            losses = []
            for batch in batches:
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = ours_loss(model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        runs[name] = dict(check=check, losses=losses)
        del opt
    ref, low = runs['fp32']['losses'], runs['bf16']['losses']
    loss_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, low))
    first = compare_checks(runs['fp32']['check'], runs['bf16']['check'], tolerance['grad'])
    finite = bool(np.all(np.isfinite(ref + low)))
    ok = first['same_trained'] and first['grad_rel'] <= tolerance['grad'] and finite and loss_rel <= tolerance['loss']
    return dict(ok=bool(ok), steps=len(batches), losses_fp32=ref, losses_bf16=low,
                loss_rel=loss_rel if finite else float('nan'), grad_rel=first['grad_rel'], tensors=first['tensors'],
                same_trained=first['same_trained'], tolerance=tolerance)


def format_precision(c: dict) -> str:
    def losses(key):
        return ', '.join(f'{x:.5f}' for x in c[key])
    return (f'bf16 against fp32 ({c["steps"]} steps from the same weights on the same batches): losses fp32 '
            f'{losses("losses_fp32")}; bf16 {losses("losses_bf16")}; '
            f'max rel diff {c["loss_rel"]:.2e} (tolerance {c["tolerance"]["loss"]:g}); first step gradient norms of '
            f'{c["tensors"]} tensors: max diff {c["grad_rel"]:.2e} of the largest (tolerance '
            f'{c["tolerance"]["grad"]:g}) -> {"OK" if c["ok"] else "FAILED"}')


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def peak_memory_mib(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ours_adamw() -> dict:
    """The AdamW options our configs set beyond the rates (``configs/_base_/schedules/cosine.py``: ``fused``), for
    the rows that stand for our training; XTuner's rows keep torch's defaults, as its configs do."""
    from mmengine.config import Config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    opt = Config.fromfile(os.path.join(root, 'configs', '_base_', 'schedules', 'cosine.py')).optim_wrapper.optimizer
    return {k: opt[k] for k in ('fused',) if k in opt}


def run(model, loader, steps, device, shapes: ModelShapes, step_loss=None, freeze: Optional[dict] = None,
        img_context_token_id: Optional[int] = None, autocast: Optional[bool] = None,
        warmup_batch: Optional[dict] = None, adamw: Optional[dict] = None, profile: Optional[str] = None,
        warmup: int = 1, check: Optional[Dict[str, torch.nn.Parameter]] = None,
        after_step: Optional[Callable[[], None]] = None) -> dict:
    """``steps`` timed training steps (after ``warmup`` untimed ones) of ``model`` on ``loader``'s batches.
    ``step_loss(batch on the device) -> loss`` defaults to our model's; ``freeze`` (what is frozen, for the
    FLOPs) and ``img_context_token_id`` default to the model's attributes; ``autocast``: bf16 autocast (default:
    on cuda only); ``warmup_batch`` (a collated batch): the warm-up step's, in place of the loader's first;
    ``adamw``: options of torch's AdamW beyond the rate (``ours_adamw()`` for our rows; default torch's own);
    ``profile``: a path to write torch.profiler's table of the timed steps' operators by device time to (a
    diagnosis: the profiled row's timings are not figures); ``warmup``: 2 for compiled attention, which
    ``torch.compile`` builds for the first shape and again, with dynamic shapes, at the second; ``check`` (the
    trained parameters by name): the warm-up steps run at rate 0 (AdamW's states are made, no weight moves) and
    the first timed step's loss and gradient norms, taken before its optimizer step and outside its time, are
    returned as ``check`` (:func:`check_step`'s record, of the weights the run started from) - the check costs
    no step of its own; ``after_step()``: called at the end of every step, its gradients freed (as MMEngine's
    ``OptimWrapper.update_params`` frees them after the optimizer step), outside the step's time."""
    step_loss = step_loss or (lambda batch: ours_loss(model, batch))
    if freeze is None:
        freeze = dict(freeze_vision=model.freeze_vision, freeze_projector=model.freeze_projector,
                      freeze_llm=model.freeze_llm)
    if img_context_token_id is None:
        img_context_token_id = model.img_context_token_id
    rate = 1e-5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate, **(adamw or {}))
    tokens = samples = flops = padded = 0
    data_time, step_s, untimed, record = 0.0, [], 0.0, None   # untimed: the check's and after_step's seconds
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == 'cuda' else [])) if profile else None
    it = iter(loader)
    for step in range(steps + warmup):  # the warm-up steps are not counted
        t0 = time.perf_counter()
        batch = (warmup_batch if step == 0 and warmup_batch is not None else next(it))['data']
        t1 = time.perf_counter()
        seq_lens, tiles = batch_samples(batch, img_context_token_id, shapes.image_tokens_per_tile)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda' if autocast is None else autocast):
            loss = step_loss(batch)
        loss.backward()
        skip = 0.0
        if check is not None and step == warmup:   # the first timed step: its batch, the run's first weights
            c0 = time.perf_counter()
            record = checked(loss, check)
            skip = time.perf_counter() - c0
        for group in opt.param_groups:   # with a check: no weight moves before it
            group['lr'] = 0.0 if check is not None and step < warmup else rate
        opt.step()
        opt.zero_grad()   # as MMEngine's OptimWrapper.update_params: no gradients held through the next forward
        if device == 'cuda':
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0 - skip)
        if after_step is not None:
            c0 = time.perf_counter()
            after_step()
            skip += time.perf_counter() - c0
        if step < warmup:
            start = time.perf_counter()
            warmup_s = sum(step_s)
            if prof is not None and step == warmup - 1:
                prof.start()
            continue
        untimed += skip
        data_time += t1 - t0
        tokens += sum(seq_lens)
        samples += len(seq_lens)
        padded += batch['input_ids'].numel() - sum(seq_lens)
        supervised = int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())
        flops += train_step_flops(shapes, seq_lens, tiles, **freeze, supervised=supervised)['total']
    total = time.perf_counter() - start - untimed
    if prof is not None:
        prof.stop()
        with open(profile, 'w') as f:
            f.write(prof.key_averages().table(sort_by='self_cuda_time_total' if device == 'cuda' else
                                              'self_cpu_time_total', row_limit=40, max_name_column_width=70))
    return dict(tokens_per_s=tokens / total, samples_per_s=samples / total, data_share=data_time / total,
                flops_per_step=flops / steps, tflops=flops / total / 1e12, pad_share=padded / (tokens + padded),
                peak_mib=peak_memory_mib(device), warmup_s=warmup_s, s_per_step=total / steps,
                step_s=[round(x, 3) for x in step_s], **({'check': record} if check is not None else {}))


def step_plans(ds, packed, batch: int) -> Dict[str, List[Tuple[List[int], List[int]]]]:
    """(seq_lens, tiles) of every step of both paths over the data set, from its header-based estimates:
    unpacked batches of consecutive samples, and the packs."""
    lengths, tiles = ds.length, ds.num_tiles_per_item
    unpacked = [(lengths[i:i + batch], tiles[i:i + batch]) for i in range(0, len(lengths) - batch + 1, batch)]
    packs = [([lengths[i] for i in pack], [tiles[i] for i in pack]) for pack in packed.packs]
    return dict(unpacked=unpacked, packed=packs)


def dry_run(args, shapes: ModelShapes, vision_config, llm_config, ds, packed, peak: Optional[float]) -> None:
    formula = matmul_parameters(shapes)
    expected = dict(patch_embed=formula['patch_embed'], vit_layers=shapes.vit_layers * formula['vit_layer'],
                    projector=formula['projector'], llm_layers=shapes.llm_layers * formula['llm_layer'],
                    lm_head=formula['lm_head'])
    built = meta_matmul_parameters(vision_config, llm_config, shapes.downsample_ratio)
    print(f'shapes: {dataclasses.asdict(shapes)}')
    print(f'  ViT tokens per tile {shapes.vit_tokens_per_tile}, LLM tokens per tile {shapes.image_tokens_per_tile}, '
          f'mlp1 {shapes.projector_in} -> {shapes.llm_hidden} -> {shapes.llm_hidden}')
    print(f'{"matmul weights":16s} {"formula":>14s} {"meta modules":>14s}')
    for key in expected:
        print(f'{key:16s} {expected[key]:14,d} {built[key]:14,d}')
    if expected != built:
        raise SystemExit('the FLOPs formula and the modules built from the configs disagree')
    print(f'tiles per sample: {sorted(set(ds.num_tiles_per_item))}; mean {np.mean(ds.length):.0f} tokens per sample')
    print(f'{"path":10s} {"steps":>6s} {"tokens":>8s} {"samples":>8s} {"vision":>9s} {"projector":>9s} {"llm":>9s} '
          f'{"lm_head":>9s} {"TFLOP/step":>10s} {"fwd TFLOP":>10s}' + (f' {"s @45% MFU":>10s}' if peak else ''))
    plans_by_path = {k: v for k, v in step_plans(ds, packed, args.batch).items() if k in args.paths}
    if 'xtuner' in args.paths and not args.no_xtuner:
        plans_by_path['xtuner'] = plans_by_path['unpacked']  # XTuner trains the unpacked path's batches
    for name, plans in plans_by_path.items():
        per = [train_step_flops(shapes, lens, tiles, **TRAINED) for lens, tiles in plans]
        mean = {k: np.mean([p[k] for p in per]) / 1e12 for k in per[0]}
        line = (f'{name:10s} {len(plans):6d} {np.mean([sum(lens) for lens, _ in plans]):8.0f} '
                f'{np.mean([len(lens) for lens, _ in plans]):8.2f} {mean["vision"]:9.4g} {mean["projector"]:9.4g} '
                f'{mean["llm"]:9.4g} {mean["lm_head"]:9.4g} {mean["total"]:10.4g} {mean["forward"]:10.4g}')
        if peak:
            line += f' {mean["total"] / (0.45 * peak):10.4g}'
        print(line)
    print('(TFLOP per step: model FLOPs of training with the ViT frozen, projector + LLM trained; see '
          'train_step_flops. lm_head is counted at every token here, an upper bound: a training run counts it '
          'at the supervised tokens only, the logits the model computes. No weights were allocated and nothing '
          'was trained.)')
    if 'xtuner' in args.paths and not args.no_xtuner:
        found = importlib.util.find_spec('xtuner') is not None
        print('XTuner 0.2.0 InternVL_V1_5 (row xtuner): the unpacked batches (same FLOPs); '
              + ('xtuner is installed' if found else 'xtuner is NOT installed: a training run would skip it'))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--real', action='store_true', help='real model shapes (random weights; needs a GPU)')
    p.add_argument('--llm', choices=sorted(REAL_LLMS), default=None,
                   help='Qwen2.5 size for --real (default 0.5b, as in InternVL2_5-1B)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to train (default cpu)')
    p.add_argument('--samples', type=int, default=48, help='synthetic samples (default 48)')
    p.add_argument('--batch', type=int, default=4, help='unpacked samples per step (default 4)')
    p.add_argument('--max-tokens', type=int, default=None,
                   help='tokens per pack (default: 16384 with --real, else 4 x the mean sample length)')
    p.add_argument('--steps', type=int, default=20, help='timed steps each way (default 20)')
    p.add_argument('--workers', type=int, default=None, help='DataLoader workers (default 8 with --real, else 2)')
    p.add_argument('--attn', choices=['sdpa', 'flash_attention_2', 'eager', 'flex_attention', SEGMENT_ATTENTION],
                   default=None,
                   help='attention kernels (default: flash_attention_2 on cuda when flash_attn is installed, '
                        'else sdpa, whose packed rows use a dense block-diagonal mask); flex_attention: the LLM '
                        'on compiled FlexAttention with a document-causal BlockMask (no flash_attn needed; '
                        f'cuda only, as FlexAttention has no backward on a CPU); {SEGMENT_ATTENTION}: causal SDPA '
                        'on each packed sample (no mask); XTuner\'s row runs sdpa for the last two')
    p.add_argument('--llm-ckpt', choices=['keep_attention', 'full', 'none'], default='keep_attention',
                   help="our LLM's gradient checkpointing with --real (default keep_attention; models/recompute.py); "
                        "XTuner's row always recomputes whole layers, as XTuner does")
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='peak FLOPS of the device in TFLOPS for MFU (default on cuda: from the device name, '
                        f'{", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS)} bf16 dense; on cpu: no MFU)')
    p.add_argument('--no-xtuner', action='store_true',
                   help="leave out XTuner 0.2.0's InternVL path (InternVL_V1_5 on the unpacked batches)")
    p.add_argument('--dry-run', action='store_true',
                   help='build configs, data and meta-device modules and print the FLOPs per step; no weights, '
                        'no training')
    p.add_argument('--paths', nargs='+', choices=PATHS, default=list(PATHS), help='rows to measure (default: all)')
    p.add_argument('--precision-check', type=int, default=None, metavar='STEPS',
                   help='instead of timing: train STEPS steps on the first packs in bf16 (as the timed rows) and '
                        'in fp32 from the same weights and compare the losses (see precision_check)')
    p.add_argument('--workdir', default=None,
                   help='keep the written models and data set here and reuse them in later runs (default: a '
                        'temporary folder)')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the raw figures to PATH as JSON')
    p.add_argument('--cudnn-sdpa', action='store_true',
                   help="leave PyTorch's cuDNN SDPA backend on (our model's cudnn_attention=True; it turns it off "
                        'by default, process-wide, so the XTuner row runs the same attention kernels as ours)')
    p.add_argument('--profile', default=None, metavar='PATH',
                   help="profile our first row's timed steps with torch.profiler and write its table of operators "
                        'by device time to PATH (a diagnosis: that row\'s timings are not figures)')
    args = p.parse_args()
    if args.llm is not None and not args.real:
        p.error('--llm selects the real-size LLM; it needs --real')
    if args.device == 'cuda' and not args.dry_run and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available')
    if args.attn == 'flex_attention' and args.device == 'cpu' and not args.dry_run:
        p.error("--attn flex_attention trains on cuda only (torch's FlexAttention has no backward on a CPU)")
    if args.samples < args.batch or args.steps < 1 or args.batch < 1:
        p.error('need --steps >= 1 and --samples >= --batch >= 1')
    if args.precision_check is not None and args.precision_check < 1:
        p.error('--precision-check needs at least 1 step')
    paths = [x for x in PATHS if x in args.paths and not (x == 'xtuner' and args.no_xtuner)]
    llm_size = args.llm or '0.5b'
    workers = args.workers if args.workers is not None else (8 if args.real else 2)
    attn = args.attn or ('flash_attention_2' if args.device == 'cuda' and importlib.util.find_spec('flash_attn')
                         else 'sdpa')
    peak = args.peak_tflops
    if peak is None and args.device == 'cuda' and torch.cuda.is_available():
        peak = default_peak_tflops(torch.cuda.get_device_name())
    size = f'real (InternViT-300M + Qwen2.5-{llm_size.upper()}, random weights)' if args.real else 'tiny'
    if args.real and args.device == 'cpu' and not args.dry_run:
        print('warning: real sizes on the CPU take minutes per step', file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        models, data = prepare(work, args.real, llm_size, args.samples, weights=not args.dry_run)
        ds = InternVLDataset(data, image_folders=os.path.join(work, 'data', 'images'), tokenizer=models['llm'],
                             image_size=models['image_size'], max_dynamic_patch=12, cache_dir=os.path.join(work, 'c'))
        max_tokens = args.max_tokens or (16384 if args.real else int(4 * np.mean(ds.length)))
        packed = PackedInternVLDataset(ds, max_tokens=max_tokens, max_tiles=None, seed=0)
        tiles = '/'.join(map(str, sorted(set(ds.num_tiles_per_item))))
        header = (f'models: {size}; device: {args.device}; attention: {attn}; LLM checkpointing: '
                  f'{args.llm_ckpt if args.real else "none"}; cuDNN SDPA {"on" if args.cudnn_sdpa else "off"}; '
                  f'{args.samples} samples of {tiles} '
                  f'tiles, mean {np.mean(ds.length):.0f} tokens; unpacked batch {args.batch}, packs of <= '
                  f'{max_tokens} tokens ({len(packed)} packs)')
        if args.dry_run:
            vision_config, llm_config = real_configs(llm_size) if args.real else folder_configs(models)
            shapes = model_shapes(vision_config, llm_config, 0.5)
            print(f'{header}; dry run; torch {torch.__version__}')
            dry_run(args, shapes, vision_config, llm_config, ds, packed, peak)
            return
        precision = args.precision_check is not None
        model = VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], **TRAINED,
                                    llm_grad_ckpt=args.real and (False if args.llm_ckpt == 'none' else args.llm_ckpt),
                                    attn_implementation=attn, cudnn_attention=args.cudnn_sdpa,
                                    torch_dtype='bfloat16' if args.device == 'cuda' and not precision else 'float32')
        if args.real:  # the tiny tokenizer made the vocabulary small: give the LM head its real width back
            model.language_model.resize_token_embeddings(REAL_VOCAB, mean_resizing=False)
        model.to(args.device).train()
        shapes = model_shapes(model.vision_model.config, model.language_model.config, model.downsample_ratio)
        if shapes.vocab_size != model.language_model.get_output_embeddings().weight.shape[0]:
            raise SystemExit(f'config vocab {shapes.vocab_size} != lm_head rows '
                             f'{model.language_model.get_output_embeddings().weight.shape[0]}')
        if precision:
            batches = [internvl_collate_fn([packed[i % len(packed)]])['data'] for i in range(args.precision_check)]
            result = precision_check(model, batches, args.device)
            print(f'{header}; torch {torch.__version__}')
            print(format_precision(result))
            write_json(args.json, dict(header=header, precision=result))
            return

        def loader(dataset, batch_size):
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10 ** 6,
                                                     generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                               num_workers=workers, collate_fn=internvl_collate_fn,
                                               pin_memory=args.device == 'cuda')

        xtuner_skip, folder, ours_check, check = None, None, None, None
        if 'xtuner' not in paths:
            xtuner_skip = 'left out (--no-xtuner)' if args.no_xtuner else 'left out (--paths)'
        elif importlib.util.find_spec('xtuner') is None:
            xtuner_skip = 'skipped: xtuner is not installed'
        if xtuner_skip is None:  # before any training step: the folder holds the weights both paths start from
            check_batch = internvl_collate_fn([ds[i] for i in range(args.batch)])['data']
            try:
                folder = write_official_folder(model, os.path.join(tmp, 'official'), models['image_size'])
                ours_check = check_step(lambda b: ours_loss(model, b), trained_parameters(model), check_batch,
                                        args.device)
            except Exception as e:  # noqa: BLE001 -- the reason is printed instead of XTuner's numbers
                xtuner_skip = f'could not run: preparing its folder and check failed: {type(e).__name__}: {e}'
        results, warmup = {}, 2 if attn == 'flex_attention' else 1
        if 'unpacked' in paths:
            results['unpacked'] = run(model, loader(ds, args.batch), args.steps, args.device, shapes,
                                      adamw=ours_adamw(), profile=args.profile, warmup=warmup)
        if 'packed' in paths:
            results['packed'] = run(model, loader(packed, 1), args.steps, args.device, shapes, adamw=ours_adamw(),
                                    profile=None if 'unpacked' in paths else args.profile, warmup=warmup)
        if xtuner_skip is None:
            del model  # one model on the device at a time
            gc.collect()
            if args.device == 'cuda':
                torch.cuda.empty_cache()
            created = False
            try:
                created = ensure_process_group(tmp)
                xt = build_xtuner_model(folder, args.device, grad_ckpt=args.real,
                                        attn='sdpa' if attn in ('flex_attention', SEGMENT_ATTENTION) else attn)
                check = compare_checks(ours_check, check_step(lambda b: xtuner_loss(xt, b),
                                                              trained_parameters(xt.model), check_batch, args.device),
                                       CHECK_TOLERANCE[args.device])
                results['xtuner'] = run(xt, loader(ds, args.batch), args.steps, args.device, shapes,
                                        step_loss=lambda b: xtuner_loss(xt, b), freeze=TRAINED,
                                        img_context_token_id=xt.model.img_context_token_id)
            except Exception as e:  # noqa: BLE001 -- the reason is printed instead of XTuner's numbers
                xtuner_skip = f'could not run: {type(e).__name__}: {e}'
            finally:
                if created:
                    torch.distributed.destroy_process_group()
    cpu = platform.processor() or platform.machine()
    machine = (torch.cuda.get_device_name() if args.device == 'cuda' else
               f'{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads')
    print(f'{header}; {args.steps} timed steps each, {workers} workers; torch {torch.__version__}; {machine}')
    print(f'{"path":10s} {"tokens/s":>10s} {"samples/s":>10s} {"TFLOP/step":>11s} {"TFLOPS":>9s} {"MFU":>7s} '
          f'{"data share":>10s} {"pad share":>9s} {"peak MiB":>9s}')
    for name, r in results.items():
        r['mfu'] = r['tflops'] / peak if peak else None
        mfu = f'{r["mfu"]:7.1%}' if peak else f'{"n/a":>7s}'
        print(f'{name:10s} {r["tokens_per_s"]:10.1f} {r["samples_per_s"]:10.2f} {r["flops_per_step"] / 1e12:11.4g} '
              f'{r["tflops"]:9.4g} {mfu} {r["data_share"]:10.1%} {r["pad_share"]:9.1%} {r["peak_mib"]:9.0f}')
    if peak:
        print(f'MFU against a peak of {peak:g} TFLOPS')
    else:
        print('MFU needs a peak: pass --peak-tflops (the achieved TFLOPS above are model FLOPs per second)')
    if 'xtuner' in results:
        from importlib.metadata import version
        print(f'XTuner {version("xtuner")} InternVL_V1_5 (row xtuner): the unpacked batches (same samples and '
              f'order, tokenised and tiled by our pipeline, converted to its input format on the device in the timed '
              f'step); the same weights, dtypes, trained parts (mlp1 + LLM), optimizer and autocast; LLM gradient '
              f'checkpointing {"on" if args.real else "off"} and LLM attention {attn} as ours, its own ViT attention '
              f'(SDPA)')
    if check is not None:
        print(format_check(check))
    if xtuner_skip is not None:
        print(f'XTuner 0.2.0 InternVL path: {xtuner_skip}')
    if 'xtuner' in results:
        x = results['xtuner']
        flag = '' if check['ok'] else ' (loss check FAILED: not the same computation, not comparable)'
        ratios = {k: (results[k]['tokens_per_s'] / x['tokens_per_s'], results[k]['samples_per_s'] / x['samples_per_s'])
                  for k in ('unpacked', 'packed') if k in results}
        if ratios:
            print(f'ours/xtuner tokens/s: {", ".join(f"{k} {t:.2f}" for k, (t, _) in ratios.items())}; samples/s: '
                  f'{", ".join(f"{k} {v:.2f}" for k, (_, v) in ratios.items())} (goal on a GPU: >= 1.5){flag}')
    if 'packed' in results and 'unpacked' in results:
        ratio = results['packed']['tokens_per_s'] / results['unpacked']['tokens_per_s']
        print(f'packed/unpacked tokens/s: {ratio:.2f}')
    write_json(args.json, dict(header=header, machine=machine, torch=torch.__version__, attn=attn, steps=args.steps,
                               workers=workers, peak_tflops=peak, rows=results, check=check, xtuner_skip=xtuner_skip))


def write_json(path: Optional[str], figures: dict) -> None:
    """``--json``: the raw figures of the run."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(figures, f, indent=1)
            f.write('\n')


if __name__ == '__main__':
    main()
